"""The one weighted gather-pool kernel of ultramem-dist.

Both the in-process :class:`~ultramem_dist.model.ultramem.UltraMemLayer` and every remote value
shard call :func:`gather_pool`; there is no second copy of this math.

What it computes, for every query token ``t`` and IVE block ``e``::

    out[t, e, cols(s)] = sum_{l: token(l)=t, block(l)=e} w[l, core(s)] * table[idx[l], cols(s)]

where the table's columns are split into *segments* ``s`` and each segment belongs to one MCS
core (``core(s)``).  For an unsharded table with ``h_c`` cores there are ``h_c`` segments of
width ``Dv / h_c``; a dimension-sharded slice has the segments that intersect its column range.

Implementation: the table ``[rows, nseg * w]`` (equal-width segments) is viewed as
``[rows * nseg, w]`` so that (row, segment) is one contiguous embedding row.  Each lookup entry
becomes ``nseg`` entries ``row * nseg + s`` weighted by its core's score; entries are stably sorted
by bag key ``(token, block, segment)`` and reduced by a single
``torch.nn.functional.embedding_bag(mode="sum", per_sample_weights=...)`` call, which reads
exactly the bytes of the selected rows once.  Unequal segments (a dimension shard boundary that
cuts a core slice unevenly) fall back to one ``embedding_bag`` per segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ColumnSegment", "column_segments", "gather_pool"]


@dataclass(frozen=True)
class ColumnSegment:
    """A run of table columns ``[start, stop)`` (local to the table slice) scored by one core."""

    start: int
    stop: int
    core: int

    @property
    def width(self) -> int:
        return self.stop - self.start


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


def _bag_order(keys: torch.Tensor, num_bags: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable permutation that groups entries by bag key, and the bag offsets."""
    order = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys, minlength=num_bags)
    offsets = torch.zeros(num_bags, dtype=torch.long, device=keys.device)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    return order, offsets


def _weighted_bag(
    table: torch.Tensor,
    idx: torch.Tensor,
    bag_offsets: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``embedding_bag`` sum; a table stored in another dtype is converted row by row (only the
    gathered rows), so half-precision storage accumulates in the weights' precision."""
    if table.dtype != weights.dtype:
        table = table.index_select(0, idx).to(weights.dtype)
        idx = torch.arange(idx.numel(), device=idx.device)
    return F.embedding_bag(idx, table, bag_offsets, mode="sum", per_sample_weights=weights)


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

    Returns:
        ``[T, num_blocks, cols]`` (or ``[T, num_blocks, seg_width]`` with ``sum_segments``).
    """
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D [rows, cols], got shape {tuple(table.shape)}")
    num_cores = weights.shape[-1]
    if segments is None:
        segments = column_segments(0, table.shape[1], table.shape[1], num_cores)
    if offsets is None:
        if indices.dim() != 2:
            raise ValueError(f"dense indices must be [T, L], got shape {tuple(indices.shape)}")
        num_tokens, per_token = indices.shape
        token = torch.arange(num_tokens, device=indices.device).repeat_interleave(per_token)
    else:
        num_tokens = offsets.numel() - 1
        lengths = offsets[1:] - offsets[:-1]
        token = torch.repeat_interleave(torch.arange(num_tokens, device=indices.device), lengths)
    flat_idx = indices.reshape(-1).long()
    flat_blk = blocks.reshape(-1).long()
    flat_w = weights.reshape(-1, num_cores)
    out_dtype = weights.dtype
    widths = {s.width for s in segments}
    nseg = len(segments)
    contiguous = (
        len(widths) == 1
        and segments[0].start == 0
        and segments[-1].stop == table.shape[1]
        and all(a.stop == b.start for a, b in zip(segments, segments[1:], strict=False))
        and table.is_contiguous()
    )
    if flat_idx.numel() == 0:
        width = segments[0].width if sum_segments else table.shape[1]
        return torch.zeros(num_tokens, num_blocks, width, dtype=out_dtype, device=table.device)

    if contiguous:
        width = segments[0].width
        view = table.view(table.shape[0] * nseg, width)
        seg_ids = torch.arange(nseg, device=table.device)
        seg_cores = torch.tensor([s.core for s in segments], device=table.device)
        ent_idx = (flat_idx[:, None] * nseg + seg_ids[None, :]).reshape(-1)
        ent_w = flat_w[:, seg_cores].reshape(-1)
        bag = token * num_blocks + flat_blk
        if sum_segments:
            ent_bag = bag.repeat_interleave(nseg)
            num_bags = num_tokens * num_blocks
        else:
            ent_bag = (bag[:, None] * nseg + seg_ids[None, :]).reshape(-1)
            num_bags = num_tokens * num_blocks * nseg
        order, bag_offsets = _bag_order(ent_bag, num_bags)
        pooled = _weighted_bag(view, ent_idx[order], bag_offsets, ent_w[order])
        if sum_segments:
            return pooled.view(num_tokens, num_blocks, width)
        return pooled.view(num_tokens, num_blocks, nseg * width)

    # Unequal segments: one embedding_bag per segment on a column slice of the table.
    bag = token * num_blocks + flat_blk
    order, bag_offsets = _bag_order(bag, num_tokens * num_blocks)
    idx_sorted = flat_idx[order]
    parts = []
    for seg in segments:
        cols = table[:, seg.start : seg.stop]
        part = _weighted_bag(cols, idx_sorted, bag_offsets, flat_w[order, seg.core])
        parts.append(part.view(num_tokens, num_blocks, seg.width))
    if sum_segments:
        return torch.stack(parts).sum(0)
    return torch.cat(parts, dim=-1)
