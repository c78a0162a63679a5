"""Seeded synthetic value stores for load, chaos and fuzz runs (no trained model needed).

The values follow the model's init scales (``N(0, 0.02)`` rows, ``1/sqrt(E*Dv)`` projector), so
pooled outputs have realistic magnitudes. The same seed always gives the same store.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ultramem_dist.store import TableSpec, export_tables

__all__ = ["SYNTHETIC_TABLES", "make_synthetic_store", "synthetic_spec"]

# table id -> (sharding, merged)
SYNTHETIC_TABLES: dict[str, tuple[str, bool]] = {
    "row": ("row", False),
    "dim": ("dim", False),
    "row_m": ("row", True),
    "dim_m": ("dim", True),
}


def synthetic_spec(
    n_rows: int = 4096,
    dv: int = 64,
    *,
    expansion: int = 4,
    num_cores: int = 2,
    d_model: int = 64,
    topm: int = 8,
    heads: int = 2,
    seed: int = 0,
) -> TableSpec:
    """One seeded UltraMem-like table."""
    g = torch.Generator().manual_seed(seed)
    return TableSpec(
        values=torch.randn(n_rows, dv, generator=g) * 0.02,
        expansion=expansion,
        num_cores=num_cores,
        topm=topm,
        heads=heads,
        d_model=d_model,
        out_proj=torch.randn(d_model, expansion * dv, generator=g) * (expansion * dv) ** -0.5,
        ive_perm=torch.randperm(expansion * n_rows, generator=g),
        ive_seed=seed,
    )


def make_synthetic_store(
    root: str | Path,
    *,
    shards: int = 2,
    tables: dict[str, tuple[str, bool]] | None = None,
    version: str = "v1",
    seed: int = 0,
    **spec_kwargs: int,
) -> Path:
    """Export seeded tables (default: row/dim x plain/merged) as ``root/version``."""
    layout = tables or SYNTHETIC_TABLES
    specs = {tid: synthetic_spec(seed=seed + i, **spec_kwargs) for i, tid in enumerate(layout)}
    export_tables(
        specs,
        root,
        shards=shards,
        by={tid: by for tid, (by, _) in layout.items()},
        merged={tid: merged for tid, (_, merged) in layout.items()},
        version=version,
    )
    return Path(root)
