"""Decode and validate a ``GatherRequest`` against the table slice a shard serves.

Every check raises a typed error whose message names the field, what was wrong and what was
expected. Sizes are validated from the declared shapes before anything is allocated
(:func:`~ultramem_dist._private.codec.decode_array`), and arrays are zero-copy views of the
request bytes where no conversion is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ultramem_dist._private.codec import decode_array
from ultramem_dist.errors import InvalidRequestError, TableNotFoundError, VersionMismatchError
from ultramem_dist.kernels import native
from ultramem_dist.kernels.gather_pool import dense_offsets
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving import v2
from ultramem_dist.store.reader import ShardSlice, ShardTable

__all__ = [
    "Entries",
    "GatherQuery",
    "Limits",
    "check_finite",
    "check_version",
    "decode_entries",
    "decode_request",
]

_INT = ("int32", "int64")


@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_per_query: int


@dataclass(frozen=True)
class GatherQuery:
    """A validated request in the shard's local coordinates, flattened for the kernel:
    ``indices``/``blocks`` int64 ``[nnz]`` in token order, ``weights`` float32 ``[nnz, h_c]``,
    ``offsets`` int64 CSR ``[T + 1]``. Views of the request bytes where no conversion is needed."""

    table: ShardTable
    indices: np.ndarray
    blocks: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    num_tokens: int
    num_blocks: int
    pre_input: np.ndarray | None = None
    """UltraMemV2: float32 ``[T, pre_vdim]`` for a table with pre-values (else ``None``)."""


def decode_blocks_weights(
    req: pb.GatherRequest, indices: np.ndarray, max_nnz: int, num_cores: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``blocks`` (shaped like ``indices``) and ``weights`` (``indices.shape + [h_c]``,
    float32), bounded by ``max_nnz`` entries before anything is allocated."""
    blocks = decode_array(
        req.blocks, name="blocks", dtypes=_INT, max_elements=max_nnz, ndims=(indices.ndim,)
    )
    if blocks.shape != indices.shape:
        raise InvalidRequestError(
            f"blocks: shape {list(blocks.shape)}; expected the indices shape {list(indices.shape)}"
        )
    weights = decode_array(
        req.weights,
        name="weights",
        dtypes=("float32",),
        max_elements=max_nnz * num_cores,
        ndims=(indices.ndim + 1,),
    )
    want = (*indices.shape, num_cores)
    if weights.shape != want:
        raise InvalidRequestError(
            f"weights: shape {list(weights.shape)}; expected {list(want)} (indices shape + h_c)"
        )
    return blocks, weights


def _bounds(a: np.ndarray) -> tuple[int, int] | None:
    """(min, max) of an integer array; ``None`` if empty."""
    if a.size == 0:
        return None
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


def check_version(req: pb.GatherRequest, served: str, who: str) -> None:
    """``req`` names the served table version (``who``: "shard", "router" for the message)."""
    if not req.table_version:
        raise InvalidRequestError(f"table_version is empty; expected the served version {served!r}")
    if req.table_version != served:
        raise VersionMismatchError(
            f"requested table version {req.table_version!r}, but this {who} serves {served!r}"
        )


@dataclass(frozen=True)
class Entries:
    """A request's lookup entries with shapes, sizes and CSR offsets checked (not values)."""

    indices: np.ndarray  # [T, L], or [nnz] when ragged
    blocks: np.ndarray  # shaped like indices
    weights: np.ndarray  # indices.shape + [h_c], float32
    offsets: np.ndarray | None  # int64 [T + 1] when ragged
    num_tokens: int


def decode_entries(
    req: pb.GatherRequest, limits: Limits, num_cores: int, *, check_weights: bool = True
) -> Entries:
    """Decode indices/blocks/weights (and offsets) of ``req`` within ``limits``; the one decoder
    of the shard and the router. ``check_weights=False``: the caller checks that the weights are
    finite (with :func:`check_finite`, or natively)."""
    max_nnz = limits.max_batch * limits.max_per_query
    ragged = req.HasField("offsets")
    indices = decode_array(
        req.indices,
        name="indices",
        dtypes=_INT,
        max_elements=max_nnz,
        ndims=(1,) if ragged else (2,),
    )
    offsets = None
    if ragged:
        offs = decode_array(
            req.offsets, name="offsets", dtypes=_INT, max_elements=limits.max_batch + 1, ndims=(1,)
        )
        if offs.size < 1:
            raise InvalidRequestError("offsets: empty; expected T + 1 >= 1 CSR offsets")
        num_tokens = offs.size - 1
        offsets = offs.astype(np.int64)
        nnz = indices.shape[0]
        if int(offs[0]) != 0 or int(offs[-1]) != nnz:
            raise InvalidRequestError(
                f"offsets: starts at {int(offs[0])} and ends at {int(offs[-1])}; "
                f"expected 0 and the number of indices ({nnz})"
            )
        lengths = np.diff(offsets)
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
    blocks, weights = decode_blocks_weights(req, indices, max_nnz, num_cores)
    if check_weights:
        check_finite(weights)
    return Entries(indices, blocks, weights, offsets, num_tokens)


