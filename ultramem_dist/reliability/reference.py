"""Expected answers for load, chaos and fuzz checks, computed locally from the store files.

:class:`StoreReference` reassembles every table of a store version from its (sha256-verified)
shard files into one full table and computes the pooled output of a batch with the shared
kernel :func:`ultramem_dist.kernels.gather_pool` — independently of the client's split/merge
logic and of any server. It also computes each shard's *contribution* (row sharding: the pool
of the entries that shard owns; dim sharding: the full answer restricted to that shard's
columns), which is what :func:`classify` needs to recognise a partial answer.

Definitions used by every report:

* **ok** — the answer has the expected shape and equals the reference (within float tolerance).
* **partial** — the answer's shape/coverage is wrong (missing columns, tokens or blocks), or
  the answer equals the sum of the contributions of a *proper* subset of the shards (a row-
  sharded sum missing a shard's partial, a dim-sharded answer with a shard's columns absent/zero),
  while the full answer differs from it.
* **wrong** — anything else that is not ``ok`` (bad values, NaN, another table's answer...).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from ultramem_dist.kernels import gather_pool
from ultramem_dist.store.manifest import Manifest, TableEntry
from ultramem_dist.store.merge import merged_segments
from ultramem_dist.store.reader import load_shard, open_manifest

__all__ = ["OK", "PARTIAL", "WRONG", "Expected", "StoreReference", "TableReference", "classify"]

OK, PARTIAL, WRONG = "ok", "partial", "wrong"
RTOL, ATOL = 1e-4, 1e-5
_MAX_SUBSET_SHARDS = 8


@dataclass(frozen=True)
class Expected:
    """The reference answer of one batch and each shard's contribution to it."""

    total: torch.Tensor
    parts: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class TableReference:
    """One full (reassembled) table and how it is sharded."""

    entry: TableEntry
    values: torch.Tensor
    """Unmerged: ``[N, Dv]``. Merged: ``[E*N, h_c*D]`` (row ``p*N + j``, core-major columns)."""

    @property
    def num_shards(self) -> int:
        return len(self.entry.shards)

    def _pool(self, indices: torch.Tensor, blocks: torch.Tensor, weights: torch.Tensor):
        e = self.entry
        if not e.merged:
            return gather_pool(self.values, indices, blocks, weights, e.expansion)
        rows = blocks.to(torch.int64) * e.n_rows + indices.to(torch.int64)
        out = gather_pool(
            self.values,
            rows,
            torch.zeros_like(rows),
            weights,
            1,
            segments=merged_segments(e.d_model, e.num_cores),
            sum_segments=True,
        )
        return out.reshape(indices.shape[0], e.d_model)

    def expected(
        self, indices: torch.Tensor, blocks: torch.Tensor, weights: torch.Tensor
    ) -> Expected:
        """Reference pooled output of ``[T, L]`` queries, and the per-shard contributions."""
        weights = weights.to(torch.float32)
        total = self._pool(indices, blocks, weights)
        parts = []
        for slot in self.entry.shards:
            if self.entry.sharding == "row":
                owned = (indices >= slot.row_lo) & (indices < slot.row_hi)
                parts.append(self._pool(indices, blocks, weights * owned.unsqueeze(-1)))
            else:
                part = torch.zeros_like(total)
                part[..., slot.col_lo : slot.col_hi] = total[..., slot.col_lo : slot.col_hi]
                parts.append(part)
        return Expected(total, tuple(parts))


class StoreReference:
    """Every table of one store version, reassembled in memory (meant for test-size stores)."""

    def __init__(self, store: str | Path, version: str | None = None) -> None:
        _, manifest = open_manifest(store, version)
        self.manifest: Manifest = manifest
        shards = [load_shard(store, k, manifest.version) for k in range(manifest.num_shards)]
        self.tables: dict[str, TableReference] = {}
        for entry in manifest.tables:
            slices = [shards[s.shard].tables[entry.table_id].values for s in entry.shards]
            self.tables[entry.table_id] = TableReference(entry, _reassemble(entry, slices))

    @property
    def version(self) -> str:
        return self.manifest.version

    def table(self, table_id: str) -> TableReference:
        try:
            return self.tables[table_id]
        except KeyError:
            raise KeyError(
                f"table {table_id!r} is not in store version {self.version!r}; "
                f"tables: {sorted(self.tables)}"
            ) from None


def _reassemble(entry: TableEntry, slices: list[torch.Tensor]) -> torch.Tensor:
    if len(slices) == 1:
        return slices[0]
    if not entry.merged:
        return torch.cat(slices, dim=0 if entry.sharding == "row" else 1)
    e, hc = entry.expansion, entry.num_cores
    if entry.sharding == "row":  # shard rows are p*(hi-lo) + (j-lo): interleave the blocks
        views = [s.reshape(e, s.shape[0] // e, s.shape[1]) for s in slices]
        full = torch.cat(views, dim=1)
        return full.reshape(e * entry.n_rows, full.shape[-1])
    views = [s.reshape(s.shape[0], hc, s.shape[1] // hc) for s in slices]  # core-major columns
    full = torch.cat(views, dim=2)
    return full.reshape(full.shape[0], hc * entry.d_model)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=RTOL, atol=ATOL))


def classify(answer: torch.Tensor, want: Expected) -> str:
    """``ok``, ``partial`` or ``wrong`` (see the module docstring for the definitions)."""
    if tuple(answer.shape) != tuple(want.total.shape):
        return PARTIAL
    answer = answer.to(torch.float32)
    if not bool(torch.isfinite(answer).all()):
        return WRONG
    if _close(answer, want.total):
        return OK
    n = len(want.parts)
    if n <= _MAX_SUBSET_SHARDS:
        for r in range(n):  # proper subsets, including the empty one (an all-zero answer)
            for subset in itertools.combinations(range(n), r):
                acc = torch.zeros_like(want.total)
                for k in subset:
                    acc += want.parts[k]
                if _close(answer, acc):
                    return PARTIAL
    return WRONG
