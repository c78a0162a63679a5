"""Ray deployment of value shards: actors with their own gRPC servers, registry, deployer.

The names below load on first use: a Ray worker that hosts a shard actor imports
``ultramem_dist.cluster.actor`` (and so this package) and must not pull in the client side
(``ClusterValueStore``, which needs torch) on a CPU node.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ultramem_dist.cluster.backend import ClusterValueStore
    from ultramem_dist.cluster.deploy import Deployer, PlacementOptions
    from ultramem_dist.cluster.registry import get_registry

__all__ = ["ClusterValueStore", "Deployer", "PlacementOptions", "get_registry"]

_HOMES = {
    "ClusterValueStore": "ultramem_dist.cluster.backend",
    "Deployer": "ultramem_dist.cluster.deploy",
    "PlacementOptions": "ultramem_dist.cluster.deploy",
    "get_registry": "ultramem_dist.cluster.registry",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
