"""Loader of the native CPU gather-pool (``csrc/gather_pool.c``), built on first use.

The C source ships inside the package. The first process that needs it compiles it with the
system C compiler (``$CC``, else ``cc``; about a second) into a cache directory keyed by the hash
of the source, the flags and the compiler, and every later process loads the cached library.
Nothing here is required: without a compiler (or with ``ULTRAMEM_NATIVE=0``) :func:`library`
returns ``None`` and ``gather_pool`` uses its torch path, which computes the same thing.

Environment:
    ``ULTRAMEM_NATIVE=0``       never use the native path.
    ``ULTRAMEM_NATIVE_LIB``     a prebuilt library to load (e.g. built into a container image).
    ``ULTRAMEM_NATIVE_CFLAGS``  architecture flags (default ``-march=native``; the cache key
                                includes them). Any value works, also empty: the vector
                                kernels are chosen at run time (``NativeLib.isa``).
    ``ULTRAMEM_NATIVE_ISA``     ``generic``: run the portable kernel even where the CPU has
                                AVX2/FMA/F16C (read once per process).
    ``ULTRAMEM_NATIVE_DIR``     where to build and cache it (default
                                ``$ULTRAMEM_CACHE/native`` or ``~/.cache/ultramem-dist/native``).

``python -m ultramem_dist.kernels.native [--out PATH]`` builds it ahead of time and prints its path.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NativeLib", "NativePlan", "build", "kernel_threads", "library", "set_kernel_threads"]

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "gather_pool.c", CSRC / "entries.c", CSRC / "wire.c")
BASE_CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-fno-math-errno"]
DEFAULT_ARCH_FLAGS = "-march=native"


def cflags() -> list[str]:
    """Compiler flags: the base set plus ``$ULTRAMEM_NATIVE_CFLAGS`` (default ``-march=native``:
    the build runs on the machine that uses it, so it may use every vector unit there)."""
    return BASE_CFLAGS + shlex.split(os.environ.get("ULTRAMEM_NATIVE_CFLAGS", DEFAULT_ARCH_FLAGS))


DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}
"""The C kernel's table dtype codes, by dtype name (no torch here: a CPU shard never imports it;
a bfloat16 table is held by numpy as its raw ``uint16`` bit patterns)."""
_NP_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
ISAS = {0: "generic", 1: "avx2"}
_ERRORS = {
    -1: (IndexError, "row index {v} at entry {bad} is outside the table's {rows} rows"),
    -2: (IndexError, "block id {v} at entry {bad} is outside [0, {E})"),
    -3: (ValueError, "column segment {bad} does not fit the table / output"),
    -4: (TypeError, "table dtype not supported by this build"),
    -5: (MemoryError, "native gather-pool could not allocate its scratch buffers"),
    -6: (ValueError, "pre-values do not fit the table (fewer rows, or no columns)"),
}
_i64 = ctypes.c_int64
_i32 = ctypes.c_int32
_ptr = ctypes.c_void_p


_I64 = np.dtype(np.int64)
_F32 = np.dtype(np.float32)
_INTS = (np.dtype(np.int32), _I64)


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _expect_arrays(*specs: tuple[str, np.ndarray, np.dtype, tuple[int, ...]]) -> None:
    """Arrays the C code reads by address: each ``(name, array, dtype, shape)`` must match
    exactly and be C-contiguous, or it would be read as garbage."""
    for name, a, dt, shape in specs:
        if a.dtype != dt or a.shape != shape or not a.flags.c_contiguous:
            raise TypeError(
                f"{name}: expected a C-contiguous {dt} array of shape {shape}, "
                f"got {a.dtype} {a.shape}"
            )


def _expect_csr(tok_off: np.ndarray, nnz: int) -> None:
    if tok_off.shape[0] < 1 or int(tok_off[0]) != 0 or int(tok_off[-1]) != nnz:
        raise ValueError(f"tok_off must run from 0 to nnz={nnz}")


class NativeLib:
    """The loaded library: ``um_gather_pool`` with its argument types, and the dtypes it has."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))  # CDLL: the GIL is released during calls
        fn = self._lib.um_gather_pool
        fn.restype = _i32
        fn.argtypes = [_ptr, _i32, _i64, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64]
        fn.argtypes += [_ptr, _i64, _i32, _ptr, _i64, _i32, ctypes.POINTER(_i64)]
        self.gather_pool = fn
        pre = self._lib.um_gather_pool_pre
        pre.restype = _i32
        pre.argtypes = [*fn.argtypes, _ptr, _i64, _i64, _i64, _ptr, _i32]
        self.gather_pool_pre = pre
        """``um_gather_pool`` plus an UltraMemV2 table's pre-values (one pass; see the C)."""
        split = self._lib.um_split_rows
        split.restype = _i32
        split.argtypes = [_ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64] + [_ptr] * 5
        self._split_rows = split
        check = self._lib.um_check_entries
        check.restype = _i32
        check.argtypes = [_ptr, _i32, _ptr, _i32, _ptr] + [_i64] * 6 + [_ptr, _ptr]
        self._check_entries = check
        self.wire_parse = self._lib.um_wire_parse
        self.wire_parse.restype = _i32
        self.wire_parse.argtypes = [ctypes.c_char_p, _i64, _ptr]
        self.wire_parse_gather = self._lib.um_wire_parse_gather
        self.wire_parse_gather.restype = _i32
        self.wire_parse_gather.argtypes = [ctypes.c_char_p, _i64, _ptr]
        self.wire_tokens = self._lib.um_wire_tokens
        self.wire_tokens.restype = _i64
        self.wire_tokens.argtypes = [_ptr]
        self.wire_gather = self._lib.um_wire_gather
        self.wire_gather.restype = _i32
        self.wire_gather.argtypes = [ctypes.c_char_p, _ptr, _ptr, _i32, _i64, _i64, _i64, _ptr]
        self.wire_gather.argtypes += [_i64, _i32] + [_i64] * 8 + [_i32, _i64, _ptr]
        self.wire_gather.argtypes += [ctypes.POINTER(_i64)]
        self._lib.um_wire_slots.restype = _i32
        self.wire_slots = int(self._lib.um_wire_slots())
        self._lib.um_dtypes.restype = _i32
        mask = self._lib.um_dtypes()
        self.dtypes = frozenset(dt for dt, code in DTYPE_CODES.items() if mask >> code & 1)
        """Names of the table dtypes this build pools (``"float32"``, ``"bfloat16"``, ...)."""
        self._lib.um_isa.restype = _i32
        self.isa = ISAS.get(int(self._lib.um_isa()), "unknown")
        """The kernel copy chosen at run time: ``"avx2"`` (AVX2 + FMA + F16C present) or
        ``"generic"`` (portable; also forced by ``ULTRAMEM_NATIVE_ISA=generic``)."""

    def split_rows(
        self,
        ids: np.ndarray,
        blk: np.ndarray,
        w: np.ndarray,
        tok_off: np.ndarray,
        row_lo: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """A batch's entries grouped by owning row shard, ids and block ids narrowed to int32
        (``csrc/entries.c``): ``(ids32, blk32, w, starts, offs)`` where shard ``k`` owns
        entries ``starts[k]:starts[k + 1]`` of the first three (token order kept) and
        ``offs[k]`` are their int32 CSR offsets per token. ``None`` when an id or block id does
        not fit int32 (the caller then sends int64).

        Inputs: C-contiguous int64 ``ids``/``blk`` ``[nnz]``, float32 ``w`` ``[nnz, h_c]``,
        int64 CSR ``tok_off`` ``[T + 1]`` from 0 to ``nnz``, int64 ``row_lo`` ``[S]`` (first row
        of every shard, ascending, ``row_lo[0] == 0``)."""
        nnz, num_tokens, shards = ids.shape[0], tok_off.shape[0] - 1, row_lo.shape[0]
        _expect_arrays(
            ("ids", ids, _I64, (nnz,)),
            ("blk", blk, _I64, (nnz,)),
            ("w", w, _F32, (nnz, w.shape[-1])),
            ("tok_off", tok_off, _I64, tok_off.shape[:1]),
            ("row_lo", row_lo, _I64, (shards,)),
        )
        _expect_csr(tok_off, nnz)
        ids32 = np.empty(nnz, dtype=np.int32)
        blk32 = np.empty(nnz, dtype=np.int32)
        w_out = np.empty_like(w)
        starts = np.empty(shards + 1, dtype=np.int64)
        offs = np.empty((shards, num_tokens + 1), dtype=np.int32)
        rc = self._split_rows(
            _addr(ids), _addr(blk), _addr(w), w.shape[-1], _addr(tok_off), num_tokens,
            _addr(row_lo), shards, _addr(ids32), _addr(blk32), _addr(w_out), _addr(starts),
            _addr(offs),
        )  # fmt: skip
        if rc == -1:
            return None
        if rc != 0:
            raise ValueError(f"split_rows: bad offsets or shard count ({shards})")
        return ids32, blk32, w_out, starts, offs

    def check_entries(
        self,
        ids: np.ndarray,
        blk: np.ndarray,
        w: np.ndarray,
        rows: tuple[int, int],
        num_blocks: int,
        merged_rows: int = 0,
    ) -> tuple[np.ndarray, np.ndarray] | int:
        """Check a decoded request's values and convert them for the kernel in one pass
        (``csrc/entries.c``): flat int64 ``(local rows, block ids)``, or the first check that
        failed: 1 a non-finite weight, 2 a block id outside ``[0, num_blocks)``, 3 a row id
        outside ``rows`` (``[lo, hi)``). ``merged_rows`` > 0: a merged table, whose physical
        row of (row, block) is ``row - lo + block * merged_rows`` (block ids become 0).

        Inputs: C-contiguous int32/int64 ``ids`` and ``blk`` of one size ``nnz``, float32
        ``w`` of ``nnz * h_c`` elements (any shapes)."""
        nnz = ids.size
        for name, a in (("ids", ids), ("blk", blk)):
            if a.dtype not in _INTS or a.size != nnz or not a.flags.c_contiguous:
                raise TypeError(f"{name}: expected {nnz} C-contiguous int32/int64, got {a.dtype}")
        if w.dtype != _F32 or not w.flags.c_contiguous or (nnz and w.size % nnz):
            raise TypeError(f"w: expected C-contiguous float32 [{nnz}, h_c], got {w.dtype}")
        cores = w.size // nnz if nnz else 0
        local = np.empty(nnz, dtype=np.int64)
        blocks = np.empty(nnz, dtype=np.int64)
        rc = self._check_entries(
            _addr(ids), ids.dtype == _I64, _addr(blk), blk.dtype == _I64, _addr(w), nnz, cores,
            rows[0], rows[1], num_blocks, merged_rows, _addr(local), _addr(blocks),
        )  # fmt: skip
        return rc if rc else (local, blocks)


def _cache_dir() -> Path:
    if d := os.environ.get("ULTRAMEM_NATIVE_DIR"):
        return Path(d)
    base = os.environ.get("ULTRAMEM_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "ultramem-dist"
    )
    return Path(base) / "native"


def _compiler() -> list[str] | None:
    cc = shlex.split(os.environ.get("CC", "")) or ["cc"]
    return cc if shutil.which(cc[0]) else None


def build(out: Path | None = None) -> Path:
    """Compile the library (into ``out``, else the cache) and return its path; reuses a cached
    build of the same source, flags and compiler. Raises ``RuntimeError`` with the compiler's
    message when it fails."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc/cc)")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True).stdout
    flags = cflags()
    code = b"".join(src.read_bytes() for src in SOURCES)
    key = hashlib.sha256(code + repr((cc, flags, version)).encode()).hexdigest()
    target = out or _cache_dir() / f"libumgather-{key[:16]}.so"
    if out is None and target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # compile to a private name, then rename: concurrent builders never see a partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # OpenMP first: the library then shares torch's thread pool (libgomp.so.1, already
        # loaded by torch); pthreads when the compiler has no OpenMP
        for extra in (["-fopenmp"], []):
            proc = subprocess.run(
                [*cc, *flags, *extra, *map(str, SOURCES), "-o", tmp, "-lm"],
                capture_output=True,
                text=True,
            )
            if proc.returncode == 0:
                break
        else:
            names = " + ".join(src.name for src in SOURCES)
            raise RuntimeError(f"compiling {names} failed:\n{proc.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_LOCK = threading.Lock()
_LIB: NativeLib | None = None
_TRIED = False


def library() -> NativeLib | None:
    """The native library, built and loaded once per process; ``None`` when unavailable."""
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    with _LOCK:
        if _TRIED:
            return _LIB
        try:
            if os.environ.get("ULTRAMEM_NATIVE", "1") == "0":
                return None
            prebuilt = os.environ.get("ULTRAMEM_NATIVE_LIB")
            _LIB = NativeLib(Path(prebuilt) if prebuilt else build())
        except (OSError, RuntimeError) as exc:
            log.warning("native gather-pool unavailable, using the torch path: %s", exc)
        finally:
            _TRIED = True
    return _LIB


PARALLEL_GRAIN = 256 << 10  # bytes of value rows per kernel thread, at least


def dtype_name(table: Any, dtype: str | None = None) -> str:
    """The dtype name of a table: ``dtype`` when given (required for a numpy ``uint16`` array
    holding bfloat16 bits), else the numpy or torch dtype's name."""
    if dtype is not None:
        return dtype
    if isinstance(table, np.ndarray):
        name = _NP_NAMES.get(table.dtype)
        if name is None:
            raise TypeError(
                f"numpy table of dtype {table.dtype}: pass dtype= (a uint16 array holds "
                "bfloat16 bits only when dtype='bfloat16' says so)"
            )
        return name
    return str(table.dtype).removeprefix("torch.")


def table_layout(table: Any) -> tuple[str, int, tuple[int, ...], tuple[int, ...], int, int]:
    """``(device type, ndim, shape, strides in elements, data address, element size)`` of a
    numpy array or a torch tensor (read without importing torch)."""
    if isinstance(table, np.ndarray):
        size = table.itemsize
        strides = tuple(st // size for st in table.strides)
        return "cpu", table.ndim, table.shape, strides, _addr(table), size
    shape = tuple(table.shape)
    return (
        table.device.type, table.dim(), shape, tuple(table.stride()), table.data_ptr(),
        table.element_size(),
    )  # fmt: skip


_THREADS: int | None = None


def set_kernel_threads(n: int | None) -> None:
    """Threads the native kernel may use per call (``None``: the default, see
    :func:`kernel_threads`); also torch's, when torch is loaded."""
    global _THREADS
    _THREADS = n
    if n and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def kernel_threads() -> int:
    """Threads per kernel call: :func:`set_kernel_threads`' value, else torch's when torch is
    loaded (the same pool the torch path uses), else ``$OMP_NUM_THREADS``, else the CPUs this
    process may run on."""
    if _THREADS:
        return _THREADS
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class NativePlan:
    """One table's native gather-pool call with everything about the table checked and
    converted once; :meth:`run` then pools a batch with one C call.

    ``table`` is a ``[rows, cols]`` CPU numpy array or torch tensor (unit column stride, a
    dtype of ``lib.dtypes``; a numpy bfloat16 table is its ``uint16`` bits with
    ``dtype="bfloat16"``); ``segments`` the ``[nseg, 3]`` (start, stop, core) column segments,
    which must fit the table; ``out_cols`` the output width. The plan keeps the table alive.

    ``pre``: an UltraMemV2 table's pre-values ``[rows, pre_vdim]`` in the table's dtype (unit
    column stride; at least the table's rows): :meth:`run` then needs ``pre_input`` and scales
    every entry's weights by ``GELU(pre[idx] . pre_input[token])`` in the same pass
    (``pre_gelu=False``: by the dot product).
    """

    def __init__(
        self,
        lib: NativeLib,
        table: Any,
        segments: np.ndarray,
        num_cores: int,
        sum_segments: bool,
        out_cols: int,
        *,
        dtype: str | None = None,
        pre: Any = None,
        pre_gelu: bool = True,
    ) -> None:
        device, ndim, shape, strides, addr, size = table_layout(table)
        if device != "cpu" or ndim != 2 or strides[1] != 1:
            raise TypeError("native gather-pool needs a CPU table with contiguous columns")
        name = dtype_name(table, dtype)
        if name not in lib.dtypes:
            raise TypeError(f"native gather-pool: table dtype {name} not supported")
        self.lib = lib
        self.table = table if isinstance(table, np.ndarray) else table.detach()
        self.segments = np.ascontiguousarray(segments, dtype=np.int32).reshape(-1, 3)
        self.num_cores = num_cores
        self.out_cols = out_cols
        self._head = (addr, DTYPE_CODES[name], shape[0], strides[0], shape[1])
        self._segs = (_addr(self.segments), self.segments.shape[0], int(sum_segments))
        self._row_bytes = shape[1] * size
        self.pre = None if pre is None else pre if isinstance(pre, np.ndarray) else pre.detach()
        self._pre: tuple[int, int, int, int] | None = None
        if pre is not None:
            p_dev, p_ndim, p_shape, p_strides, p_addr, p_size = table_layout(pre)
            if p_dev != "cpu" or p_ndim != 2 or p_strides[1] != 1 or p_size != size:
                raise TypeError(
                    "native gather-pool: pre-values must be a CPU [rows, pre_vdim] array with "
                    "contiguous columns in the table's dtype"
                )
            if p_shape[0] < shape[0] or p_shape[1] < 1:
                raise ValueError(
                    f"native gather-pool: pre-values {list(p_shape)} do not cover the table's "
                    f"{shape[0]} rows"
                )
            self._pre = (p_addr, p_shape[0], p_strides[0], p_shape[1])
        self.pre_gelu = bool(pre_gelu)

    def run(
        self,
        idx: np.ndarray,
        blk: np.ndarray,
        weights: np.ndarray,
        tok_off: np.ndarray,
        num_blocks: int,
        nthreads: int,
        pre_input: np.ndarray | None = None,
    ) -> np.ndarray:
        """``[T, num_blocks, out_cols]`` float32 for C-contiguous int64 ``idx``/``blk``
        ``[nnz]`` in token order, float32 ``weights`` ``[nnz, num_cores]`` and int64 CSR
        ``tok_off`` ``[T + 1]`` (``tok_off[-1] == nnz``); with pre-values, float32
        ``pre_input`` ``[T, pre_vdim]``. These are read by address, so their dtypes and sizes
        are checked here: a wrong one would be read as garbage."""
        nnz = idx.shape[0]
        _expect_arrays(
            ("idx", idx, _I64, (nnz,)),
            ("blk", blk, _I64, (nnz,)),
            ("weights", weights, _F32, (nnz, self.num_cores)),
            ("tok_off", tok_off, _I64, tok_off.shape[:1]),
        )
        _expect_csr(tok_off, nnz)
        num_tokens = tok_off.shape[0] - 1
        if (pre_input is None) != (self._pre is None):
            raise ValueError(
                "pre_input: required for a table with pre-values"
                if pre_input is None
                else "pre_input: this table has no pre-values"
            )
        if self._pre is not None:
            _expect_arrays(("pre_input", pre_input, _F32, (num_tokens, self._pre[3])))
        out = np.empty((num_tokens, num_blocks, self.out_cols), dtype=np.float32)
        # a thread per PARALLEL_GRAIN bytes of rows read: waking a thread costs more than it
        # saves on a small batch (the C side also caps threads at the token count)
        nthreads = min(nthreads, 1 + nnz * self._row_bytes // PARALLEL_GRAIN)
        bad = _i64(0)
        args = (
            *self._head, _addr(idx), _addr(blk), _addr(weights), self.num_cores, _addr(tok_off),
            num_tokens, num_blocks, *self._segs, _addr(out), self.out_cols, nthreads,
            ctypes.byref(bad),
        )  # fmt: skip
        if self._pre is None:
            rc = self.lib.gather_pool(*args)
        else:
            assert pre_input is not None
            rc = self.lib.gather_pool_pre(*args, *self._pre, _addr(pre_input), int(self.pre_gelu))
        if rc != 0:
            exc, msg = _ERRORS.get(rc, (RuntimeError, f"native gather-pool failed ({rc})"))
            b = bad.value
            v = int(idx[b]) if rc == -1 else int(blk[b]) if rc == -2 else None
            raise exc(msg.format(v=v, bad=b, rows=self._head[2], E=num_blocks))
        return out

    def run_wire(
        self,
        raw: bytes,
        fields_addr: int,
        rows: tuple[int, int],
        num_blocks: int,
        merged_rows: int,
        limits: tuple[int, int],
        out_addr: int,
        nthreads: int,
    ) -> int | None:
        """Answer a stream message parsed by ``um_wire_parse`` (``csrc/wire.c``): check it
        against this table (``rows``: the served slice ``[lo, hi)``, ``num_blocks``: E,
        ``merged_rows`` as in :meth:`NativeLib.check_entries`) and ``limits`` (max batch, max
        entries per query) and pool it into ``out_addr`` (room for ``[T, out blocks,
        out_cols]`` float32, ``T = lib.wire_tokens``). The number of entries pooled, or ``None``
        when the general path must take the message (its refusal is worded there)."""
        entries = _i64(0)
        rc = self.lib.wire_gather(
            raw, fields_addr, *self._head, *self._segs, self.out_cols, self.num_cores,
            num_blocks, rows[0], rows[1], merged_rows, limits[0], limits[1], nthreads,
            PARALLEL_GRAIN, out_addr, ctypes.byref(entries),
        )  # fmt: skip
        if rc == -5:
            raise MemoryError("native gather-pool could not allocate its scratch buffers")
        return None if rc else entries.value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the native gather-pool library.")
    parser.add_argument("--out", type=Path, help="where to write it (default: the cache)")
    args = parser.parse_args(argv)
    try:
        path = build(args.out)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    NativeLib(path)  # loads, or raises: a broken build is not reported as a success
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
