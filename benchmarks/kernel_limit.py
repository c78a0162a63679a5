"""Gather-pool kernel vs the memory limit: GB/s of value rows read vs ``Tensor.copy_``.

Usage::

    python benchmarks/kernel_limit.py            # full run (~3 minutes on 2 cores)
    python benchmarks/kernel_limit.py --quick    # smaller tables, fewer reps, no torch.compile

``cold`` in the JSON: per dtype, T and thread count, the product kernel's ``cold_ratio`` (its
GB/s over ``copy_``'s of the same bytes on the cold table) and ``rows_per_s``.

Writes ``benchmarks/results/kernel_limit.json`` and ``kernel_limit.png`` (``--quick``: a temp
directory unless ``--out`` is given).

Workload: T queries x L = 160 rows (H = 2, m = 80), E = 4 IVE blocks, h_c = 2 MCS cores over a
``rows x 256`` table (an unsharded table: two 128-wide core segments). GB/s counts the bytes of
value rows the kernel must read (``T * L * 256 * itemsize``); the memcpy baseline copies the same
number of bytes with ``Tensor.copy_`` from the table itself — rotating through a cold table, or
re-reading a warm one — so cold is compared with cold and warm with warm. Every timed call on a
cold table follows a read of a buffer 2x the last-level cache (caches evicted); variants are
interleaved.

Tables: *cold* (at least 1 Mi rows, doubled until even the half-precision tables are 4x the
last-level cache sysfs reports: 4 Mi rows = 4 GiB fp32 / 2 GiB bf16 on a 480 MiB-L3 machine) and
*warm* (4 Ki rows: 4 MiB fp32, inside L3). Two baselines are timed beside every variant:
``memcpy`` (``copy_`` of the same number of bytes, sequential) and ``gather_copy``
(``index_select`` of the same rows, no arithmetic: the random-row read rate the memory system
gives this row size, which a gather-pool cannot beat). Variants, every one checked against a
float64 reference:

* ``gather_pool`` — the product kernel (the native C path where a compiler is present);
  ``gather_pool_no_prefetch`` — the same with its software prefetch of the next token's rows
  off (what the prefetch buys);
* ``bag_only`` — the same single ``embedding_bag`` call on entries prepared in advance (the
  kernel minus its bookkeeping: what the bookkeeping costs);
* ``sorted_rows`` — entries additionally sorted by row inside every bag, sort included
  (does address order buy locality?); ``sorted_rows_bag`` — its bag call alone;
* ``gather_then_bmm`` — materialise the rows (``index_select``), then two batched matmuls with
  one-hot block x core weights (no sort at all);
* ``compiled`` (full run only) — ``torch.compile`` of a dense reduction formulation;
* half tables: ``gather_pool`` converts only the gathered rows and accumulates in fp32; also
  ``half_native_bag`` — ``embedding_bag`` in the storage dtype with weights rounded to it (lossy;
  checked with a half-precision tolerance and marked ``exact: false``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ARGS = sys.argv[1:]
if "--pages=4k" not in _ARGS and ("--pages", "4k") not in zip(_ARGS, _ARGS[1:], strict=False):
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch loads: read once by c10

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from ultramem_dist.kernels import gather_pool, native  # noqa: E402
from ultramem_dist.kernels.gather_pool import _weighted_bag  # noqa: E402  (its inner call)

E, HC, L, DV = 4, 2, 160, 256
SEG = DV // HC
TOL = {  # exact variants: (rtol, atol) vs the float64 reference
    "exact": (1e-4, 1e-4),
}
LOSSY_REL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}
"""Lossy variants: max |error| as a fraction of max |reference| (half-precision rounding)."""

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_inputs(n_rows: int, batch: int, seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, n_rows, (batch, L), generator=g),
        torch.randint(0, E, (batch, L), generator=g),
        torch.randn(batch, L, HC, generator=g),
    )


def reference(table: torch.Tensor, x: Inputs) -> torch.Tensor:
    """float64 ``out[t, e, core c cols] = sum_l [blk == e] * w[l, c] * row(l)[core c cols]``."""
    idx, blk, w = x
    t = idx.shape[0]
    rows = table.index_select(0, idx.reshape(-1)).double().view(t, L, HC, SEG)
    onehot = F.one_hot(blk, E).double()  # [T, L, E]
    out = torch.einsum("tle,tlc,tlcw->tecw", onehot, w.double(), rows)
    return out.reshape(t, E, DV)


def prepared_entries(x: Inputs, sort_rows: bool) -> tuple[torch.Tensor, ...]:
    """Entries of one ``embedding_bag`` over the ``[rows * 2, 128]`` view, (token, block,
    segment) bags; with ``sort_rows`` the entries of every bag are in ascending row order."""
    idx, blk, w = x
    t = idx.shape[0]
    seg = torch.arange(HC)
    bag = (torch.arange(t)[:, None] * E + blk).reshape(-1)
    ent_idx = (idx.reshape(-1, 1) * HC + seg).reshape(-1)
    ent_bag = (bag[:, None] * HC + seg).reshape(-1)
    ent_w = w.reshape(-1)
    key = ent_bag * (1 << 40) + ent_idx if sort_rows else ent_bag
    order = torch.sort(key, stable=True).indices
    offsets = torch.zeros(t * E * HC, dtype=torch.long)
    torch.cumsum(torch.bincount(ent_bag, minlength=t * E * HC)[:-1], 0, out=offsets[1:])
    return ent_idx[order], offsets, ent_w[order].contiguous()


def bag_call(table: torch.Tensor, prep: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ent_idx, offsets, ent_w = prep
    view = table.view(-1, SEG)
    if table.dtype != ent_w.dtype:  # the product kernel's half-storage path (fp32 accumulation)
        out = _weighted_bag(view, ent_idx.numpy(), offsets.numpy(), ent_w)
    else:
        out = F.embedding_bag(ent_idx, view, offsets, mode="sum", per_sample_weights=ent_w)
    return out.view(-1, E, DV)


def sorted_rows_full(table: torch.Tensor, x: Inputs) -> torch.Tensor:
    return bag_call(table, prepared_entries(x, sort_rows=True))


def gather_then_bmm(table: torch.Tensor, x: Inputs) -> torch.Tensor:
    idx, blk, w = x
    t = idx.shape[0]
    rows = table.index_select(0, idx.reshape(-1)).to(w.dtype).view(t, L, DV)
    onehot = F.one_hot(blk, E).to(w.dtype).transpose(1, 2)  # [T, E, L]
    parts = [
        torch.bmm(onehot * w[:, None, :, c], rows[:, :, c * SEG : (c + 1) * SEG]) for c in range(HC)
    ]
    return torch.cat(parts, dim=-1)


def half_native_bag(table: torch.Tensor, prep: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ent_idx, offsets, ent_w = prep
    out = F.embedding_bag(
        ent_idx, table.view(-1, SEG), offsets, mode="sum", per_sample_weights=ent_w.to(table.dtype)
    )
    return out.view(-1, E, DV).float()


def dense_reduction(
    table: torch.Tensor, idx: torch.Tensor, blk: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Sort-free formulation for ``torch.compile``: a reduction over L of gathered rows."""
    t = idx.shape[0]
    rows = table[idx].view(t, L, 1, HC, SEG).to(w.dtype)
    onehot = (blk[..., None] == torch.arange(E, device=blk.device)).to(w.dtype)  # [T, L, E]
    ww = onehot[..., None] * w[:, :, None, :]  # [T, L, E, HC]
    return (ww[..., None] * rows).sum(1).reshape(t, E, DV)


