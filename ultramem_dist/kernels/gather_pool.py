"""The one weighted gather-pool kernel of ultramem-dist.

Both the in-process :class:`~ultramem_dist.model.ultramem.UltraMemLayer` and every remote value
shard call :func:`gather_pool`; there is no second copy of this math.

What it computes, for every query token ``t`` and IVE block ``e``::

    out[t, e, cols(s)] = sum_{l: token(l)=t, block(l)=e} w[l, core(s)] * table[idx[l], cols(s)]

where the table's columns are split into *segments* ``s`` and each segment belongs to one MCS
core (``core(s)``).  For an unsharded table with ``h_c`` cores there are ``h_c`` segments of
width ``Dv / h_c``; a dimension-sharded slice has the segments that intersect its column range.

Two implementations of this one contract, chosen per call (``backend="auto"``):

* native (CPU, float32 weights, no autograd — every shard and inference): the C routine in
  ``csrc/gather_pool.c`` walks each token's entries in order and adds every selected row,
  read once and whole, into the token's ``[E, cols]`` output; see :mod:`.native`.
* torch (autograd, GPU, or no C compiler): one
  ``torch.nn.functional.embedding_bag(mode="sum", per_sample_weights=...)`` call, which reads
  every selected row once:

1. Entries are stably grouped by bag key ``token * E + block`` (a radix sort through numpy when
   the keys fit 16 bits, else ``torch.sort``); entries keep their original order inside a bag.
2. Equal-width segments: the table ``[rows, nseg * w]`` is viewed as ``[rows * nseg, w]`` so that
   (row, segment) is one contiguous embedding row, and every entry becomes ``nseg`` entries
   ``row * nseg + s`` weighted by its core's score, laid out token by token as
   ``(token, segment, block)`` bags; the ``[T, nseg, E, w]`` result is transposed to
   ``[T, E, nseg * w]``.  A token's rows are read for its first segment and re-read from cache
   for the next.  ``sum_segments`` keeps all segments of an entry in its ``(token, block)`` bag.
3. Unequal segments (a dimension shard boundary that cuts a core slice unevenly) use the same
   layout over full-width rows and keep each segment's columns of its own bags: never a copy of
   the table (a column slice of the table would be, inside ``embedding_bag``).

UltraMemV2 tables also have *pre-values* ``[rows, pre_vdim]``: with ``pre_values`` and
``pre_input`` (``[T, pre_vdim]``, one row per token) every entry's weights are first scaled by
``GELU(pre_values[idx[l]] . pre_input[token(l)])`` (``pre_gelu=False``: the dot product). The
native routine does it in the same pass (read the pre-value row, dot, activate, scale, pool);
the torch path computes :func:`pre_value_activation` (differentiable) and pools as above.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ultramem_dist.kernels import native

if TYPE_CHECKING:
    import torch

# torch is imported by the functions of the torch path, not here: a CPU shard uses this
# module's segments and native plans without ever loading torch.

__all__ = [
    "Backend",
    "ColumnSegment",
    "column_segments",
    "dense_offsets",
    "gather_pool",
    "native_plan",
    "pre_value_activation",
]

Backend = Literal["auto", "native", "torch"]

_RADIX_KEYS = 1 << 16  # numpy's stable argsort is a radix sort for 16-bit keys


@dataclass(frozen=True)
class ColumnSegment:
    """A run of table columns ``[start, stop)`` (local to the table slice) scored by one core."""

    start: int
    stop: int
    core: int

    @property
    def width(self) -> int:
        return self.stop - self.start


@functools.lru_cache(maxsize=1024)
def column_segments(col_lo: int, col_hi: int, dv: int, num_cores: int) -> tuple[ColumnSegment, ...]:
    """Segments of the global value columns ``[col_lo, col_hi)`` for an MCS layer of width ``dv``.

    Core ``c`` owns global columns ``[c * dv / num_cores, (c + 1) * dv / num_cores)``.
    """
    if num_cores < 1 or dv % num_cores:
        raise ValueError(f"value width {dv} is not divisible by the {num_cores} MCS cores")
    if not 0 <= col_lo < col_hi <= dv:
        raise ValueError(f"column range [{col_lo}, {col_hi}) is not inside [0, {dv})")
    width = dv // num_cores
    segs = []
    for c in range(num_cores):
        lo, hi = max(col_lo, c * width), min(col_hi, (c + 1) * width)
        if lo < hi:
            segs.append(ColumnSegment(lo - col_lo, hi - col_lo, c))
    return tuple(segs)


def _stable_order(keys: np.ndarray, num_keys: int) -> np.ndarray:
    """Stable permutation that groups ``keys`` (ints in ``[0, num_keys)``) in ascending order."""
    if num_keys <= _RADIX_KEYS:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    return np.argsort(keys, kind="stable")


def _np(t: torch.Tensor) -> np.ndarray:
    """An integer tensor as an int64 numpy array (a view when it already is one on the CPU)."""
    return t.detach().cpu().numpy().astype(np.int64, copy=False)


def _weighted_bag(
    table: torch.Tensor,
    idx: np.ndarray,
    bag_offsets: np.ndarray,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``embedding_bag`` sum; a table stored in another dtype is converted row by row (only the
    gathered rows), so half-precision storage accumulates in the weights' precision."""
    import torch
    import torch.nn.functional as F
    dev = table.device
    idx_t = torch.from_numpy(idx).to(dev)
    off_t = torch.from_numpy(bag_offsets).to(dev)
    if table.dtype == weights.dtype:
        return F.embedding_bag(idx_t, table, off_t, mode="sum", per_sample_weights=weights)
    if torch.is_grad_enabled() and (table.requires_grad or weights.requires_grad):
        rows = table.index_select(0, idx_t).to(weights.dtype)
        ids = torch.arange(idx.size, device=dev)
        return F.embedding_bag(ids, rows, off_t, mode="sum", per_sample_weights=weights)
    return _converted_bag(table, idx, bag_offsets, weights)


