"""Export value tables as a sharded, checksummed store version.

Library entry points: :func:`export_tables` (from in-memory tensors; what tests use) and
:func:`export_checkpoint` (from a ``config.json`` + ``model.safetensors`` checkpoint directory).
A version is written into a scratch directory and renamed into place, then ``LATEST`` is
replaced atomically, so a reader never sees a half-written version.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from ultramem_dist.errors import ExportError
from ultramem_dist.store.manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SCHEMA_VERSION_SHARED,
    STORAGE_DTYPES,
    FileEntry,
    Manifest,
    ShardSlot,
    SharedLayer,
    TableEntry,
    check_version_id,
)
from ultramem_dist.store.merge import fold_projector
from ultramem_dist.store.perms import apply_umask
from ultramem_dist.store.planner import CostConstants, TableShape, plan_table

__all__ = [
    "TableSpec",
    "export_checkpoint",
    "export_tables",
    "sha256_file",
    "shared_table_spec",
]

ShardByArg = Literal["row", "dim", "auto"]
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
IVE_FILE = "ive_perm.safetensors"


@dataclass
class TableSpec:
    """One memory layer's value table and the dimensions the service needs."""

    values: torch.Tensor
    """``[N, Dv]`` physical value rows."""
    expansion: int
    """E, IVE blocks."""
    num_cores: int
    """h_c, MCS cores (``Dv % h_c == 0``)."""
    topm: int
    """m, entries per head per token."""
    heads: int
    """H, memory heads."""
    d_model: int
    """D, the model width (merged output width)."""
    out_proj: torch.Tensor | None = None
    """``[D, E*Dv]`` projector weight; required for merged export."""
    ive_perm: torch.Tensor | None = None
    """int64 ``[E*N]`` IVE permutation, stored with the version for provenance."""
    ive_seed: int | None = None
    layer: int = 0
    pre_values: torch.Tensor | None = None
    """UltraMemV2: ``[N, pre_vdim]`` pre-values stored with the (shared) table."""
    shared_layers: tuple[tuple[int, int, int, torch.Tensor], ...] = ()
    """UltraMemV2: ``(layer, offset, n_rows, ive_perm)`` of every layer sharing the table."""
    pre_gelu: bool = True
    """UltraMemV2: GELU on the pre-value dot product (False: the dot product scales as is)."""

    def shape(self, merged: bool, storage_bytes: int) -> TableShape:
        n, dv = self.values.shape
        return TableShape(
            n_rows=n,
            dv=dv,
            expansion=self.expansion,
            num_cores=self.num_cores,
            topm=self.topm,
            heads=self.heads,
            d_model=self.d_model,
            merged=merged,
            storage_bytes=storage_bytes,
            pre_vdim=0 if self.pre_values is None else int(self.pre_values.shape[1]),
        )


