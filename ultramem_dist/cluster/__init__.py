"""Ray deployment of value shards: actors with their own gRPC servers, registry, deployer."""

from ultramem_dist.cluster.backend import ClusterValueStore
from ultramem_dist.cluster.deploy import Deployer, PlacementOptions
from ultramem_dist.cluster.registry import get_registry

__all__ = ["ClusterValueStore", "Deployer", "PlacementOptions", "get_registry"]
