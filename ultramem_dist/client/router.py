"""Split a batch of lookups across shards and reassemble the replies (no I/O).

Row-wise tables: every entry goes to the shard owning its row; each shard gets a ragged (CSR)
request holding only its entries, in the original token order, and answers a partial pool that
the client adds up. Dimension-wise tables: every shard gets the full request and answers its
column slice; the client concatenates the slices in column order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ultramem_dist.kernels import native
from ultramem_dist.kernels.gather_pool import dense_offsets

__all__ = [
    "ShardPart",
    "concat_columns",
    "host_array",
    "split_arrays",
    "split_by_owner",
    "split_for_wire",
    "sum_partials",
]


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


NpPart = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def split_arrays(
    ids: np.ndarray, blk: np.ndarray, w: np.ndarray, offs: np.ndarray, row_los: Sequence[int]
) -> list[NpPart | None]:
    """:func:`split_by_owner` on flat numpy arrays (``ids``/``blk`` ``[nnz]``, ``w``
    ``[nnz, h_c]``, int64 CSR ``offs``): per shard ``(ids, blk, w, offs)`` or ``None``."""
    bounds = [*row_los[1:], None]
    parts: list[NpPart | None] = []
    for k, (lo, hi) in enumerate(zip(row_los, bounds, strict=True)):
        # shard 0 also takes ids < 0 and the last shard ids >= N: the owner refuses them
        # with INVALID_ARGUMENT instead of the client silently dropping them.
        if k == 0 and hi is None:
            parts.append((ids, blk, w, offs))
            continue
        if k == 0:
            sel = np.flatnonzero(ids < hi)
        elif hi is None:
            sel = np.flatnonzero(ids >= lo)
        else:
            sel = np.flatnonzero((ids >= lo) & (ids < hi))
        if sel.size == 0:
            parts.append(None)
            continue
        # ``sel`` is ascending, so the owned entries keep token order and the shard's CSR
        # offsets are the number of owned entries before each query boundary.
        parts.append((ids[sel], blk[sel], w[sel], np.searchsorted(sel, offs)))
    return parts


def split_for_wire(
    ids: np.ndarray, blk: np.ndarray, w: np.ndarray, offs: np.ndarray, row_los: Sequence[int]
) -> list[NpPart | None]:
    """:func:`split_arrays` for requests about to be encoded: with the native library, one C
    call (``kernels/csrc/entries.c``) that also narrows ids and block ids to int32 and gives
    int32 offsets (the parts are then slices of one array per field); without it, or when an id
    does not fit int32, :func:`split_arrays` (the encoder narrows what fits). One shard always
    gets its part, even an empty one."""
    lib = native.library()
    if lib is not None:
        out = lib.split_rows(
            np.ascontiguousarray(ids, dtype=np.int64),
            np.ascontiguousarray(blk, dtype=np.int64),
            np.ascontiguousarray(w, dtype=np.float32),
            np.ascontiguousarray(offs, dtype=np.int64),
            np.asarray(row_los, dtype=np.int64),
        )
        if out is not None:
            ids32, blk32, w32, starts, offs32 = out
            bounds = starts.tolist()
            return [
                (ids32[a:b], blk32[a:b], w32[a:b], offs32[k])
                if b > a or len(row_los) == 1
                else None
                for k, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))
            ]
    return split_arrays(ids, blk, w, offs, row_los)


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
    if offsets is None:
        offs = dense_offsets(*indices.shape)
    else:
        offs = host_array(offsets).astype(np.int64, copy=False)
    num_cores = weights.shape[-1]
    parts = split_arrays(
        host_array(indices).reshape(-1),
        host_array(blocks).reshape(-1),
        host_array(weights).reshape(-1, num_cores),
        offs,
        row_los,
    )
    return [None if p is None else ShardPart(*map(torch.from_numpy, p)) for p in parts]


def host_array(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """``t`` as a numpy array on the host: an array as is, a CPU tensor as a view of its memory,
    anything else (a GPU tensor, one that needs grad) detached and copied to the host."""
    if isinstance(t, np.ndarray):
        return t
    if t.device.type == "cpu" and not t.requires_grad:
        return t.numpy()
    return t.detach().cpu().numpy()


# numpy, not torch: a torch op of this size runs on torch's thread pool, whose idle threads then
# spin for a while on cores the gRPC threads (and the shards, on one machine) need.
def sum_partials(
    partials: Sequence[torch.Tensor | np.ndarray], shape: Sequence[int]
) -> torch.Tensor:
    """Sum of row shards' partial pools (zeros of ``shape`` if no shard had entries); a new,
    writable tensor (the replies are read-only views)."""
    if not partials:
        return torch.zeros(tuple(shape), dtype=torch.float32)
    out = np.array(host_array(partials[0]), dtype=np.float32)
    for p in partials[1:]:
        out += host_array(p)
    return torch.from_numpy(out)


def concat_columns(slices: Sequence[torch.Tensor | np.ndarray]) -> torch.Tensor:
    """Dimension shards' column slices (in column order) joined along the last axis; a new,
    writable tensor."""
    return torch.from_numpy(np.concatenate([host_array(s) for s in slices], axis=-1))
