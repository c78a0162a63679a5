"""Stream a synthetic row-sharded store of any size (bf16 by default) in bounded memory.

:func:`write_synthetic_store` writes one value table ``[n_rows, dv]`` as a regular store
version — the same safetensors shard files, manifest, sha256 checksums and ``LATEST`` pointer
as :func:`ultramem_dist.store.export.export_tables` — but never holds more than one chunk of
rows in memory: each shard file is written header first, then chunk by chunk, hashed while it
is written. Peak RSS stays at the interpreter + torch + one chunk whatever the table size.

Row ``r`` is a deterministic function of ``(seed, r)`` (seeded normal values × 0.02, generated
in fixed blocks of global rows), so a reader can check any row without the writer.

    python -m ultramem_dist.store.synth OUT --gib 8 --shards 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ultramem_dist.errors import ExportError
from ultramem_dist.store.export import _write_latest
from ultramem_dist.store.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ShardSlot,
    TableEntry,
    check_version_id,
)
from ultramem_dist.store.planner import TableShape, plan_table

__all__ = ["SynthResult", "rows_for_bytes", "synthetic_rows", "write_synthetic_store"]

BLOCK_ROWS = 1 << 16
"""Rows per generated block (the unit that is a function of the seed)."""
_DTYPES = {
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
    "float32": (torch.float32, "F32"),
}


def rows_for_bytes(total_bytes: int, dv: int, dtype: str = "bfloat16") -> int:
    """Rows of a ``dv``-wide table of ``dtype`` that fill ``total_bytes``."""
    size = torch.empty((), dtype=_DTYPES[dtype][0]).element_size()
    return max(1, total_bytes // (dv * size))


def synthetic_rows(seed: int, lo: int, hi: int, dv: int) -> torch.Tensor:
    """Float32 rows ``[lo, hi)`` of the synthetic table (independent of sharding/chunking)."""
    out = torch.empty(hi - lo, dv)
    pos = lo
    while pos < hi:
        block = pos // BLOCK_ROWS
        b_lo = block * BLOCK_ROWS
        g = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.randn(BLOCK_ROWS, dv, generator=g) * 0.02
        take_hi = min(hi, b_lo + BLOCK_ROWS)
        out[pos - lo : take_hi - lo] = rows[pos - b_lo : take_hi - b_lo]
        pos = take_hi
    return out


class SynthResult(dict):
    """``{"manifest", "version_dir", "store_bytes", "export_s", "peak_rss_bytes"}``."""


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _header(table_id: str, tag: str, rows: int, dv: int, nbytes: int, meta: dict) -> bytes:
    head = {
        "__metadata__": meta,
        table_id: {"dtype": tag, "shape": [rows, dv], "data_offsets": [0, nbytes]},
    }
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_synthetic_store(
    out: str | Path,
    *,
    n_rows: int,
    dv: int = 256,
    shards: int = 3,
    dtype: str = "bfloat16",
    version: str | None = None,
    seed: int = 0,
    table_id: str = "mem0",
    expansion: int = 4,
    num_cores: int = 2,
    topm: int = 8,
    heads: int = 2,
    d_model: int = 64,
    chunk_rows: int = BLOCK_ROWS,
    progress: Callable[[int, int], None] | None = None,
) -> SynthResult:
    """Write the synthetic table as a row-sharded store version; returns sizes and timings.

    ``progress(done_bytes, total_bytes)`` is called after every chunk."""
    if dtype not in _DTYPES:
        raise ExportError(f"unknown storage dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    if n_rows < shards or shards < 1:
        raise ExportError(f"need 1 <= shards <= n_rows, got {shards} shards of {n_rows} rows")
    if dv % num_cores:
        raise ExportError(f"Dv={dv} is not divisible by h_c={num_cores}")
    t0 = time.perf_counter()
    torch_dtype, tag = _DTYPES[dtype]
    size = torch.empty((), dtype=torch_dtype).element_size()
    version = check_version_id(version or f"synth-{n_rows}x{dv}-{dtype}-s{seed}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if (root / version).exists():
        raise ExportError(f"store version {version!r} already exists at {root / version}")
    shape = TableShape(n_rows, dv, expansion, num_cores, topm, heads, d_model, False, size)
    plan = plan_table(shape, shards, "row")
    total = n_rows * dv * size
    done = 0
    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=root))
    files: dict[str, FileEntry] = {}
    slots = []
    try:
        for k, (lo, hi) in enumerate(plan.ranges):
            name = f"shard-{k:05d}-of-{shards:05d}.safetensors"
            meta = {"format": "ultramem-dist/value-store", "version": version, "shard": str(k)}
            nbytes = (hi - lo) * dv * size
            h = hashlib.sha256()
            written = 0
            with open(scratch / name, "wb") as f:
                head = _header(table_id, tag, hi - lo, dv, nbytes, meta)
                f.write(head)
                h.update(head)
                written += len(head)
                for c_lo in range(lo, hi, chunk_rows):
                    c_hi = min(hi, c_lo + chunk_rows)
                    part = synthetic_rows(seed, c_lo, c_hi, dv).to(torch_dtype).contiguous()
                    buf = (
                        part.view(torch.uint8).numpy().data
                        if size != 2
                        else (part.view(torch.int16).numpy().data)
                    )
                    f.write(buf)
                    h.update(buf)
                    written += part.numel() * size
                    done += part.numel() * size
                    del part, buf
                    if progress is not None:
                        progress(done, total)
            files[name] = FileEntry(h.hexdigest(), written)
            slots.append(ShardSlot(k, lo, hi, 0, dv, name, table_id, (hi - lo, dv)))
        entry = TableEntry(
            table_id=table_id,
            layer=0,
            n_rows=n_rows,
            dv=dv,
            expansion=expansion,
            num_cores=num_cores,
            d_model=d_model,
            topm=topm,
            heads=heads,
            merged=False,
            sharding="row",
            shards=tuple(slots),
            plan={"requested": "row", "synthetic_seed": seed, **plan.to_json()},
        )
        manifest = Manifest(
            version=version,
            model_id=f"synthetic-seed{seed}",
            config_hash=f"synth{seed}",
            num_shards=shards,
            dtype=dtype,
            tables=(entry,),
            files=files,
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        manifest.validate()
        (scratch / MANIFEST_NAME).write_text(manifest.dumps())
        os.chmod(scratch, 0o755)
        os.rename(scratch, root / version)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    _write_latest(root, version)
    return SynthResult(
        manifest=manifest,
        version_dir=str(root / version),
        store_bytes=total,
        export_s=time.perf_counter() - t0,
        peak_rss_bytes=_peak_rss(),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ultramem_dist.store.synth", description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--gib", type=float, required=True, help="table size in GiB")
    ap.add_argument("--dv", type=int, default=256)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = ap.parse_args(argv)
    if a.gib <= 0:
        print("--gib must be > 0", file=sys.stderr)
        return 2
    n = rows_for_bytes(int(a.gib * (1 << 30)), a.dv, a.dtype)
    last = [0.0]

    def say(done: int, total: int) -> None:
        if not a.json and time.monotonic() - last[0] > 2:
            last[0] = time.monotonic()
            print(f"  {done / total:6.1%} of {total / 2**30:.2f} GiB", file=sys.stderr)

    try:
        res = write_synthetic_store(
            a.out, n_rows=n, dv=a.dv, shards=a.shards, dtype=a.dtype, seed=a.seed, progress=say
        )
    except ExportError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    info = {k: v for k, v in res.items() if k != "manifest"}
    info["version"] = res["manifest"].version
    print(json.dumps(info) if a.json else f"wrote {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
