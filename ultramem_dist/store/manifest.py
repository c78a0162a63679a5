"""``manifest.json`` of one store version: schema, (de)serialisation, validation, path safety.

A store directory looks like::

    STORE/
      LATEST                          # text: the current version id
      <version>/
        manifest.json                 # this schema
        ive_perm.safetensors          # IVE permutation of every table (int64 [E*N]) if known
        shard-00000-of-00002.safetensors
        shard-00001-of-00002.safetensors

Every file a manifest names is relative to its version directory, checked by
:func:`resolve_inside` to never escape it, and carries a sha256 and byte size.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ultramem_dist.errors import ManifestError, StorePathError

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_SHARED",
    "SharedLayer",
    "FileEntry",
    "Manifest",
    "ShardSlot",
    "TableEntry",
    "check_version_id",
    "resolve_inside",
]

FORMAT = "ultramem-dist/value-store"
SCHEMA_VERSION = 1
SCHEMA_VERSION_SHARED = 2
"""Schema 2 adds UltraMemV2 shared tables (pre-values, per-layer offsets and permutations);
a schema-2 manifest without such tables means the same as schema 1."""
READABLE_SCHEMAS = (SCHEMA_VERSION, SCHEMA_VERSION_SHARED)
MANIFEST_NAME = "manifest.json"
LATEST_NAME = "LATEST"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TABLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_version_id(version: str) -> str:
    """Return ``version`` if it is a safe directory name, else raise :class:`StorePathError`."""
    if not isinstance(version, str) or not _VERSION_RE.match(version) or version in (".", ".."):
        raise StorePathError(
            f"invalid table version id {version!r}; expected 1-128 characters of "
            "[A-Za-z0-9._-] starting with a letter or digit"
        )
    return version


def resolve_inside(root: Path, rel: str) -> Path:
    """``root / rel`` if it stays inside ``root`` (no absolute paths, ``..`` or escaping links)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise StorePathError(f"invalid path {rel!r} in manifest")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(part in ("..", "") for part in pure.parts):
        raise StorePathError(f"path {rel!r} in manifest escapes the store directory")
    base = root.resolve()
    target = (base / pure).resolve()
    if not target.is_relative_to(base):
        raise StorePathError(f"path {rel!r} in manifest resolves outside {base}")
    return target


PRE_ACTIVATIONS = ("gelu", "none")
"""Pre-value activations a shard applies (manifest ``pre_activation``)."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ShardSlot:
    """Where shard ``shard`` keeps its slice of one table."""

    shard: int
    row_lo: int
    row_hi: int
    col_lo: int
    col_hi: int
    file: str
    tensor: str
    shape: tuple[int, int]


@dataclass(frozen=True)
class SharedLayer:
    """One UltraMemV2 memory layer's view of a shared table (schema 2)."""

    layer: int
    offset: int
    """First physical row of the layer: row = ((z mod n_rows) + offset) mod table rows."""
    n_rows: int
    """knum**2 rows the layer addresses."""
    ive_tensor: str
    """Its permutation's tensor name in the table's ``ive_file``."""


@dataclass(frozen=True)
class TableEntry:
    """One value table (one memory layer) and how it is sharded."""

    table_id: str
    layer: int
    n_rows: int
    dv: int
    expansion: int
    num_cores: int
    d_model: int
    topm: int
    heads: int
    merged: bool
    sharding: str
    shards: tuple[ShardSlot, ...]
    ive_file: str | None = None
    ive_tensor: str | None = None
    ive_seed: int | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    pre_vdim: int = 0
    """Width of the pre-values stored with the table (0: none; schema 2)."""
    pre_tensor: str | None = None
    """Tensor name of the pre-values in every shard file: the slot's rows when row-sharded,
    all rows (whole, never column-split) when dim-sharded."""
    shared_layers: tuple[SharedLayer, ...] = ()
    """The memory layers that share this table (schema 2; empty for a v1 table)."""
    pre_activation: str = "gelu"
    """What scales an entry's weights by its pre-value dot product ``d``: ``"gelu"`` (GELU(d),
    the UltraMemV2 default) or ``"none"`` (``d`` itself). Written only with pre-values."""

    @property
    def pre_gelu(self) -> bool:
        """Whether a shard applies GELU to the pre-value dot product (``pre_activation``)."""
        return self.pre_activation == "gelu"

    @property
    def is_shared(self) -> bool:
        return bool(self.shared_layers) or self.pre_vdim > 0

    @property
    def out_width(self) -> int:
        """Full output width: ``Dv``, or ``D`` for a merged table."""
        return self.d_model if self.merged else self.dv

    def slot(self, shard: int) -> ShardSlot:
        return self.shards[shard]


