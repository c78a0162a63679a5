"""Decode and validate a ``GatherRequest`` against the table slice a shard serves.

Every check raises a typed error whose message names the field, what was wrong and what was
expected. Sizes are validated from the declared shapes before anything is allocated
(:func:`~ultramem_dist._private.codec.decode_tensor`), and tensors are zero-copy views of the
request bytes until the kernel runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ultramem_dist._private.codec import decode_tensor
from ultramem_dist.errors import InvalidRequestError, TableNotFoundError, VersionMismatchError
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.store.reader import ShardSlice, ShardTable

__all__ = ["GatherQuery", "Limits", "decode_request"]

_INT = (torch.int32, torch.int64)


@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_per_query: int


@dataclass(frozen=True)
class GatherQuery:
    """A validated request, in the shard's local coordinates, ready for ``gather_pool``."""

    table: ShardTable
    indices: torch.Tensor
    blocks: torch.Tensor
    weights: torch.Tensor
    offsets: torch.Tensor | None
    num_tokens: int
    num_blocks: int


def decode_blocks_weights(
    req: pb.GatherRequest, indices: torch.Tensor, max_nnz: int, num_cores: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``blocks`` (shaped like ``indices``) and ``weights`` (``indices.shape + [h_c]``,
    float32), bounded by ``max_nnz`` entries before anything is allocated."""
    blocks = decode_tensor(
        req.blocks, name="blocks", dtypes=_INT, max_elements=max_nnz, ndims=(indices.dim(),)
    )
    if blocks.shape != indices.shape:
        raise InvalidRequestError(
            f"blocks: shape {list(blocks.shape)}; expected the indices shape {list(indices.shape)}"
        )
    weights = decode_tensor(
        req.weights,
        name="weights",
        dtypes=(torch.float32,),
        max_elements=max_nnz * num_cores,
        ndims=(indices.dim() + 1,),
    )
    want = [*indices.shape, num_cores]
    if list(weights.shape) != want:
        raise InvalidRequestError(
            f"weights: shape {list(weights.shape)}; expected {want} (indices shape + h_c)"
        )
    return blocks, weights


def _bounds(t: torch.Tensor) -> tuple[int, int] | None:
    """(min, max) of an integer tensor; ``None`` if empty. numpy on the shared memory: a few
    microseconds where a torch reduction costs tens on request-sized arrays."""
    if t.numel() == 0:
        return None
    a = t.numpy()
    return int(a.min()), int(a.max())


def _range_check(name: str, bounds: tuple[int, int] | None, lo: int, hi: int, what: str) -> None:
    if bounds is None:
        return
    mn, mx = bounds
    if mn < lo or mx >= hi:
        bad = mn if mn < lo else mx
        raise InvalidRequestError(
            f"{name}: value {bad} is out of range; expected {what} [{lo}, {hi})"
        )


def decode_request(req: pb.GatherRequest, shard: ShardSlice, limits: Limits) -> GatherQuery:
    """Validate ``req`` for ``shard``; raise InvalidRequest/TableNotFound/VersionMismatch."""
    served = shard.manifest.version
    if not req.table_version:
        raise InvalidRequestError(f"table_version is empty; expected the served version {served!r}")
    if req.table_version != served:
        raise VersionMismatchError(
            f"requested table version {req.table_version!r}, but this shard serves {served!r}"
        )
    table = shard.tables.get(req.table_id)
    if table is None:
        raise TableNotFoundError(
            f"table {req.table_id!r} is not served here; tables: {sorted(shard.tables)}"
        )
    entry, slot = table.entry, table.slot
    max_nnz = limits.max_batch * limits.max_per_query
    ragged = req.HasField("offsets")

    indices = decode_tensor(
        req.indices,
        name="indices",
        dtypes=_INT,
        max_elements=max_nnz,
        ndims=(1,) if ragged else (2,),
    )
    offsets = None
    if ragged:
        offsets = decode_tensor(
            req.offsets, name="offsets", dtypes=_INT, max_elements=limits.max_batch + 1, ndims=(1,)
        )
        if offsets.numel() < 1:
            raise InvalidRequestError("offsets: empty; expected T + 1 >= 1 CSR offsets")
        num_tokens = offsets.numel() - 1
        offsets = offsets.to(torch.int64)
        offs = offsets.numpy()
        nnz = indices.shape[0]
        if int(offs[0]) != 0 or int(offs[-1]) != nnz:
            raise InvalidRequestError(
                f"offsets: starts at {int(offs[0])} and ends at {int(offs[-1])}; "
                f"expected 0 and the number of indices ({nnz})"
            )
        lengths = np.diff(offs)
        if num_tokens and int(lengths.min()) < 0:
            raise InvalidRequestError("offsets: decreasing; expected non-decreasing CSR offsets")
        if num_tokens and int(lengths.max()) > limits.max_per_query:
            raise InvalidRequestError(
                f"offsets: a query has {int(lengths.max())} entries; "
                f"expected at most {limits.max_per_query} per query"
            )
    else:
        num_tokens, per_query = indices.shape
        if num_tokens > limits.max_batch:
            raise InvalidRequestError(
                f"indices: batch of {num_tokens} queries; expected at most {limits.max_batch}"
            )
        if per_query > limits.max_per_query:
            raise InvalidRequestError(
                f"indices: {per_query} entries per query; expected at most {limits.max_per_query}"
            )

    blocks, weights = decode_blocks_weights(req, indices, max_nnz, entry.num_cores)
    # numpy views: the same memory, a few microseconds cheaper per check than torch ops
    if weights.numel() and not np.isfinite(weights.numpy()).all():
        raise InvalidRequestError("weights: contain NaN or Inf; expected finite values")
    _range_check("blocks", _bounds(blocks), 0, entry.expansion, "an IVE block id in")
    ids = _bounds(indices)
    _range_check("indices", ids, 0, entry.n_rows, "a row id in")
    if entry.sharding == "row":
        owned = f"rows owned by shard {shard.shard} in"
        _range_check("indices", ids, slot.row_lo, slot.row_hi, owned)

    local = indices - slot.row_lo if slot.row_lo else indices  # the kernel widens to int64
    blk = blocks
    num_blocks = entry.expansion
    if entry.merged:  # merged rows are (block, row) pairs, one output bin per token
        local = blocks.to(torch.int64) * (slot.row_hi - slot.row_lo) + local
        blk = torch.zeros_like(local)
        num_blocks = 1
    return GatherQuery(table, local, blk, weights, offsets, num_tokens, num_blocks)