_SCRATCH = threading.local()
_CHUNK_BYTES = 4 << 20  # converted rows per step: stays in cache, reused call after call


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer reused across calls: fresh multi-MB temporaries cost a page fault
    per 4 KiB on every call (the allocator returns them to the OS), more than the conversion."""
    import torch
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        buf = torch.empty(numel, dtype=dtype, device=device)
        setattr(_SCRATCH, name, buf)
    return buf[:numel]


def _converted_bag(
    table: torch.Tensor, idx: np.ndarray, bag_offsets: np.ndarray, weights: torch.Tensor
) -> torch.Tensor:
    """Half-precision table, fp32 accumulation, no autograd: gather and convert the rows of a
    run of whole bags into two reusable buffers, then pool them; bags never straddle runs."""
    import torch
    import torch.nn.functional as F
    dev, width, nnz = table.device, table.shape[1], idx.size
    num_bags = bag_offsets.size
    out = torch.empty(num_bags, width, dtype=weights.dtype, device=dev)
    per_run = max(1, _CHUNK_BYTES // (width * (table.element_size() + weights.element_size())))
    starts = np.append(bag_offsets, nnz)
    b0 = 0
    while b0 < num_bags:
        e0 = int(starts[b0])
        # last bag boundary within per_run entries (at least one bag per run)
        b1 = max(b0 + 1, int(np.searchsorted(starts, e0 + per_run, side="right")) - 1)
        b1 = min(b1, num_bags)
        e1 = int(starts[b1])
        n = e1 - e0
        raw = _scratch("raw", n * width, table.dtype, dev).view(n, width)
        rows = _scratch("rows", n * width, weights.dtype, dev).view(n, width)
        torch.index_select(table, 0, torch.from_numpy(idx[e0:e1]).to(dev), out=raw)
        rows.copy_(raw)
        out[b0:b1] = F.embedding_bag(
            torch.arange(n, device=dev),
            rows,
            torch.from_numpy(starts[b0:b1] - e0).to(dev),
            mode="sum",
            per_sample_weights=weights[e0:e1],
        )
        b0 = b1
    return out


@functools.lru_cache(maxsize=1024)
def _tiling_cols(segments: tuple[ColumnSegment, ...]) -> int:
    """Columns covered when the segments tile ``[0, n)`` in order, else -1."""
    tiles = segments[0].start == 0 and all(
        a.stop == b.start for a, b in zip(segments, segments[1:], strict=False)
    )
    return segments[-1].stop if tiles else -1


@functools.lru_cache(maxsize=1024)
def _segment_array(segments: tuple[ColumnSegment, ...]) -> np.ndarray:
    """``[nseg, 3]`` int32 (start, stop, core) for the native kernel (cached: never written)."""
    arr = np.array([(s.start, s.stop, s.core) for s in segments], dtype=np.int32)
    arr.flags.writeable = False
    return arr


def _i64(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A flat C-contiguous int64 array (the same memory when it already is one)."""
    a = t if isinstance(t, np.ndarray) else t.detach().numpy()
    return np.ascontiguousarray(a.reshape(-1), dtype=np.int64)


