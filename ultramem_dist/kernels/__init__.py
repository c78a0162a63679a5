"""Compute kernels shared by the local memory layer and the remote value shards."""

from ultramem_dist.kernels.gather_pool import ColumnSegment, column_segments, gather_pool

__all__ = ["ColumnSegment", "column_segments", "gather_pool"]
