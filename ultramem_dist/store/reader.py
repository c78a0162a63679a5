"""Open a store version and memory-map one shard's slices after verifying their checksums.

Nothing is served from a file until its size and sha256 match the manifest and its safetensors
header names the expected tensors with the expected dtype and shape. The value tensors are
zero-copy views of the file mapping (safetensors ``safe_open``), so a shard's RSS grows only with
the pages it actually reads.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ultramem_dist.errors import ChecksumError, ManifestError, StoreError
from ultramem_dist.kernels import ColumnSegment, column_segments
from ultramem_dist.store.manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    Manifest,
    ShardSlot,
    TableEntry,
    check_version_id,
    resolve_inside,
)
from ultramem_dist.store.merge import merged_segments
from ultramem_dist.store.verify import VERIFY_MODES, VerifyMode, is_verified, record_verified

__all__ = [
    "ShardSlice",
    "ShardTable",
    "load_shard",
    "open_manifest",
    "resolve_version",
    "verify_store",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_version(store: str | Path, version: str | None = None) -> Path:
    """Directory of ``version`` (default: the one ``LATEST`` names) inside ``store``."""
    root = Path(store)
    if not root.is_dir():
        raise StoreError(f"store directory {root} does not exist")
    if version is None:
        latest = root / LATEST_NAME
        if not latest.is_file():
            raise StoreError(
                f"store {root} has no {LATEST_NAME} pointer; pass a version explicitly"
            )
        version = latest.read_text().strip()
    check_version_id(version)
    vdir = resolve_inside(root, version)
    if not vdir.is_dir():
        raise StoreError(f"store {root} has no version {version!r}")
    return vdir


def open_manifest(store: str | Path, version: str | None = None) -> tuple[Path, Manifest]:
    """Read and validate the manifest of a store version; returns (version dir, manifest)."""
    vdir = resolve_version(store, version)
    path = vdir / MANIFEST_NAME
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
    manifest = Manifest.loads(text)
    if manifest.version != vdir.name:
        raise ManifestError(
            f"manifest in {vdir} says version {manifest.version!r}, "
            f"but the directory is {vdir.name!r}"
        )
    for name in manifest.files:
        resolve_inside(vdir, name)
    return vdir, manifest


def _verify_file(vdir: Path, manifest: Manifest, name: str, verify: VerifyMode = "always") -> Path:
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
    path = resolve_inside(vdir, name)
    want = manifest.files[name]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ChecksumError(f"store file {name} is missing from {vdir}") from None
    if st.st_size != want.bytes:
        raise ChecksumError(
            f"store file {name} is {st.st_size} bytes, manifest says {want.bytes} "
            "(truncated or replaced)"
        )
    if verify == "never":
        return path
    if verify == "cached" and is_verified(path, want.sha256, st):
        return path
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_ino != st.st_ino:
            raise ChecksumError(f"store file {name} changed while being verified")
        buf = bytearray(1 << 22)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
        after = os.fstat(f.fileno())
    if h.hexdigest() != want.sha256:
        raise ChecksumError(
            f"store file {name} fails its sha256 check (corrupt); refusing to serve it"
        )
    if verify == "cached" and (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == (
        st.st_mtime_ns, st.st_ctime_ns, st.st_size
    ):  # unchanged while hashing: the verdict holds for this identity
        record_verified(path, want.sha256, st)
    return path


def verify_store(
    store: str | Path, version: str | None = None, *, verify: VerifyMode = "always"
) -> Manifest:
    """Check every file of a store version (size + sha256; see :mod:`.verify` for modes)."""
    vdir, manifest = open_manifest(store, version)
    for name in manifest.files:
        _verify_file(vdir, manifest, name, verify)
    return manifest


@dataclass(frozen=True)
class ShardTable:
    """One table's slice on this shard, ready for :func:`~ultramem_dist.kernels.gather_pool`."""

    entry: TableEntry
    slot: ShardSlot
    values: torch.Tensor
    """Memory-mapped ``[rows, cols]`` slice (merged: ``[E*rows, h_c*cols]``)."""
    segments: tuple[ColumnSegment, ...]
    pre_values: torch.Tensor | None = None
    """UltraMemV2 pre-values: the slot's rows (row-sharded) or all rows (dim-sharded)."""

    @property
    def out_cols(self) -> int:
        return self.slot.col_hi - self.slot.col_lo


@dataclass(frozen=True)
class ShardSlice:
    """Everything shard ``shard`` of a store version serves."""

    manifest: Manifest
    shard: int
    tables: dict[str, ShardTable]
    directory: Path


def load_shard(
    store: str | Path, shard: int, version: str | None = None, *, verify: VerifyMode = "always"
) -> ShardSlice:
    """Verify (``verify``: always / cached / never, see :mod:`.verify`) and memory-map shard
    ``shard``'s files of a store version."""
    vdir, manifest = open_manifest(store, version)
    if not 0 <= shard < manifest.num_shards:
        raise StoreError(
            f"shard {shard} does not exist; store version has shards 0..{manifest.num_shards - 1}"
        )
    dtype = _DTYPES[manifest.dtype]
    by_file: dict[str, list[TableEntry]] = {}
    for t in manifest.tables:
        by_file.setdefault(t.slot(shard).file, []).append(t)
    tables: dict[str, ShardTable] = {}
    for name, entries in by_file.items():
        path = _verify_file(vdir, manifest, name, verify)
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                for t in entries:
                    slot = t.slot(shard)
                    if slot.tensor not in keys:
                        raise ChecksumError(f"store file {name} lacks tensor {slot.tensor!r}")
                    values = f.get_tensor(slot.tensor)
                    if values.dtype != dtype or tuple(values.shape) != tuple(slot.shape):
                        raise ChecksumError(
                            f"store file {name}: tensor {slot.tensor!r} is {values.dtype} "
                            f"{list(values.shape)}, manifest says {manifest.dtype} "
                            f"{list(slot.shape)}"
                        )
                    pre = _pre_values(f, keys, name, t, slot, dtype)
                    tables[t.table_id] = ShardTable(t, slot, values, _segments(t, slot), pre)
        except SafetensorError as exc:
            raise ChecksumError(
                f"store file {name} is not a readable safetensors file: {exc}"
            ) from None
    return ShardSlice(manifest, shard, tables, vdir)


def _pre_values(
    f: object, keys: set[str], name: str, t: TableEntry, slot: ShardSlot, dtype: torch.dtype
) -> torch.Tensor | None:
    if t.pre_tensor is None:
        return None
    if t.pre_tensor not in keys:
        raise ChecksumError(f"store file {name} lacks pre-value tensor {t.pre_tensor!r}")
    pre = f.get_tensor(t.pre_tensor)  # type: ignore[attr-defined]
    rows = slot.row_hi - slot.row_lo
    if pre.dtype != dtype or tuple(pre.shape) != (rows, t.pre_vdim):
        raise ChecksumError(
            f"store file {name}: pre-values {t.pre_tensor!r} are {pre.dtype} {list(pre.shape)}, "
            f"manifest says {dtype} {[rows, t.pre_vdim]}"
        )
    return pre


def _segments(t: TableEntry, slot: ShardSlot) -> tuple[ColumnSegment, ...]:
    if t.merged:
        return merged_segments(slot.col_hi - slot.col_lo, t.num_cores)
    return column_segments(slot.col_lo, slot.col_hi, t.dv, t.num_cores)