@functools.lru_cache(maxsize=256)
def dense_offsets(num_tokens: int, per_token: int) -> np.ndarray:
    """CSR offsets of ``num_tokens`` queries of ``per_token`` entries (cached, read-only)."""
    offs = np.arange(num_tokens + 1, dtype=np.int64) * per_token
    offs.flags.writeable = False
    return offs


def pre_value_activation(
    pre_values: torch.Tensor,
    indices: torch.Tensor,
    pre_input: torch.Tensor,
    *,
    offsets: torch.Tensor | None = None,
    gelu: bool = True,
) -> torch.Tensor:
    """``act[l] = GELU(pre_values[indices[l]] . pre_input[token(l)])``, shaped like ``indices``
    (dense ``[T, L]``: token ``t`` is row ``t``; flat ``[nnz]``: tokens from CSR ``offsets``).
    Differentiable in ``pre_values`` and ``pre_input``; ``gelu=False`` returns the dot product."""
    import torch
    import torch.nn.functional as F

    rows = pre_values[indices].to(pre_input.dtype)  # [T, L, P] dense, [nnz, P] flat
    if offsets is None:
        dots = torch.einsum("tlp,tp->tl", rows, pre_input)
    else:
        counts = torch.diff(offsets.to(torch.int64))
        token = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        dots = (rows * pre_input[token.to(pre_input.device)]).sum(-1)
    return F.gelu(dots) if gelu else dots


def native_plan(
    table: torch.Tensor | np.ndarray,
    segments: tuple[ColumnSegment, ...],
    num_cores: int,
    *,
    sum_segments: bool = False,
    backend: Backend = "auto",
    dtype: str | None = None,
    pre: torch.Tensor | np.ndarray | None = None,
    pre_gelu: bool = True,
) -> native.NativePlan | None:
    """The native kernel bound to ``table`` when it can pool it (CPU, a supported dtype,
    contiguous columns tiled by ``segments``), else ``None`` (``backend="native"``: raise,
    naming why). Shards build one per table at start and reuse it for every request.
    ``table``: a torch tensor, or a numpy array (``dtype="bfloat16"`` for bfloat16 bits held
    as ``uint16``; see :func:`.native.dtype_name`) — this needs no torch. ``pre``: the table's
    UltraMemV2 pre-values (same dtype), pooled in the same pass (:class:`.native.NativePlan`)."""
    why = None
    lib = native.library() if backend != "torch" else None
    if lib is None:
        why = "the native library is not available (see the log / ULTRAMEM_NATIVE)"
    else:
        device, ndim, shape, strides, _, _ = native.table_layout(table)
        name = native.dtype_name(table, dtype)
        if device != "cpu":
            why = "the table is not on the CPU"
        elif name not in lib.dtypes:
            why = f"table dtype {name} is not supported"
        elif ndim != 2 or strides[1] != 1:
            why = "table columns are not contiguous"
        elif _tiling_cols(segments) != shape[1]:
            why = "segments do not tile the table's columns"
    if why is None:
        out_cols = segments[0].width if sum_segments else shape[1]
        return native.NativePlan(
            lib, table, _segment_array(segments), num_cores, sum_segments, out_cols, dtype=name,
            pre=pre, pre_gelu=pre_gelu,
        )  # fmt: skip
    if backend == "native":
        raise RuntimeError(f"native gather-pool cannot run this call: {why}")
    return None


