"""Open a store version and memory-map one shard's slices after verifying their checksums.

Nothing is served from a file until its size and sha256 match the manifest and its safetensors
header names the expected tensors with the expected dtype and shape. The value tensors are
zero-copy views of the file mapping (a read-only ``numpy.memmap`` at the tensor's offset, read
from the safetensors header), so a shard's RSS grows only with the pages it actually reads.
Nothing here imports torch: a CPU shard never loads it (:attr:`ShardTable.values` builds a torch
view on first use, for the torch path and GPU shards). bfloat16 is held as its ``uint16`` bits.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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

if TYPE_CHECKING:
    import torch

__all__ = [
    "ShardSlice",
    "ShardTable",
    "load_shard",
    "open_manifest",
    "resolve_version",
    "verify_store",
]

# manifest dtype -> (safetensors dtype tag, numpy dtype holding it)
_DTYPES = {
    "float32": ("F32", np.dtype("<f4")),
    "float16": ("F16", np.dtype("<f2")),
    "bfloat16": ("BF16", np.dtype("<u2")),  # raw bit patterns; the kernel reads them as bf16
}
_MAX_HEADER = 100 << 20  # safetensors' own cap on the JSON header


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
    array: np.ndarray
    """Memory-mapped ``[rows, cols]`` slice (merged: ``[E*rows, h_c*cols]``), read-only; a
    bfloat16 table as its ``uint16`` bits (see :attr:`dtype`)."""
    segments: tuple[ColumnSegment, ...]
    dtype: str = "float32"
    """The stored dtype's name (``float32``, ``float16`` or ``bfloat16``)."""
    device_values: Any = field(default=None, compare=False, repr=False)
    """A copy of the slice on another device (a CUDA shard's), or ``None``."""
    pre_array: np.ndarray | None = field(default=None, compare=False, repr=False)
    """UltraMemV2 pre-values ``[rows, pre_vdim]``, memory-mapped like :attr:`array` (bf16 as
    ``uint16`` bits): the slot's rows (row-sharded) or all rows (dim-sharded); else ``None``."""

    @functools.cached_property
    def values(self) -> torch.Tensor:
        """The slice as a torch tensor: :attr:`device_values`, else a zero-copy CPU view of
        :attr:`array` (imports torch; the CPU shard's native path never asks for it)."""
        if self.device_values is not None:
            return self.device_values
        return self._torch_view(self.array)

    @functools.cached_property
    def pre_values(self) -> torch.Tensor | None:
        """:attr:`pre_array` as a zero-copy CPU torch tensor (``None`` for a v1 table; imports
        torch: only the torch path of the kernel asks for it)."""
        return None if self.pre_array is None else self._torch_view(self.pre_array)

    def _torch_view(self, array: np.ndarray) -> torch.Tensor:
        """A zero-copy torch view of a mapped array of this table's dtype (bf16 bits viewed
        as ``torch.bfloat16``)."""
        import torch

        with warnings.catch_warnings():  # a read-only mapping: nothing writes into it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(array)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

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
    tag, np_dtype = _DTYPES[manifest.dtype]
    by_file: dict[str, list[TableEntry]] = {}
    for t in manifest.tables:
        by_file.setdefault(t.slot(shard).file, []).append(t)
    tables: dict[str, ShardTable] = {}
    for name, entries in by_file.items():
        path = _verify_file(vdir, manifest, name, verify)
        header, data_start, size = _read_header(path, name)
        for t in entries:
            slot = t.slot(shard)
            info = header.get(slot.tensor)
            if not isinstance(info, dict):
                raise ChecksumError(f"store file {name} lacks tensor {slot.tensor!r}")
            shape, begin = _tensor_extent(info, name, slot.tensor, data_start, size)
            if info.get("dtype") != tag or shape != tuple(slot.shape):
                raise ChecksumError(
                    f"store file {name}: tensor {slot.tensor!r} is {info.get('dtype')} "
                    f"{list(shape)}, manifest says {manifest.dtype} {list(slot.shape)}"
                )
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            if math.prod(shape) * np_dtype.itemsize != nbytes:
                raise ChecksumError(
                    f"store file {name}: tensor {slot.tensor!r} has {nbytes} data bytes for "
                    f"{manifest.dtype} {list(shape)}"
                )
            values = _map(path, np_dtype, begin, shape)
            pre = _pre_values(path, header, data_start, size, name, t, slot, tag, np_dtype)
            tables[t.table_id] = ShardTable(
                t, slot, values, _segments(t, slot), manifest.dtype, pre_array=pre
            )
    return ShardSlice(manifest, shard, tables, vdir)