@dataclass(frozen=True)
class Manifest:
    version: str
    model_id: str
    config_hash: str
    num_shards: int
    dtype: str
    tables: tuple[TableEntry, ...]
    files: dict[str, FileEntry]
    created: str = ""
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT

    def table(self, table_id: str) -> TableEntry:
        for t in self.tables:
            if t.table_id == table_id:
                return t
        raise KeyError(table_id)

    # -- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for t in d["tables"]:
            for s in t["shards"]:
                s["shape"] = list(s["shape"])
            if not t["pre_vdim"]:  # a v1 table's manifest stays as it was
                del t["pre_activation"]
        d["files"] = {k: asdict(v) for k, v in sorted(self.files.items())}
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def loads(cls, text: str) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
        return cls.from_json(raw)

    @classmethod
    def from_json(cls, raw: Any) -> Manifest:
        try:
            m = _parse(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"malformed manifest: {type(exc).__name__}: {exc}") from None
        m.validate()
        return m

    # -- consistency -----------------------------------------------------------------------

    def validate(self) -> None:
        """Cross-field checks; raise :class:`ManifestError`/:class:`StorePathError`."""
        if self.format != FORMAT:
            raise ManifestError(f"not an ultramem-dist store manifest (format {self.format!r})")
        if self.schema_version not in READABLE_SCHEMAS:
            raise ManifestError(
                f"manifest schema version {self.schema_version} is not supported "
                f"(this build reads {', '.join(map(str, READABLE_SCHEMAS))})"
            )
        if self.schema_version < SCHEMA_VERSION_SHARED and any(t.is_shared for t in self.tables):
            raise ManifestError(
                f"manifest schema version {self.schema_version} cannot hold shared (UltraMemV2) "
                f"tables; they need schema {SCHEMA_VERSION_SHARED}"
            )
        check_version_id(self.version)
        if self.dtype not in STORAGE_DTYPES:
            raise ManifestError(f"storage dtype {self.dtype!r} not in {STORAGE_DTYPES}")
        if self.num_shards < 1:
            raise ManifestError(f"num_shards must be >= 1, got {self.num_shards}")
        seen: set[str] = set()
        for t in self.tables:
            _validate_table(t, self.num_shards, self.files)
            if t.table_id in seen:
                raise ManifestError(f"table id {t.table_id!r} appears twice")
            seen.add(t.table_id)
        for name, f in self.files.items():
            PurePosixPath(name)  # paths are checked against the root by resolve_inside at load
            if not re.fullmatch(r"[0-9a-f]{64}", f.sha256) or f.bytes < 0:
                raise ManifestError(f"bad checksum entry for {name!r}")


def _parse(raw: dict[str, Any]) -> Manifest:
    tables = []
    for t in raw["tables"]:
        slots = tuple(
            ShardSlot(
                shard=int(s["shard"]),
                row_lo=int(s["row_lo"]),
                row_hi=int(s["row_hi"]),
                col_lo=int(s["col_lo"]),
                col_hi=int(s["col_hi"]),
                file=str(s["file"]),
                tensor=str(s["tensor"]),
                shape=(int(s["shape"][0]), int(s["shape"][1])),
            )
            for s in t["shards"]
        )
        tables.append(
            TableEntry(
                table_id=str(t["table_id"]),
                layer=int(t["layer"]),
                n_rows=int(t["n_rows"]),
                dv=int(t["dv"]),
                expansion=int(t["expansion"]),
                num_cores=int(t["num_cores"]),
                d_model=int(t["d_model"]),
                topm=int(t["topm"]),
                heads=int(t["heads"]),
                merged=bool(t["merged"]),
                sharding=str(t["sharding"]),
                shards=slots,
                ive_file=t.get("ive_file"),
                ive_tensor=t.get("ive_tensor"),
                ive_seed=t.get("ive_seed"),
                plan=dict(t.get("plan") or {}),
                pre_vdim=int(t.get("pre_vdim", 0)),
                pre_tensor=t.get("pre_tensor"),
                pre_activation=str(t.get("pre_activation", "gelu")),
                shared_layers=tuple(
                    SharedLayer(
                        layer=int(x["layer"]),
                        offset=int(x["offset"]),
                        n_rows=int(x["n_rows"]),
                        ive_tensor=str(x["ive_tensor"]),
                    )
                    for x in t.get("shared_layers") or ()
                ),
            )
        )
    files = {str(k): FileEntry(str(v["sha256"]), int(v["bytes"])) for k, v in raw["files"].items()}
    return Manifest(
        version=str(raw["version"]),
        model_id=str(raw["model_id"]),
        config_hash=str(raw["config_hash"]),
        num_shards=int(raw["num_shards"]),
        dtype=str(raw["dtype"]),
        tables=tuple(tables),
        files=files,
        created=str(raw.get("created", "")),
        schema_version=int(raw["schema_version"]),
        format=str(raw["format"]),
    )


