"""Router hop benchmark: Gather latency direct-to-shards vs through ``serve-router``.

Usage::

    python benchmarks/router_hop.py            # full run (~2-4 minutes on 2 cores)
    python benchmarks/router_hop.py --quick    # smaller table, fewer calls (smoke run, ~1 min)

Writes ``benchmarks/results/router_hop.json`` and ``router_hop.png`` (``--quick``: into a temp
directory unless ``--out`` is given).

Setup: one store version with a row-sharded and a dim-sharded table of the released layer shape
(Dv = 384, E = 4, h_c = 2, H*m = 160 rows per query) on 2 shards; real ``ultramem-dist
serve-shard`` processes (1 kernel thread each) and one ``ultramem-dist serve-router`` process in
front of them, all on loopback. The caller is the product client (``GatherClient``), one call in
flight: pointed at the two shards it fans out itself ("direct"); pointed at the router it sees a
single shard and the router fans out with the same client code ("router"). Direct and router
calls are interleaved so that drift on a shared machine hits both equally. The extra hop costs one
more request/reply serialization and transfer of the whole batch and one more event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, today  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CLI = [sys.executable, "-c", "from ultramem_dist.cli import main; main()"]
SPEC = {"expansion": 4, "num_cores": 2, "topm": 80, "heads": 2}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _spawn(args: list[str], ready: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [*args, "--ready-file", str(ready)], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT
        )


def _wait_ready(proc: subprocess.Popen, ready: Path, log: Path, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[3:5]} failed to start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    return json.loads(ready.read_text())


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def _measure(
    shards: list[str], router: str, tables: list[str], batches: list[int], calls: int
) -> list[dict]:
    from ultramem_dist.client import GatherClient

    direct = await GatherClient.connect(shards, deadline_s=30)
    routed = await GatherClient.connect(router, deadline_s=30)
    assert direct.layout.num_shards == 2 and routed.layout.num_shards == 1
    rows = []
    g = torch.Generator().manual_seed(1)
    try:
        for table in tables:
            t = direct.table(table)
            per = t.heads * t.topm
            for batch in batches:
                queries = [
                    (
                        torch.randint(0, t.n_rows, (batch, per), generator=g),
                        torch.randint(0, t.expansion, (batch, per), generator=g),
                        torch.randn(batch, per, t.num_cores, generator=g),
                    )
                    for _ in range(4)
                ]

                async def one(client: GatherClient, i: int, queries=queries, table=table) -> float:
                    t0 = time.perf_counter()
                    await client.gather(table, *queries[i % len(queries)])
                    return time.perf_counter() - t0

                # the two paths must agree before their latencies are worth comparing
                a = await direct.gather(table, *queries[0])
                b = await routed.gather(table, *queries[0])
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
                for i in range(10):  # warm-up: connections, page cache, allocator
                    await one(direct, i)
                    await one(routed, i)
                d_t, r_t = [], []
                for i in range(calls):  # interleaved
                    d_t.append(await one(direct, i))
                    r_t.append(await one(routed, i))
                row = {
                    "sharding": t.sharding,
                    "batch": batch,
                    "rows_per_query": per,
                    "calls": calls,
                    "direct_p50_ms": round(_pct(d_t, 0.5) * 1e3, 3),
                    "direct_p99_ms": round(_pct(d_t, 0.99) * 1e3, 3),
                    "router_p50_ms": round(_pct(r_t, 0.5) * 1e3, 3),
                    "router_p99_ms": round(_pct(r_t, 0.99) * 1e3, 3),
                    "hop_p50_ms": round((_pct(r_t, 0.5) - _pct(d_t, 0.5)) * 1e3, 3),
                    "hop_median_of_pairs_ms": round(
                        statistics.median(r - d for r, d in zip(r_t, d_t, strict=True)) * 1e3, 3
                    ),
                    "reply_bytes": batch * t.expansion * t.out_width * 4,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        await direct.close()
        await routed.close()
    return rows


def run(n_rows: int, dv: int, batches: list[int], calls: int, workdir: Path) -> list[dict]:
    from ultramem_dist.store import TableSpec, export_tables

    g = torch.Generator().manual_seed(0)
    table = TableSpec(values=torch.randn(n_rows, dv, generator=g) * 0.02, d_model=2 * dv, **SPEC)
    store = workdir / "store"
    export_tables(
        {"row": table, "dim": table}, store, shards=2, by={"row": "row", "dim": "dim"}, version="b"
    )
    del table
    procs: list[subprocess.Popen] = []
    try:
        shards = []
        starting = []
        for k in (0, 1):
            ready, log = workdir / f"ready-{k}", workdir / f"shard-{k}.log"
            args = [*CLI, "serve-shard", str(store), "--shard", str(k), "--threads", "1"]
            procs.append(_spawn(args, ready, log))
            starting.append((procs[-1], ready, log))
        for proc, ready, log in starting:
            shards.append(f"127.0.0.1:{_wait_ready(proc, ready, log)['port']}")
        ready, log = workdir / "ready-router", workdir / "router.log"
        procs.append(_spawn([*CLI, "serve-router", "--targets", ",".join(shards)], ready, log))
        router = f"127.0.0.1:{_wait_ready(procs[-1], ready, log)['port']}"
        return asyncio.run(_measure(shards, router, ["row", "dim"], batches, calls))
    finally:
        _stop(procs)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    layouts = ["row", "dim"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, layout in zip(axes, layouts, strict=True):
        rs = [r for r in rows if r["sharding"] == layout]
        x = range(len(rs))
        width = 0.38
        for off, path_name, color in (
            (-width / 2, "direct", "#4c72b0"),
            (width / 2, "router", "#dd8452"),
        ):
            p50 = [r[f"{path_name}_p50_ms"] for r in rs]
            p99 = [r[f"{path_name}_p99_ms"] for r in rs]
            xs = [i + off for i in x]
            ax.bar(xs, p50, width, color=color, label=f"{path_name} p50")
            ax.scatter(
                xs,
                p99,
                marker="_",
                s=400,
                color="black",
                zorder=3,
                label="p99" if path_name == "router" else None,
            )
            for xi, v in zip(xs, p50, strict=True):
                ax.text(xi, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), [f"T={r['batch']}\n+{r['hop_p50_ms']:.2f} ms" for r in rs])
        ax.set_title(f"{layout}-sharded table, 2 shards (label: router - direct p50)")
        ax.set_xlabel("batch (queries of 160 rows, Dv=384, E=4)")
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0].set_ylabel("Gather latency (ms), one call in flight")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Router hop cost, loopback, {result['config']['calls']} interleaved calls per bar "
        f"(load average {result['load_average'][0]}-{result['load_average'][1]}): "
        f"{result['machine']}",
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small table and few calls")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default: benchmarks/results; --quick: a temp dir)",
    )
    args = parser.parse_args()
    t0 = time.time()
    load_before = os.getloadavg()
    batches = [1, 16, 64]
    n_rows, calls = (8_192, 40) if args.quick else (65_536, 300)
    dv = 384
    with tempfile.TemporaryDirectory(prefix="router-hop-") as tmp:
        rows = run(n_rows, dv, batches, calls, Path(tmp))
    result = {
        "date": today(),
        "machine": machine(),
        "quick": args.quick,
        "config": {"n_rows": n_rows, "dv": dv, **SPEC, "shards": 2, "calls": calls},
        "rows": rows,
        "seconds": round(time.time() - t0, 1),
        # a shared machine: the 1-minute load average before and after (2 cores)
        "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    out = args.out or (Path(tempfile.mkdtemp(prefix="router-hop-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_hop.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "router_hop.png")
    print(f"wrote {out / 'router_hop.json'} and {out / 'router_hop.png'}")


if __name__ == "__main__":
    main()
