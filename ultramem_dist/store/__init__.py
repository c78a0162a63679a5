"""Sharded, checksummed, memory-mapped value-table store (export, manifest, load)."""

from typing import Any

from ultramem_dist.store.manifest import Manifest, ShardSlot, TableEntry
from ultramem_dist.store.planner import CostConstants, Plan, TableShape, plan_table
from ultramem_dist.store.reader import (
    ShardSlice,
    ShardTable,
    load_shard,
    open_manifest,
    resolve_version,
    verify_store,
)

__all__ = [
    "CostConstants",
    "Manifest",
    "Plan",
    "ShardSlice",
    "ShardSlot",
    "ShardTable",
    "TableEntry",
    "TableShape",
    "TableSpec",
    "export_checkpoint",
    "export_tables",
    "load_shard",
    "open_manifest",
    "plan_table",
    "resolve_version",
    "verify_store",
]


def __getattr__(name: str) -> Any:
    # the exporter needs torch; a shard reading the store must not import it
    if name in ("TableSpec", "export_checkpoint", "export_tables"):
        from ultramem_dist.store import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
