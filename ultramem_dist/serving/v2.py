"""UltraMemV2 requests on a shard: the per-token ``pre_input`` and the pre-value activation.

For a table stored with pre-values (manifest ``pre_vdim > 0``) every entry ``l`` of token ``t``
has its per-core weights multiplied by ``GELU(pre_values[row_l] . pre_input[t])`` by the
gather-pool kernel, in the same pass that pools the value rows (``kernels/gather_pool.py``).
Row-sharded shards hold their rows' pre-values, dim-sharded shards all of them, so the dot
product is always complete on the shard (no all-reduce before the GELU).
"""

from __future__ import annotations

import numpy as np

from ultramem_dist._private.codec import decode_array
from ultramem_dist.errors import InvalidRequestError
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb

__all__ = ["check_pre_input_absent", "decode_pre_input"]


def check_pre_input_absent(req: pb.GatherRequest, table_id: str) -> None:
    """A plain table takes no ``pre_input``: refuse rather than ignore it."""
    if req.HasField("pre_input"):
        raise InvalidRequestError(
            f"pre_input: table {table_id!r} has no pre-values (not an UltraMemV2 table); "
            "send the request without pre_input"
        )


def decode_pre_input(req: pb.GatherRequest, num_tokens: int, pre_vdim: int) -> np.ndarray:
    """The float32 ``[T, pre_vdim]`` pre-value input of a request on a pre-valued table."""
    if not req.HasField("pre_input"):
        raise InvalidRequestError(
            f"pre_input: table {req.table_id!r} is an UltraMemV2 table with pre-values; the "
            f"request must carry pre_input float32 [T, {pre_vdim}]"
        )
    arr = decode_array(
        req.pre_input,
        name="pre_input",
        dtypes=("float32",),
        max_elements=max(1, num_tokens) * pre_vdim,
        ndims=(2,),
    )
    if arr.shape != (num_tokens, pre_vdim):
        raise InvalidRequestError(
            f"pre_input: shape {list(arr.shape)}; expected [{num_tokens}, {pre_vdim}] "
            "(one row of pre_vdim per query token)"
        )
    if arr.size and not np.isfinite(arr).all():
        raise InvalidRequestError("pre_input: contains NaN or Inf; expected finite values")
    return arr
