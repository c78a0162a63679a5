"""``ultramem-dist export``: write a checkpoint's value tables as a sharded store version."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from ultramem_dist.cli.app import app, console, fail


class ShardBy(StrEnum):
    row = "row"
    dim = "dim"
    auto = "auto"


class StorageDtype(StrEnum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (config.json + weights)."),
    out: Path = typer.Option(..., "--out", help="Store root directory (created if missing)."),
    shards: int = typer.Option(1, "--shards", min=1, help="Number of shards S."),
    by: ShardBy = typer.Option(ShardBy.auto, "--by", help="Row-wise, dimension-wise or planned."),
    merged: bool = typer.Option(
        False, "--merged/--no-merged", help="Fold the IVE projectors into the rows."
    ),
    dtype: StorageDtype = typer.Option(
        StorageDtype.bfloat16,
        "--dtype",
        help="Storage dtype (bfloat16: the serving default, half the bytes; float32: exact).",
    ),
    version: str | None = typer.Option(None, "--version", help="Version id (default: timestamp)."),
) -> None:
    """Export every UltraMem value table of CHECKPOINT into OUT/<version>/ (LATEST -> it)."""
    from ultramem_dist.errors import UltraMemError
    from ultramem_dist.store import export_checkpoint

    try:
        manifest = export_checkpoint(
            checkpoint,
            out,
            shards=shards,
            by=by.value,
            merged=merged,
            dtype=dtype.value,
            version=version,
        )
    except UltraMemError as exc:
        fail(str(exc), 2)
    console.print(
        f"exported {len(manifest.tables)} table(s) of {manifest.model_id or 'model'} as version "
        f"[bold]{manifest.version}[/] ({manifest.num_shards} shard(s), {manifest.dtype}) to {out}"
    )
    for t in manifest.tables:
        ranges = [
            (s.row_lo, s.row_hi) if t.sharding == "row" else (s.col_lo, s.col_hi) for s in t.shards
        ]
        kind = "merged " if t.merged else ""
        console.print(f"  {t.table_id}: {kind}{t.sharding}-wise N={t.n_rows} Dv={t.dv} {ranges}")
    print(manifest.version)