def _validate_table(t: TableEntry, num_shards: int, files: dict[str, FileEntry]) -> None:
    where = f"table {t.table_id!r}"
    if not _TABLE_RE.match(t.table_id):
        raise ManifestError(f"invalid table id {t.table_id!r}")
    for name in ("n_rows", "dv", "expansion", "num_cores", "d_model", "topm", "heads"):
        if getattr(t, name) < 1:
            raise ManifestError(f"{where}: {name} must be >= 1")
    if t.dv % t.num_cores:
        raise ManifestError(f"{where}: Dv={t.dv} not divisible by h_c={t.num_cores}")
    if t.sharding not in ("row", "dim"):
        raise ManifestError(f"{where}: sharding {t.sharding!r} is not row or dim")
    if len(t.shards) != num_shards or [s.shard for s in t.shards] != list(range(num_shards)):
        raise ManifestError(f"{where}: expected shards 0..{num_shards - 1} in order")
    width = t.out_width
    row_cursor, col_cursor = 0, 0
    for s in t.shards:
        if s.file not in files:
            raise ManifestError(f"{where}: shard {s.shard} file {s.file!r} has no checksum entry")
        if t.sharding == "row":
            ok = (
                s.row_lo == row_cursor
                and s.row_lo < s.row_hi
                and (s.col_lo, s.col_hi) == (0, width)
            )
            row_cursor = s.row_hi
        else:
            ok = (
                s.col_lo == col_cursor
                and s.col_lo < s.col_hi
                and (s.row_lo, s.row_hi) == (0, t.n_rows)
            )
            col_cursor = s.col_hi
        if not ok:
            raise ManifestError(f"{where}: shard {s.shard} range is not contiguous/complete")
        rows, cols = s.row_hi - s.row_lo, s.col_hi - s.col_lo
        want = (t.expansion * rows, t.num_cores * cols) if t.merged else (rows, cols)
        if tuple(s.shape) != want:
            raise ManifestError(
                f"{where}: shard {s.shard} shape {list(s.shape)}, expected {list(want)}"
            )
    if (t.sharding == "row" and row_cursor != t.n_rows) or (
        t.sharding == "dim" and col_cursor != width
    ):
        raise ManifestError(f"{where}: shard ranges do not cover the table")
    if t.ive_file is not None and t.ive_file not in files:
        raise ManifestError(f"{where}: IVE file {t.ive_file!r} has no checksum entry")
    _validate_shared(t, where)


def _validate_shared(t: TableEntry, where: str) -> None:
    if t.pre_vdim < 0:
        raise ManifestError(f"{where}: pre_vdim must be >= 0")
    if (t.pre_vdim > 0) != (t.pre_tensor is not None):
        raise ManifestError(f"{where}: pre_vdim and pre_tensor must be given together")
    if t.pre_activation not in PRE_ACTIVATIONS:
        raise ManifestError(
            f"{where}: pre_activation {t.pre_activation!r}; expected one of {PRE_ACTIVATIONS}"
        )
    if t.is_shared and (t.merged or t.expansion != 1):
        raise ManifestError(f"{where}: a shared table is stored unmerged with one block (E=1)")
    layers = [x.layer for x in t.shared_layers]
    if len(set(layers)) != len(layers):
        raise ManifestError(f"{where}: a layer appears twice in shared_layers")
    for x in t.shared_layers:
        if not (0 <= x.offset < t.n_rows and 1 <= x.n_rows <= t.n_rows):
            raise ManifestError(
                f"{where}: layer {x.layer} offset {x.offset} / rows {x.n_rows} lie outside the "
                f"table's {t.n_rows} rows"
            )
        if t.ive_file is None:
            raise ManifestError(f"{where}: shared layers need an IVE file for their permutations")