def check_finite(weights: np.ndarray) -> None:
    if weights.size and not np.isfinite(weights).all():
        raise InvalidRequestError("weights: contain NaN or Inf; expected finite values")


def decode_request(req: pb.GatherRequest, shard: ShardSlice, limits: Limits) -> GatherQuery:
    """Validate ``req`` for ``shard``; raise InvalidRequest/TableNotFound/VersionMismatch."""
    check_version(req, shard.manifest.version, "shard")
    table = shard.tables.get(req.table_id)
    if table is None:
        raise TableNotFoundError(
            f"table {req.table_id!r} is not served here; tables: {sorted(shard.tables)}"
        )
    entry, slot = table.entry, table.slot
    if table.pre_array is not None:
        return _decode_v2(req, shard, table, limits)
    v2.check_pre_input_absent(req, req.table_id)
    lib = native.library()
    e = decode_entries(req, limits, entry.num_cores, check_weights=lib is None)
    indices, blocks, weights, num_tokens = e.indices, e.blocks, e.weights, e.num_tokens
    offsets = e.offsets if e.offsets is not None else dense_offsets(*indices.shape)
    num_blocks = 1 if entry.merged else entry.expansion
    if lib is not None:  # every value check and conversion in one native pass
        merged_rows = slot.row_hi - slot.row_lo if entry.merged else 0
        rows = (slot.row_lo, slot.row_hi)
        out = lib.check_entries(indices, blocks, weights, rows, entry.expansion, merged_rows)
        if not isinstance(out, int):
            w = weights.reshape(-1, entry.num_cores)
            return GatherQuery(table, *out, w, offsets, num_tokens, num_blocks)
        check_finite(weights)  # a value failed: the checks below name it
    _range_check("blocks", _bounds(blocks), 0, entry.expansion, "an IVE block id in")
    ids = _bounds(indices)
    _range_check("indices", ids, 0, entry.n_rows, "a row id in")
    if entry.sharding == "row":
        owned = f"rows owned by shard {shard.shard} in"
        _range_check("indices", ids, slot.row_lo, slot.row_hi, owned)

    # flat int64 in the slice's coordinates: one numpy op each (a view when nothing changes)
    local = np.subtract(indices.reshape(-1), slot.row_lo, dtype=np.int64)
    blk = blocks.reshape(-1).astype(np.int64, copy=False)
    if entry.merged:  # merged rows are (block, row) pairs, one output bin per token
        local += blk * (slot.row_hi - slot.row_lo)
        blk = np.zeros_like(local)
    w = weights.reshape(-1, entry.num_cores)
    return GatherQuery(table, local, blk, w, offsets, num_tokens, num_blocks)


def _decode_v2(
    req: pb.GatherRequest, shard: ShardSlice, table: ShardTable, limits: Limits
) -> GatherQuery:
    """An UltraMemV2 request: the usual checks plus ``pre_input`` (the kernel applies the
    pre-value activation while it pools)."""
    entry, slot = table.entry, table.slot
    e = decode_entries(req, limits, entry.num_cores, check_weights=True)
    offsets = e.offsets if e.offsets is not None else dense_offsets(*e.indices.shape)
    pre_input = v2.decode_pre_input(req, e.num_tokens, entry.pre_vdim)
    _range_check("blocks", _bounds(e.blocks), 0, entry.expansion, "an IVE block id in")
    ids = _bounds(e.indices)
    _range_check("indices", ids, 0, entry.n_rows, "a row id in")
    if entry.sharding == "row":
        owned = f"rows owned by shard {shard.shard} in"
        _range_check("indices", ids, slot.row_lo, slot.row_hi, owned)
    local = np.subtract(e.indices.reshape(-1), slot.row_lo, dtype=np.int64)
    blk = e.blocks.reshape(-1).astype(np.int64, copy=False)
    w = e.weights.reshape(-1, entry.num_cores)
    return GatherQuery(table, local, blk, w, offsets, e.num_tokens, entry.expansion, pre_input)
