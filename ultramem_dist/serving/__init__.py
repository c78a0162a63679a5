"""The shard server: a ``grpc.aio`` GatherPool service over one memory-mapped store shard."""

from ultramem_dist.serving.app import SERVICE_NAME, ShardServer, build_server, serve
from ultramem_dist.serving.config import ServerConfig

__all__ = ["SERVICE_NAME", "ServerConfig", "ShardServer", "build_server", "serve"]