def _pre_values(
    path: Path,
    header: dict[str, Any],
    data_start: int,
    size: int,
    name: str,
    t: TableEntry,
    slot: ShardSlot,
    tag: str,
    np_dtype: np.dtype,
) -> np.ndarray | None:
    """The slot's UltraMemV2 pre-values, checked and memory-mapped (``None`` for v1 tables)."""
    if t.pre_tensor is None:
        return None
    info = header.get(t.pre_tensor)
    if not isinstance(info, dict):
        raise ChecksumError(f"store file {name} lacks pre-value tensor {t.pre_tensor!r}")
    shape, begin = _tensor_extent(info, name, t.pre_tensor, data_start, size)
    rows = slot.row_hi - slot.row_lo  # a dim shard's slot spans every row
    nbytes = info["data_offsets"][1] - info["data_offsets"][0]
    if (
        info.get("dtype") != tag
        or shape != (rows, t.pre_vdim)
        or math.prod(shape) * np_dtype.itemsize != nbytes
    ):
        raise ChecksumError(
            f"store file {name}: pre-values {t.pre_tensor!r} are {info.get('dtype')} "
            f"{list(shape)}, manifest says {tag} {[rows, t.pre_vdim]}"
        )
    return _map(path, np_dtype, begin, shape)


def _segments(t: TableEntry, slot: ShardSlot) -> tuple[ColumnSegment, ...]:
    if t.merged:
        return merged_segments(slot.col_hi - slot.col_lo, t.num_cores)
    return column_segments(slot.col_lo, slot.col_hi, t.dv, t.num_cores)


def _read_header(path: Path, name: str) -> tuple[dict[str, Any], int, int]:
    """A safetensors file's JSON header, where its data starts, and the file's size."""
    bad = f"store file {name} is not a readable safetensors file"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ChecksumError(f"{bad}: shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > _MAX_HEADER or 8 + n > size:
                raise ChecksumError(f"{bad}: header length {n} does not fit the file")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChecksumError(f"{bad}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ChecksumError(f"{bad}: header is not a JSON object")
    return header, 8 + n, size


def _tensor_extent(
    info: dict[str, Any], name: str, tensor: str, data_start: int, size: int
) -> tuple[tuple[int, ...], int]:
    """A header entry's shape and absolute data offset, checked to lie inside the file."""
    shape, offs = info.get("shape"), info.get("data_offsets")
    ints = lambda v: isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)  # noqa: E731
    if not (ints(shape) and ints(offs) and len(offs) == 2 and offs[0] <= offs[1]):
        raise ChecksumError(f"store file {name}: tensor {tensor!r} has a malformed header entry")
    if data_start + offs[1] > size:
        raise ChecksumError(f"store file {name}: tensor {tensor!r} runs past the end of the file")
    return tuple(shape), data_start + offs[0]


def _map(path: Path, dtype: np.dtype, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only zero-copy mapping of ``shape`` elements at ``offset`` of ``path``."""
    if math.prod(shape) == 0:
        return np.empty(shape, dtype=dtype)
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    _advise_huge_pages(mm)
    return mm.view(np.ndarray)


def _advise_huge_pages(mm: np.memmap) -> None:
    """Ask for 2 MiB pages on a large table mapping (best effort): random row reads then cost
    far fewer page walks (``benchmarks/kernel_limit.py``: bf16 0.44x -> 0.57x of ``copy_``).
    Kernels with large page-cache folios (Linux 6.x, ext4/xfs) map them so anyway."""
    raw = getattr(mm, "_mmap", None)
    if raw is None or mm.nbytes < (4 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    with contextlib.suppress(OSError, ValueError):
        raw.madvise(mmap.MADV_HUGEPAGE)
