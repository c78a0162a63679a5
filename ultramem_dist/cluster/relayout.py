"""Re-split a stored table version into another shard count (for ``scale --shards``).

The full tables are reassembled from the verified, memory-mapped shard slices of the source
version (row slices stacked, column slices concatenated) and written as a *new* store version
``<source>-s<S><r|d>`` with the requested layout. A new version id is what makes a reshard safe:
clients pin the version in every request, so no answer can mix the two layouts.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from ultramem_dist.store.export import TableSpec, export_tables
from ultramem_dist.store.manifest import Manifest
from ultramem_dist.store.reader import load_shard, open_manifest, resolve_inside

_SUFFIX = re.compile(r"-s\d+[rda]$")


def relayout_version_id(version: str, shards: int, by: str) -> str:
    """``v1`` → ``v1-s3r``; relayouts replace the suffix (``v1-s3r`` → ``v1-s2d``)."""
    return f"{_SUFFIX.sub('', version)}-s{shards}{by[0]}"


def _full_table(store: str | Path, manifest: Manifest, table_id: str) -> torch.Tensor:
    slices = [
        load_shard(store, k, manifest.version).tables[table_id] for k in range(manifest.num_shards)
    ]
    entry = slices[0].entry
    if entry.merged:
        raise ValueError(
            f"table {table_id} of version {manifest.version} is stored merged (projector folded); "
            "re-export it from the checkpoint with `ultramem-dist export --shards S` instead"
        )
    parts = [s.values.float() for s in slices]
    return torch.cat(parts, dim=0 if entry.sharding == "row" else 1)


def relayout(store: str | Path, version: str, shards: int, by: str = "auto") -> str:
    """Write ``version`` re-split into ``shards`` shards; returns the new version id (reused if
    it already exists)."""
    vdir, manifest = open_manifest(store, version)
    if manifest.num_shards == shards and by in ("auto", manifest.tables[0].sharding):
        return manifest.version
    new_version = relayout_version_id(manifest.version, shards, by if by != "auto" else "a")
    if (Path(store) / new_version / "manifest.json").is_file():
        return new_version
    specs: dict[str, TableSpec] = {}
    for t in manifest.tables:
        perm = None
        if t.ive_file is not None and t.ive_tensor is not None:
            with safe_open(str(resolve_inside(vdir, t.ive_file)), framework="pt") as f:
                perm = f.get_tensor(t.ive_tensor)
        specs[t.table_id] = TableSpec(
            values=_full_table(store, manifest, t.table_id),
            expansion=t.expansion,
            num_cores=t.num_cores,
            topm=t.topm,
            heads=t.heads,
            d_model=t.d_model,
            ive_perm=perm,
            ive_seed=t.ive_seed,
            layer=t.layer,
        )
    export_tables(
        specs,
        store,
        shards=shards,
        by=by,
        dtype=manifest.dtype,
        version=new_version,
        model_id=manifest.model_id,
        config_hash=manifest.config_hash,
        set_latest=False,
    )
    return new_version
