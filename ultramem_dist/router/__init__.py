"""A router: the ``ultramem.v1.GatherPool`` service for a whole sharded table version.

Callers in any language make one ``Gather`` call against the router and need no sharding logic;
the router fans out with :class:`~ultramem_dist.client.GatherClient`. Direct-to-shard calls stay
the lowest-latency path (one hop fewer); see ``docs/runtimes.md``.
"""

from ultramem_dist.router.app import RouterServer, build_router, serve_router
from ultramem_dist.router.config import RouterConfig
from ultramem_dist.router.servicer import RouterServicer, whole_table_info

__all__ = [
    "RouterConfig",
    "RouterServer",
    "RouterServicer",
    "build_router",
    "serve_router",
    "whole_table_info",
]