def sha256_file(path: Path, chunk: int = 1 << 22) -> tuple[str, int]:
    """Hex sha256 and byte size of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


def _check_spec(table_id: str, spec: TableSpec, merged: bool) -> None:
    v = spec.values
    if v.dim() != 2 or not v.is_floating_point():
        raise ExportError(
            f"table {table_id!r}: values must be a 2-D float tensor, got {v.dtype} {list(v.shape)}"
        )
    n, dv = v.shape
    for name in ("expansion", "num_cores", "topm", "heads", "d_model"):
        if getattr(spec, name) < 1:
            raise ExportError(f"table {table_id!r}: {name} must be >= 1")
    if dv % spec.num_cores:
        raise ExportError(f"table {table_id!r}: Dv={dv} is not divisible by h_c={spec.num_cores}")
    if not torch.isfinite(v).all():
        raise ExportError(f"table {table_id!r}: values contain NaN or Inf")
    if spec.ive_perm is not None and tuple(spec.ive_perm.shape) != (spec.expansion * n,):
        raise ExportError(
            f"table {table_id!r}: IVE permutation must have E*N={spec.expansion * n} entries"
        )
    shared = spec.pre_values is not None or bool(spec.shared_layers)
    if shared and (merged or spec.expansion != 1):
        raise ExportError(
            f"table {table_id!r}: a shared (UltraMemV2) table is exported unmerged with E=1"
        )
    if spec.pre_values is not None and (
        spec.pre_values.dim() != 2 or spec.pre_values.shape[0] != n
    ):
        raise ExportError(
            f"table {table_id!r}: pre_values must be [N={n}, pre_vdim], "
            f"got {list(spec.pre_values.shape)}"
        )
    for layer, offset, rows, perm in spec.shared_layers:
        if not (0 <= offset < n and 1 <= rows <= n) or perm.dim() != 1:
            raise ExportError(f"table {table_id!r}: layer {layer} offset/rows/permutation invalid")
    if merged:
        if spec.out_proj is None:
            raise ExportError(
                f"table {table_id!r}: merged export needs the projector weight (out_proj)"
            )
        if tuple(spec.out_proj.shape) != (spec.d_model, spec.expansion * dv):
            raise ExportError(
                f"table {table_id!r}: out_proj is {list(spec.out_proj.shape)}, "
                f"expected [{spec.d_model}, {spec.expansion * dv}]"
            )


def _default_version(config_hash: str) -> str:
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"v{stamp}-{config_hash[:8] or 'tables'}"


def _slice(
    spec: TableSpec, merged: bool, rows: tuple[int, int], cols: tuple[int, int]
) -> torch.Tensor:
    if merged:
        assert spec.out_proj is not None
        return fold_projector(
            spec.values.detach(), spec.out_proj.detach(), spec.expansion, spec.num_cores, rows, cols
        )
    return spec.values.detach()[rows[0] : rows[1], cols[0] : cols[1]]


def export_tables(
    tables: Mapping[str, TableSpec],
    out: str | Path,
    *,
    shards: int,
    by: ShardByArg | Mapping[str, ShardByArg] = "auto",
    merged: bool | Mapping[str, bool] = False,
    dtype: str = "float32",
    version: str | None = None,
    model_id: str = "",
    config_hash: str = "",
    set_latest: bool = True,
    constants: CostConstants | None = None,
) -> Manifest:
    """Write ``tables`` as store version ``version`` under ``out``; returns its manifest.

    ``by`` and ``merged`` may be given per table id (a mapping) or for all tables.
    """
    if not tables:
        raise ExportError("nothing to export: no value tables")
    if dtype not in STORAGE_DTYPES:
        raise ExportError(f"unknown storage dtype {dtype!r}; expected one of {STORAGE_DTYPES}")
    if shards < 1:
        raise ExportError(f"--shards must be >= 1, got {shards}")
    torch_dtype = _TORCH_DTYPES[dtype]
    storage_bytes = torch.empty((), dtype=torch_dtype).element_size()
    if not config_hash:
        config_hash = _tables_hash(tables)
    version = check_version_id(version or _default_version(config_hash))
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise ExportError(
            f"store version {version!r} already exists at {final}; versions are immutable"
        )

    entries: list[TableEntry] = []
    shard_tensors: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    ive_tensors: dict[str, torch.Tensor] = {}
    for layer_pos, (table_id, spec) in enumerate(tables.items()):
        is_merged = merged[table_id] if isinstance(merged, Mapping) else merged
        how = by[table_id] if isinstance(by, Mapping) else by
        _check_spec(table_id, spec, is_merged)
        shape = spec.shape(is_merged, storage_bytes)
        try:
            plan = plan_table(shape, shards, how, constants)
        except ValueError as exc:
            raise ExportError(f"table {table_id!r}: {exc}") from None
        slots = []
        for k, rng in enumerate(plan.ranges):
            if plan.by == "row":
                rows, cols = rng, (0, shape.out_width)
            else:
                rows, cols = (0, shape.n_rows), rng
            part = _slice(spec, is_merged, rows, cols).to(torch_dtype, copy=True).contiguous()
            shard_tensors[k][table_id] = part
            if spec.pre_values is not None:
                # row-sharded: the slot's rows; dim-sharded: whole on every shard (the
                # pre-value dot needs every pre_vdim column before its activation)
                pre = spec.pre_values.detach()[rows[0] : rows[1]]
                shard_tensors[k][f"{table_id}.pre_values"] = pre.to(torch_dtype, copy=True)
            slots.append(
                ShardSlot(
                    shard=k,
                    row_lo=rows[0],
                    row_hi=rows[1],
                    col_lo=cols[0],
                    col_hi=cols[1],
                    file=f"shard-{k:05d}-of-{shards:05d}.safetensors",
                    tensor=table_id,
                    shape=(part.shape[0], part.shape[1]),
                )
            )
        if spec.ive_perm is not None:
            ive_tensors[table_id] = spec.ive_perm.detach().to(torch.int64, copy=True).contiguous()
        shared_layers = []
        for layer, offset, rows_n, perm in spec.shared_layers:
            name = f"{table_id}.layer{layer}"
            ive_tensors[name] = perm.detach().to(torch.int64, copy=True).contiguous()
            shared_layers.append(SharedLayer(layer, offset, rows_n, name))
        has_ive = spec.ive_perm is not None or bool(shared_layers)
        entries.append(
            TableEntry(
                table_id=table_id,
                layer=spec.layer or layer_pos,
                n_rows=shape.n_rows,
                dv=shape.dv,
                expansion=spec.expansion,
                num_cores=spec.num_cores,
                d_model=spec.d_model,
                topm=spec.topm,
                heads=spec.heads,
                merged=is_merged,
                sharding=plan.by,
                shards=tuple(slots),
                ive_file=IVE_FILE if has_ive else None,
                ive_tensor=table_id if spec.ive_perm is not None else None,
                ive_seed=spec.ive_seed,
                plan={"requested": how, **plan.to_json()},
                pre_vdim=0 if spec.pre_values is None else int(spec.pre_values.shape[1]),
                pre_tensor=None if spec.pre_values is None else f"{table_id}.pre_values",
                shared_layers=tuple(shared_layers),
                pre_activation="gelu" if spec.pre_gelu else "none",
            )
        )

    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=root))
    try:
        files: dict[str, FileEntry] = {}
        meta = {"format": "ultramem-dist/value-store", "version": version}
        for k, tensors in enumerate(shard_tensors):
            name = f"shard-{k:05d}-of-{shards:05d}.safetensors"
            save_file(tensors, str(scratch / name), metadata={**meta, "shard": str(k)})
            apply_umask(scratch / name)
            files[name] = FileEntry(*sha256_file(scratch / name))
        if ive_tensors:
            save_file(ive_tensors, str(scratch / IVE_FILE), metadata=meta)
            apply_umask(scratch / IVE_FILE)
            files[IVE_FILE] = FileEntry(*sha256_file(scratch / IVE_FILE))
        manifest = Manifest(
            version=version,
            model_id=model_id,
            config_hash=config_hash,
            num_shards=shards,
            dtype=dtype,
            tables=tuple(entries),
            files=files,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            schema_version=(
                SCHEMA_VERSION_SHARED if any(e.is_shared for e in entries) else SCHEMA_VERSION
            ),
        )
        manifest.validate()
        (scratch / MANIFEST_NAME).write_text(manifest.dumps())
        apply_umask(scratch)
        os.rename(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if set_latest:
        _write_latest(root, version)
    return manifest


def _write_latest(root: Path, version: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".LATEST-", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write(version + "\n")
    apply_umask(tmp)
    os.replace(tmp, root / LATEST_NAME)


def _tables_hash(tables: Mapping[str, TableSpec]) -> str:
    desc = {
        tid: {
            "shape": list(s.values.shape),
            "E": s.expansion,
            "h_c": s.num_cores,
            "m": s.topm,
            "H": s.heads,
            "D": s.d_model,
        }
        for tid, s in tables.items()
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    shards: int,
    by: ShardByArg = "auto",
    merged: bool = False,
    dtype: str = "float32",
    version: str | None = None,
) -> Manifest:
    """Export every memory layer of a checkpoint directory (``config.json`` + weights)."""
    ckpt = Path(checkpoint)
    config_path = ckpt / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{ckpt} is not a checkpoint directory (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{config_path} is not valid JSON: {exc}") from None
    model_cfg = config.get("model", config) if isinstance(config, dict) else {}
    kind = str(model_cfg.get("kind", "unknown"))
    if kind not in ("ultramem", "ultramemv2"):
        raise ExportError(
            f"checkpoint {ckpt} is a {kind!r} model; only 'ultramem' models have value tables "
            "to export (and UltraMemV2 'ultramemv2' models: one shared table)"
        )
    config_hash = str(
        config.get("config_hash")
        or hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    )
    try:
        from ultramem_dist.model import UltraMemLayer, load_pretrained
    except ImportError as exc:  # pragma: no cover - the model package ships with the project
        raise ExportError(f"cannot load checkpoints: {exc}") from None
    try:
        model = load_pretrained(ckpt, allow_memory_only=True)  # tables need no backbone
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot load checkpoint {ckpt}: {exc}") from None
    model_id = str(model_cfg.get("model_id") or ckpt.resolve().name)
    if kind == "ultramemv2":
        if merged:
            raise ExportError(
                "UltraMemV2 tables cannot be exported merged: every layer has its own projector "
                "over one shared table"
            )
        return export_tables(
            {"shared": shared_table_spec(model)},
            out,
            shards=shards,
            by=by,
            dtype=dtype,
            version=version,
            model_id=model_id,
            config_hash=config_hash,
        )
    layers = [m for m in getattr(model, "memory_layers", []) if isinstance(m, UltraMemLayer)]
    if not layers:
        raise ExportError(f"checkpoint {ckpt} has no UltraMem memory layers to export")
    specs: dict[str, TableSpec] = {}
    for i, layer in enumerate(layers):
        cfg = layer.cfg
        specs[layer.table_id or f"mem{i}"] = TableSpec(
            values=layer.values.detach(),
            expansion=int(cfg.expansion),
            num_cores=int(cfg.num_cores),
            topm=int(cfg.topm),
            heads=int(cfg.heads),
            d_model=int(layer.d_model),
            out_proj=None if layer.out_proj is None else layer.out_proj.weight.detach(),
            ive_perm=layer.ive_perm,
            ive_seed=int(cfg.perm_seed),
            layer=i,
        )
    return export_tables(
        specs,
        out,
        shards=shards,
        by=by,
        merged=merged,
        dtype=dtype,
        version=version,
        model_id=model_id,
        config_hash=config_hash,
    )


def shared_table_spec(model: object) -> TableSpec:
    """The one shared table of an UltraMemV2 :class:`~ultramem_dist.model.MemoryLM`."""
    table = getattr(model, "shared_table", None)
    layers = list(getattr(model, "v2_layers", []))
    if table is None or not layers:
        raise ExportError("model has no UltraMemV2 shared value table")
    cfg = layers[0].cfg
    pre = table.pre_values.detach() if table.pre_values.shape[1] > 0 else None
    return TableSpec(
        values=table.values.detach(),
        expansion=1,
        num_cores=int(cfg.num_cores),
        topm=int(cfg.topm),
        heads=int(cfg.heads),
        d_model=int(layers[0].d_model),
        pre_values=pre,
        pre_gelu=bool(cfg.pre_gelu),
        shared_layers=tuple(
            (int(m.layer_index), int(m.offset), int(m.n_rows), m.ive_perm) for m in layers
        ),
    )
