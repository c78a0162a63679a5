"""Shard layouts: which rows or columns of a table each shard owns (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "column_ranges",
    "is_core_aligned",
    "owner_of",
    "row_ranges",
]


def row_ranges(n_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, balanced row ranges ``[lo, hi)``: shard ``k`` owns ``[k*N//S, (k+1)*N//S)``."""
    if num_shards < 1:
        raise ValueError(f"need at least one shard, got {num_shards}")
    if n_rows < num_shards:
        raise ValueError(f"cannot split {n_rows} rows into {num_shards} non-empty row shards")
    return [(k * n_rows // num_shards, (k + 1) * n_rows // num_shards) for k in range(num_shards)]


def column_ranges(width: int, num_shards: int, num_cores: int = 1) -> list[tuple[int, int]]:
    """Balanced column ranges ``[lo, hi)`` of a ``width``-wide table over ``num_shards`` shards.

    Boundaries align to MCS core boundaries (multiples of ``width / num_cores``) when the shard
    count allows it, so every shard's slice lies in whole cores or inside one core (one equal-width
    segment each; the kernel's single-``embedding_bag`` path):

    * ``num_shards`` a multiple of ``num_cores`` and the core width divisible by
      ``num_shards / num_cores``: each core is cut into equal pieces;
    * ``num_cores`` a multiple of ``num_shards``: each shard gets ``num_cores / num_shards`` whole
      cores;
    * otherwise an even split ``round(k * width / S)`` (some shard then straddles a core boundary
      with unequal segments, served by the kernel's slower per-segment path).
    """
    if num_shards < 1:
        raise ValueError(f"need at least one shard, got {num_shards}")
    if width < num_shards:
        raise ValueError(f"cannot split {width} columns into {num_shards} non-empty column shards")
    if num_cores < 1 or width % num_cores:
        raise ValueError(f"width {width} is not divisible by {num_cores} cores")
    core_w = width // num_cores
    if num_shards % num_cores == 0 and core_w % (num_shards // num_cores) == 0:
        piece = core_w // (num_shards // num_cores)
        return [(k * piece, (k + 1) * piece) for k in range(num_shards)]
    if num_cores % num_shards == 0:
        per = num_cores // num_shards * core_w
        return [(k * per, (k + 1) * per) for k in range(num_shards)]
    bounds = [round(k * width / num_shards) for k in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def is_core_aligned(ranges: Sequence[tuple[int, int]], width: int, num_cores: int) -> bool:
    """True if no range cuts a core slice unevenly (each range within one core or whole cores)."""
    core_w = width // num_cores
    for lo, hi in ranges:
        whole = lo % core_w == 0 and hi % core_w == 0
        inside = lo // core_w == (hi - 1) // core_w
        if not (whole or inside):
            return False
    return True


def owner_of(ids: torch.Tensor, row_los: Sequence[int]) -> torch.Tensor:
    """Shard index owning each global row id, given the sorted start rows of every shard."""
    import torch  # the client's; the store's readers need no torch

    bounds = torch.tensor(list(row_los[1:]), dtype=ids.dtype)
    return torch.bucketize(ids, bounds, right=True)