THREADED = ["gather_pool", "gather_pool_no_prefetch"]
"""Variants also timed with more than one thread."""


def no_prefetch(table: torch.Tensor, x: Inputs) -> torch.Tensor:
    """The product kernel with its software prefetch of the next token's rows turned off."""
    lib = native.library()
    if lib is None:
        return gather_pool(table, *x, E)
    old = lib._lib.um_set_prefetch(0)
    try:
        return gather_pool(table, *x, E)
    finally:
        lib._lib.um_set_prefetch(old)


_EVICT = torch.empty(0)


def l3_bytes() -> int:
    """The last-level cache size this machine reports (sysfs), else 32 MiB."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return max(sizes, default=32 << 20)


def evict_caches() -> None:
    """Read a buffer 2x the last-level cache (at least 96 MiB): the next call finds none of its
    rows in cache (without this, a variant timed right after another one re-reads the rows that
    one just pulled in)."""
    global _EVICT
    if _EVICT.numel() == 0:
        _EVICT = torch.ones(max(96 << 20, 2 * l3_bytes()) // 4)
    float(_EVICT.sum())


class GatherCopy:
    """The same rows gathered with no arithmetic (``index_select`` into a buffer allocated
    once, like ``Memcpy``'s: a fresh output would time its page faults): what the memory
    system gives a random-row read of this row size, the kernel's own ceiling."""

    def __init__(self, table: torch.Tensor, idx: torch.Tensor) -> None:
        self.table, self.idx = table, idx.reshape(-1).contiguous()
        self.out = torch.empty(self.idx.numel(), table.shape[1], dtype=table.dtype)
        self.out.zero_()  # touch every page now

    def __call__(self) -> torch.Tensor:
        return torch.index_select(self.table, 0, self.idx, out=self.out)


def time_ms(fn: Callable[[], object], cold: bool) -> float:
    if cold:
        evict_caches()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


class Memcpy:
    """``copy_`` of ``nbytes`` taken from ``table``: rotating chunks (cold) or the whole warm
    table again and again (it stays in cache)."""

    def __init__(self, table: torch.Tensor, nbytes: int) -> None:
        self.src = table.view(-1).view(torch.uint8)
        self.nbytes = nbytes
        self.chunk = min(nbytes, self.src.numel())
        self.dst = torch.empty(self.chunk, dtype=torch.uint8)
        self.pos = 0

    def __call__(self) -> None:
        left = self.nbytes
        while left > 0:
            n = min(left, self.chunk)
            if self.pos + n > self.src.numel():
                self.pos = 0
            self.dst[:n].copy_(self.src[self.pos : self.pos + n])
            self.pos += n
            left -= n


def bench_table(
    name: str,
    table: torch.Tensor,
    batches: list[int],
    threads: list[int],
    reps: int,
    compiled: Callable[..., torch.Tensor] | None,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    dtype = table.dtype
    itemsize = table.element_size()
    for batch in batches:
        x = make_inputs(table.shape[0], batch, seed=batch)
        ref = reference(table, x)
        prep = prepared_entries(x, sort_rows=False)
        prep_sorted = prepared_entries(x, sort_rows=True)
        variants: dict[str, tuple[Callable[[], torch.Tensor], bool]] = {
            "gather_pool": (lambda x=x: gather_pool(table, *x, E), True),
            "gather_pool_no_prefetch": (lambda x=x: no_prefetch(table, x), True),
            "bag_only": (lambda p=prep: bag_call(table, p), True),
            "sorted_rows": (lambda x=x: sorted_rows_full(table, x), True),
            "sorted_rows_bag": (lambda p=prep_sorted: bag_call(table, p), True),
            "gather_then_bmm": (lambda x=x: gather_then_bmm(table, x), True),
        }
        if dtype != torch.float32:
            variants["half_native_bag"] = (lambda p=prep: half_native_bag(table, p), False)
        if compiled is not None and dtype == torch.float32:
            variants["compiled"] = (lambda x=x: compiled(table, *x), True)
        nbytes = batch * L * DV * itemsize
        memcpy = Memcpy(table, nbytes)
        baselines = {"memcpy": memcpy, "gather_copy": GatherCopy(table, x[0])}
        checks: dict[str, dict[str, Any]] = {}
        scale = float(ref.abs().max())
        for v, (fn, exact) in variants.items():  # correctness first (and warm-up)
            got = fn().double()
            err = float((got - ref).abs().max())
            if exact:
                rtol, atol = TOL["exact"]
                torch.testing.assert_close(
                    got, ref, rtol=rtol, atol=atol, msg=lambda m, v=v: f"{v}: {m}"
                )
            elif err > LOSSY_REL[dtype] * scale:
                raise AssertionError(f"{v}: max error {err:.3g} vs output scale {scale:.3g}")
            checks[v] = {"exact": exact, "max_abs_err": round(err, 7)}
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            names = [*baselines, *(variants if n_threads == threads[0] else THREADED)]
            fns: dict[str, Callable[[], object]] = dict(baselines)
            fns.update({v: variants[v][0] for v in names if v not in baselines})
            for fn in fns.values():
                fn()
            samples: dict[str, list[float]] = {v: [] for v in names}
            for _ in range(reps):  # interleaved: drift on a shared machine hits all alike
                for v in names:
                    samples[v].append(time_ms(fns[v], cold=name == "cold"))
            memcpy_ms = statistics.median(samples["memcpy"])
            gather_ms = statistics.median(samples["gather_copy"])
            for v in names:
                ms = statistics.median(samples[v])
                rows.append(
                    {
                        "table": name,
                        "dtype": str(dtype).removeprefix("torch."),
                        "table_mib": round(table.numel() * itemsize / 2**20, 1),
                        "batch": batch,
                        "threads": n_threads,
                        "variant": v,
                        "ms": round(ms, 3),
                        "min_ms": round(min(samples[v]), 3),
                        "gbps": round(nbytes / ms / 1e6, 2),
                        "vs_memcpy": round(memcpy_ms / ms, 3),
                        "vs_gather_copy": round(gather_ms / ms, 3),
                        "rows_per_s": round(batch * L / ms * 1e3),
                        "bytes": nbytes,
                        **checks.get(v, {}),
                    }
                )
            print(
                f"{name:4s} {str(dtype):15s} T={batch:4d} threads={n_threads}: "
                + ", ".join(f"{r['variant']} {r['gbps']}" for r in rows[-len(names) :]),
                flush=True,
            )
    torch.set_num_threads(threads[0])
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["threads"] == 1]
    batch = max(r["batch"] for r in rows)
    groups = sorted({(r["table"], r["dtype"]) for r in rows if r["batch"] == batch})
    variants = [
        "memcpy",
        "gather_copy",
        "gather_pool",
        "gather_pool_no_prefetch",
        "bag_only",
        "sorted_rows",
        "sorted_rows_bag",
        "gather_then_bmm",
        "half_native_bag",
        "compiled",
    ]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(variants)
    for k, v in enumerate(variants):
        xs, ys = [], []
        for i, grp in enumerate(groups):
            r = [x for x in rows if (x["table"], x["dtype"]) == grp and x["batch"] == batch]
            r = [x for x in r if x["variant"] == v]
            if r:
                xs.append(i + (k - len(variants) / 2) * width + width / 2)
                ys.append(r[0]["gbps"])
        if xs:
            ax.bar(xs, ys, width, label=v)
    ax.set_xticks(range(len(groups)), [f"{t} {d}" for t, d in groups])
    ax.set_ylabel("GB/s of value rows read (1 thread)")
    ax.set_title(
        f"gather-pool vs copy_ on the same bytes, T={batch} x {L} rows, E={E}, h_c={HC}, "
        f"Dv={DV} ({result['date']})",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in rows:
        if r["variant"] != "gather_pool":
            continue
        key = f"{r['table']}_{r['dtype']}_T{r['batch']}_threads{r['threads']}"
        best = max(
            (
                x
                for x in rows
                if (x["table"], x["dtype"], x["batch"], x["threads"])
                == (r["table"], r["dtype"], r["batch"], r["threads"])
                and x["variant"] not in ("memcpy", "gather_copy")
                and x.get("exact", True)
            ),
            key=lambda x: x["gbps"],
        )
        out[key] = {
            "gather_pool_gbps": r["gbps"],
            "gather_pool_vs_memcpy": r["vs_memcpy"],
            "fastest_exact_variant": best["variant"],
            "fastest_gbps": best["gbps"],
        }
    return out


def cold_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The product kernel on the cold table, per dtype, T and thread count: ``cold_ratio``
    (kernel GB/s / ``copy_`` GB/s of the same bytes, measured interleaved), ``gather_ratio``
    (kernel / ``index_select`` of the same rows: the random-row read ceiling), ``rows_per_s``
    and that rate relative to float32's at the same T and threads (half tables read half the
    bytes per row, so >= 1 is the goal)."""
    kern = [r for r in rows if r["table"] == "cold" and r["variant"] == "gather_pool"]
    nopf = {
        (r["dtype"], r["batch"], r["threads"]): r["vs_memcpy"]
        for r in rows
        if r["table"] == "cold" and r["variant"] == "gather_pool_no_prefetch"
    }
    fp32 = {(r["batch"], r["threads"]): r["rows_per_s"] for r in kern if r["dtype"] == "float32"}
    out: dict[str, Any] = {}
    for r in kern:
        base = fp32.get((r["batch"], r["threads"]))
        out.setdefault(r["dtype"], {})[f"T{r['batch']}_threads{r['threads']}"] = {
            "cold_ratio": r["vs_memcpy"],
            "gather_ratio": r["vs_gather_copy"],
            "kernel_gbps": r["gbps"],
            "rows_per_s": r["rows_per_s"],
            "rows_per_s_vs_float32": round(r["rows_per_s"] / base, 3) if base else None,
            "cold_ratio_no_prefetch": nopf.get((r["dtype"], r["batch"], r["threads"])),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small tables, few reps")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument(
        "--pages",
        choices=["huge", "4k"],
        default="huge",
        help="table memory: 2 MiB transparent huge pages (default: what a shard's file mapping "
        "gets) or 4 KiB pages",
    )
    args = parser.parse_args()
    t0 = time.time()
    load = os.getloadavg()
    lib = native.library()
    if args.quick:
        cold_rows, batches, threads, reps = 1 << 18, [16, 256], [1], 3
    else:  # cold: even the half tables >= 4x the last-level cache (and >= 1 Mi rows)
        cold_rows, batches, threads, reps = 1 << 20, [16, 256], [1, 2], 11
        while cold_rows * DV * 2 < 4 * l3_bytes():
            cold_rows *= 2
    warm_rows = 4096
    torch.set_num_threads(threads[0])
    compiled = None
    compile_s = None
    if not args.quick:
        tc = time.time()
        compiled = torch.compile(dense_reduction, dynamic=True)
        w = torch.randn(warm_rows, DV)
        compiled(w, *make_inputs(warm_rows, batches[-1], 0))  # compile once, outside timing
        compile_s = round(time.time() - tc, 1)
    g = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for name, n in (("warm", warm_rows), ("cold", cold_rows)):
        base = torch.empty(n, DV)
        base.normal_(generator=g)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            table = base if dtype == torch.float32 else base.to(dtype)
            rows += bench_table(name, table, batches, threads, reps, compiled)
            del table
        del base
    result = {
        "rows": rows,
        "summary": summarize(rows),
        "cold": cold_table(rows),
        "config": {
            "E": E,
            "h_c": HC,
            "rows_per_query": L,
            "dv": DV,
            "cold_rows": cold_rows,
            "warm_rows": warm_rows,
            "l3_bytes": l3_bytes(),
            "pages": args.pages,
            "batches": batches,
            "threads": threads,
            "reps": reps,
            "compile_s": compile_s,
            "quick": args.quick,
            "isa": lib.isa if lib is not None else None,
            "native_cflags": os.environ.get("ULTRAMEM_NATIVE_CFLAGS", "-march=native"),
            "loadavg_start": [round(x, 2) for x in load],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.time() - t0, 1),
        },
    }
    out = save(result, "kernel_limit.json", args.out, args.quick)
    plot(json.loads((out / "kernel_limit.json").read_text()), out / "kernel_limit.png")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out / 'kernel_limit.json'} and kernel_limit.png in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
