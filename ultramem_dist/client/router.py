"""Split a batch of lookups across shards and reassemble the replies (pure torch, no I/O).

Row-wise tables: every entry goes to the shard owning its row; each shard gets a ragged (CSR)
request holding only its entries, in the original token order, and answers a partial pool that
the client adds up. Dimension-wise tables: every shard gets the full request and answers its
column slice; the client concatenates the slices in column order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ultramem_dist.store.layout import owner_of

__all__ = ["ShardPart", "concat_columns", "split_by_owner", "sum_partials", "token_ids"]


@dataclass(frozen=True)
class ShardPart:
    """The entries of a batch one row shard owns, as a ragged query batch."""

    indices: torch.Tensor
    """``[nnz]`` global row ids."""
    blocks: torch.Tensor
    """``[nnz]`` IVE block ids."""
    weights: torch.Tensor
    """``[nnz, h_c]`` core weights."""
    offsets: torch.Tensor
    """``[T + 1]`` CSR offsets (int64)."""


def token_ids(num_tokens: int, per_token: int | None, offsets: torch.Tensor | None) -> torch.Tensor:
    """Token id of every flattened entry (dense ``[T, L]`` or CSR ``offsets``)."""
    base = torch.arange(num_tokens)
    if offsets is None:
        assert per_token is not None
        return base.repeat_interleave(per_token)
    return torch.repeat_interleave(base, offsets[1:] - offsets[:-1])


def split_by_owner(
    indices: torch.Tensor,
    blocks: torch.Tensor,
    weights: torch.Tensor,
    row_los: Sequence[int],
    *,
    offsets: torch.Tensor | None = None,
) -> list[ShardPart | None]:
    """Per row shard, the entries it owns (``None`` for a shard that owns none of them).

    Args:
        indices: ``[T, L]`` global row ids, or ``[nnz]`` with ``offsets``.
        blocks: same shape as ``indices``.
        weights: ``indices.shape + (h_c,)``.
        row_los: first row of every shard, ascending, ``row_los[0] == 0``.
        offsets: ``[T + 1]`` CSR offsets when ``indices`` is flat.
    """
    num_cores = weights.shape[-1]
    if offsets is None:
        num_tokens, per_token = indices.shape
    else:
        num_tokens, per_token = offsets.numel() - 1, None
    flat_idx = indices.reshape(-1)
    flat_blk = blocks.reshape(-1)
    flat_w = weights.reshape(-1, num_cores)
    owner = owner_of(flat_idx, row_los)
    tokens = token_ids(num_tokens, per_token, None if offsets is None else offsets.long())
    # A stable sort groups entries by owner and keeps token order inside each group (valid CSR).
    order = torch.sort(owner, stable=True).indices
    counts = torch.bincount(owner, minlength=len(row_los)).tolist()
    parts: list[ShardPart | None] = []
    start = 0
    for count in counts:
        if count == 0:
            parts.append(None)
            continue
        sel = order[start : start + count]
        start += count
        offs = torch.zeros(num_tokens + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(tokens[sel], minlength=num_tokens), 0, out=offs[1:])
        parts.append(ShardPart(flat_idx[sel], flat_blk[sel], flat_w[sel], offs))
    return parts


def sum_partials(partials: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """Sum of row shards' partial pools (zeros of ``shape`` if no shard had entries)."""
    out = torch.zeros(tuple(shape), dtype=torch.float32)
    for p in partials:
        out += p
    return out


def concat_columns(slices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dimension shards' column slices (in column order) joined along the last axis."""
    if len(slices) == 1:
        return slices[0].clone()
    return torch.cat(list(slices), dim=-1)