def _native_weights_ok(
    weights: torch.Tensor, table: torch.Tensor, backend: Backend, *pre: torch.Tensor | None
) -> bool:
    """Whether this call's weights let the native path run (float32 on the CPU, no autograd;
    ``pre``: the pre-values and pre_input, when given, likewise)."""
    import torch
    why = None
    given = [p for p in pre if p is not None]
    if weights.device.type != "cpu" or weights.dtype != torch.float32:
        why = f"weights must be float32 on the CPU (got {weights.dtype} on {weights.device})"
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (table, weights, *given)):
        why = "autograd needs the torch path"
    elif given and (
        pre[0].dtype != table.dtype
        or pre[1].dtype != torch.float32
        or any(t.device.type != "cpu" for t in given)
    ):
        why = "pre-values need the table's dtype and a float32 pre_input on the CPU"
    if why is not None and backend == "native":
        raise RuntimeError(f"native gather-pool cannot run this call: {why}")
    return why is None


def gather_pool(
    table: torch.Tensor,
    indices: torch.Tensor,
    blocks: torch.Tensor,
    weights: torch.Tensor,
    num_blocks: int,
    *,
    segments: tuple[ColumnSegment, ...] | None = None,
    offsets: torch.Tensor | None = None,
    sum_segments: bool = False,
    backend: Backend = "auto",
    pre_values: torch.Tensor | None = None,
    pre_input: torch.Tensor | None = None,
    pre_gelu: bool = True,
) -> torch.Tensor:
    """Weighted gather of ``table`` rows pooled per (token, IVE block).

    Args:
        table: ``[rows, cols]`` value table (or a shard's slice of one). Any float dtype; the
            result has ``weights``' dtype (half-precision tables accumulate in fp32 weights).
        indices: row ids into ``table``, ``[T, L]`` (dense) or ``[nnz]`` with ``offsets``.
        blocks: IVE block id of each entry, shaped like ``indices``, in ``[0, num_blocks)``.
        weights: per-core weights, ``indices.shape + (num_cores,)``.
        num_blocks: E, the number of pooled bins per token.
        segments: column segments of ``table`` and their cores; default: ``num_cores`` equal
            segments covering all columns (an unsharded MCS table).
        offsets: ``[T + 1]`` CSR offsets when ``indices`` is flat (ragged queries).
        sum_segments: add the segments together instead of concatenating them; used by merged
            (projector-folded) tables, where every segment is already a full ``D``-wide output.
        backend: ``"auto"`` (native where it applies, else torch), ``"torch"``, or ``"native"``
            (raises ``RuntimeError`` where the native path cannot run this call).
        pre_values: UltraMemV2 pre-values ``[rows, pre_vdim]`` (rows indexed like ``table``);
            with ``pre_input`` ``[T, pre_vdim]``, every entry's weights are scaled by
            ``GELU(pre_values[idx] . pre_input[token])`` first (``pre_gelu=False``: the dot).

    Returns:
        ``[T, num_blocks, cols]`` (or ``[T, num_blocks, seg_width]`` with ``sum_segments``).
    """
    import torch
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D [rows, cols], got shape {tuple(table.shape)}")
    num_cores = weights.shape[-1]
    cols = table.shape[1]
    if segments is None:
        segments = column_segments(0, cols, cols, num_cores)
    if offsets is None:
        if indices.dim() != 2:
            raise ValueError(f"dense indices must be [T, L], got shape {tuple(indices.shape)}")
        num_tokens, per_token = indices.shape
    else:
        num_tokens, per_token = offsets.numel() - 1, 0
    nseg = len(segments)
    width = segments[0].width
    equal = (
        all(s.width == width for s in segments)
        and segments[0].start == 0
        and segments[-1].stop == cols
        and all(a.stop == b.start for a, b in zip(segments, segments[1:], strict=False))
        and table.is_contiguous()
    )
    nnz = indices.numel()
    if nnz == 0:
        out_w = width if sum_segments else cols
        return torch.zeros(num_tokens, num_blocks, out_w, dtype=weights.dtype, device=table.device)
    if sum_segments and not equal:
        raise ValueError("sum_segments needs equal-width segments covering the table")
    if (pre_values is None) != (pre_input is None):
        raise ValueError("pre_values and pre_input go together (an UltraMemV2 table has both)")
    if pre_input is not None and tuple(pre_input.shape) != (num_tokens, pre_values.shape[1]):
        raise ValueError(
            f"pre_input must be [T, pre_vdim] = [{num_tokens}, {pre_values.shape[1]}], "
            f"got {list(pre_input.shape)}"
        )
    if backend == "auto" and not sum_segments and pre_values is None and torch.is_grad_enabled():
        if table.requires_grad or weights.requires_grad:  # training: native kernel + autograd
            from ultramem_dist.kernels.pool_grad import native_pool_with_grad

            out = native_pool_with_grad(
                table, indices, blocks, weights, num_blocks, segments, offsets
            )
            if out is not None:
                return out
    if backend != "torch" and _native_weights_ok(weights, table, backend, pre_values, pre_input):
        plan = native_plan(
            table, segments, num_cores, sum_segments=sum_segments, backend=backend,
            pre=pre_values, pre_gelu=pre_gelu,
        )  # fmt: skip
        if plan is not None:
            tok_off = dense_offsets(num_tokens, per_token) if offsets is None else _i64(offsets)
            w = np.ascontiguousarray(weights.detach().reshape(-1, num_cores).numpy())
            pre_in = None if pre_input is None else np.ascontiguousarray(pre_input.detach().numpy())
            out = plan.run(
                _i64(indices), _i64(blocks), w, tok_off, num_blocks, torch.get_num_threads(),
                pre_input=pre_in,
            )  # fmt: skip
            return torch.from_numpy(out)
    if pre_values is not None:
        assert pre_input is not None
        act = pre_value_activation(pre_values, indices, pre_input, offsets=offsets, gelu=pre_gelu)
        weights = weights * act.unsqueeze(-1)
    # Index bookkeeping is integer work on a few thousand entries: numpy does it with a
    # fraction of torch's per-call overhead. Weights stay torch (one differentiable gather).
    flat_w = weights.reshape(-1)  # entry j, core c -> j * num_cores + c
    idx = _np(indices).reshape(-1)
    blk = _np(blocks).reshape(-1)
    num_bags = num_tokens * num_blocks

    # 1. group entries by bag key token * E + block (tokens are already contiguous runs)
    if offsets is None:
        key = blk.reshape(num_tokens, per_token) + (np.arange(num_tokens) * num_blocks)[:, None]
        key = key.reshape(-1)
        offs = None
    else:
        offs = _np(offsets)
        tok = np.repeat(np.arange(num_tokens), np.diff(offs))
        key = tok * num_blocks + blk
    cores = np.array([s.core for s in segments], dtype=np.int64)
    seg_ids = np.arange(nseg)

    def bag(rows: torch.Tensor, ent_idx: np.ndarray, bag_off: np.ndarray, w_src: np.ndarray):
        ent_w = flat_w.index_select(0, torch.from_numpy(w_src).to(flat_w.device))
        return _weighted_bag(rows, ent_idx, bag_off, ent_w)

    if offs is not None and nseg > 1 and not sum_segments:
        # ragged, several segments: one stable sort of the (entry, segment) pairs by
        # (token, segment, block) gives the bag layout of step 2./3. below directly
        key3 = (key[:, None] + (seg_ids * num_blocks)[None, :]).reshape(-1)
        key3 += np.repeat(tok * ((nseg - 1) * num_blocks), nseg)
        perm = _stable_order(key3, num_bags * nseg)
        bag_off = np.zeros(num_bags * nseg, dtype=np.int64)
        np.cumsum(np.bincount(key3, minlength=num_bags * nseg)[:-1], out=bag_off[1:])
        rows = table.view(-1, width) if equal else table
        pair = perm // nseg  # the entry of every (entry, segment) pair, in bag order
        seg = perm - pair * nseg
        ent = idx[pair] * nseg + seg if equal else idx[pair]
        pooled = bag(rows, ent, bag_off, pair * num_cores + cores[seg])
        pooled = pooled.view(num_tokens, nseg, num_blocks, rows.shape[1])
        if equal:
            return pooled.transpose(1, 2).reshape(num_tokens, num_blocks, cols)
        parts = [pooled[:, k, :, sg.start : sg.stop] for k, sg in enumerate(segments)]
        return torch.cat(parts, dim=-1)

    order = _stable_order(key, num_bags)
    bag_start = np.zeros(num_bags, dtype=np.int64)
    np.cumsum(np.bincount(key, minlength=num_bags)[:-1], out=bag_start[1:])
    idx_s = idx[order]
    src = order * num_cores  # where each sorted entry's weights start in flat_w

    if nseg == 1 and segments[0].width == cols:  # one core's columns: a bag per (token, block)
        pooled = bag(table, idx_s, bag_start, src + cores[0])
        return pooled.view(num_tokens, num_blocks, cols)

    if equal:
        rows, row_w, ent_idx = table.view(-1, width), width, idx_s * nseg
    else:
        rows, row_w, ent_idx = table, cols, idx_s
    if sum_segments:  # 2. all segments of an entry stay in its (token, block) bag
        ent = (ent_idx[:, None] + seg_ids).reshape(-1)
        pooled = bag(rows, ent, bag_start * nseg, (src[:, None] + cores).reshape(-1))
        return pooled.view(num_tokens, num_blocks, row_w)

    # 2./3. dense: a token's entries repeated once per segment, bags in (token, segment, block)
    # order (ragged input took the equivalent one-sort route above)
    assert offs is None
    ent3 = ent_idx.reshape(num_tokens, 1, per_token)
    ent3 = ent3 + seg_ids[:, None] if equal else np.repeat(ent3, nseg, axis=1)
    ent = ent3.reshape(-1)
    w_src = (src.reshape(num_tokens, 1, per_token) + cores[:, None]).reshape(-1)
    tok_shift = np.arange(num_tokens) * ((nseg - 1) * per_token)
    seg_shift = (seg_ids * per_token)[None, :, None]
    bag_off = bag_start.reshape(num_tokens, 1, num_blocks) + tok_shift[:, None, None] + seg_shift
    pooled = bag(rows, ent, bag_off.reshape(-1), w_src)
    pooled = pooled.view(num_tokens, nseg, num_blocks, row_w)
    if equal:
        return pooled.transpose(1, 2).reshape(num_tokens, num_blocks, cols)
    parts = [pooled[:, k, :, s.start : s.stop] for k, s in enumerate(segments)]
    return torch.cat(parts, dim=-1)
