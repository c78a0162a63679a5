"""Shard scaling: Gather throughput with 1 vs 2 shard server processes, row- and dim-sharded.

Usage::

    python benchmarks/shard_scaling.py            # full run (~2 minutes on 2 cores)
    python benchmarks/shard_scaling.py --quick    # smaller table, short windows (smoke run)

Writes ``benchmarks/results/shard_scaling.json`` and ``shard_scaling.png`` (``--quick``: a temp
directory unless ``--out`` is given).

One ``N x 256`` fp32 table (E = 4, h_c = 2, H*m = 160 rows per query) is exported three ways —
1 shard, 2 row shards, 2 dimension shards — and served by ``ultramem-dist serve-shard``
processes with one kernel thread each (as deployed: one torch thread per replica). The product
client (:class:`~ultramem_dist.client.GatherClient`: split/fan-out/sum or concat) keeps
``--inflight`` calls of T queries in flight; QPS = calls / window, measured in interleaved rounds.
The planner's pick for 2 shards (:func:`~ultramem_dist.store.planner.plan_table`, default
constants) is compared with the measured winner. An extra configuration, 1 shard with 2 torch
threads, shows what intra-op threading gets from the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ReadyProcs, save  # noqa: E402

from ultramem_dist.reliability.procs import cpu_seconds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from ultramem_dist.cli import main; main()"]
SPEC = {"expansion": 4, "num_cores": 2, "topm": 80, "heads": 2, "d_model": 512}
DV = 256

# (label, store, table, shards, sharding, torch threads per server)
CONFIGS = [
    ("1 shard", "s1", "t", 1, "none", 1),
    ("2 row shards", "s2", "row", 2, "row", 1),
    ("2 dim shards", "s2", "dim", 2, "dim", 1),
    ("1 shard, 2 threads", "s1t2", "t", 1, "none", 2),
]


def export_stores(rows: int, workdir: Path) -> dict[str, Path]:
    from ultramem_dist.store import TableSpec, export_tables

    g = torch.Generator().manual_seed(0)
    spec = TableSpec(values=torch.randn(rows, DV, generator=g) * 0.02, **SPEC)
    export_tables({"t": spec}, workdir / "s1", shards=1, by="row", version="b1")
    export_tables(
        {"row": spec, "dim": spec},
        workdir / "s2",
        shards=2,
        by={"row": "row", "dim": "dim"},
        version="b2",
    )
    return {"s1": workdir / "s1", "s2": workdir / "s2", "s1t2": workdir / "s1"}


async def window(client: Any, table: str, queries: list, inflight: int, calls: int) -> float:
    """Seconds to complete ``calls`` gathers with ``inflight`` concurrent workers."""
    counter = iter(range(calls))

    async def worker() -> None:
        for i in counter:
            await client.gather(table, *queries[i % len(queries)])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return time.perf_counter() - t0


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) of a process: this one (``None``) or a child by pid."""
    return time.process_time() if pid is None else cpu_seconds(pid)


async def measure(
    targets: dict[str, list[str]],
    pids: dict[str, list[int]],
    rows: int,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """QPS per configuration, plus the CPU each call costs the client and every server: on a
    shared 2-core box the sum bounds the throughput (``cpu_bound_qps``), whatever the load."""
    from ultramem_dist.client import GatherClient
    from ultramem_dist.kernels import gather_pool

    clients = {
        label: await GatherClient.connect(",".join(targets[label]), deadline_s=120)
        for label, *_ in CONFIGS
    }
    g = torch.Generator().manual_seed(1)
    ref_table = torch.randn(rows, DV, generator=torch.Generator().manual_seed(0)) * 0.02
    L = SPEC["heads"] * SPEC["topm"]
    out = []
    try:
        for batch in args.batches:
            queries = [
                (
                    torch.randint(0, rows, (batch, L), generator=g),
                    torch.randint(0, SPEC["expansion"], (batch, L), generator=g),
                    torch.randn(batch, L, SPEC["num_cores"], generator=g),
                )
                for _ in range(4)
            ]
            want = gather_pool(ref_table, *queries[0], SPEC["expansion"])
            for label, _, table, *_ in CONFIGS:  # correctness + warm-up
                got = await clients[label].gather(table, *queries[0])
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=label)
                await window(clients[label], table, queries, args.inflight, 2 * args.inflight)
            secs: dict[str, float] = {label: 0.0 for label, *_ in CONFIGS}
            qps_rounds: dict[str, list[float]] = {label: [] for label, *_ in CONFIGS}
            cpu: dict[str, list[float]] = {
                label: [0.0] * (1 + len(pids[label])) for label, *_ in CONFIGS
            }
            for rnd in range(args.rounds):
                order = CONFIGS if rnd % 2 == 0 else CONFIGS[::-1]
                for label, _, table, *_ in order:
                    who: list[int | None] = [None, *pids[label]]
                    before = [cpu_s(p) for p in who]
                    dt = await window(clients[label], table, queries, args.inflight, args.calls)
                    after = [cpu_s(p) for p in who]
                    cpu[label] = [
                        c + b - a for c, a, b in zip(cpu[label], before, after, strict=True)
                    ]
                    secs[label] += dt
                    qps_rounds[label].append(args.calls / dt)
            n_calls = args.calls * args.rounds
            for label, _, _, shards, sharding, threads in CONFIGS:
                per_call = [1e3 * c / n_calls for c in cpu[label]]
                row = {
                    "shards": shards,
                    "sharding": sharding,
                    "batch": batch,
                    "qps": round(args.calls * args.rounds / secs[label], 2),
                    "threads_per_shard": threads,
                    "inflight": args.inflight,
                    "qps_rounds": [round(q, 2) for q in qps_rounds[label]],
                    "queries_per_s": round(batch * args.calls * args.rounds / secs[label], 1),
                    "client_cpu_ms_per_call": round(per_call[0], 3),
                    "server_cpu_ms_per_call": [round(c, 3) for c in per_call[1:]],
                    # two cores shared by the client and the servers: at best 2 CPU-s per s
                    "cpu_bound_qps": round(
                        min(2e3 / sum(per_call), 1e3 * threads / max(per_call[1:])), 1
                    ),
                }
                out.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for c in clients.values():
            await c.close()
    return out


def planner_view(rows: int) -> dict[str, Any]:
    from ultramem_dist.store.planner import TableShape, plan_table

    shape = TableShape(n_rows=rows, dv=DV, **SPEC)
    plan = plan_table(shape, 2, "auto")
    return {
        "predicted": plan.by,
        "cost_row_us_per_token": round(plan.cost_row * 1e6, 3) if plan.cost_row else None,
        "cost_dim_us_per_token": round(plan.cost_dim * 1e6, 3) if plan.cost_dim else None,
    }


def summarize(rows: list[dict[str, Any]], plan: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"planner": plan, "per_batch": {}}
    for batch in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == batch]
        one = next(r["qps"] for r in rs if r["shards"] == 1 and r["threads_per_shard"] == 1)
        threads2 = next(r["qps"] for r in rs if r["shards"] == 1 and r["threads_per_shard"] == 2)
        two = {r["sharding"]: r["qps"] for r in rs if r["shards"] == 2}
        measured = max(two, key=lambda k: two[k])
        out["per_batch"][f"batch{batch}"] = {
            "speedup_row": round(two["row"] / one, 3),
            "speedup_dim": round(two["dim"] / one, 3),
            "speedup_1shard_2threads": round(threads2 / one, 3),
            "measured_winner": measured,
            "predicted_winner": plan["predicted"],
            "planner_right": measured == plan["predicted"],
            "target_1_6x_met": max(two.values()) / one >= 1.6,
        }
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    labels = [c[0] for c in CONFIGS]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(labels)
    for k, (label, _, _, shards, sharding, threads) in enumerate(CONFIGS):
        ys = []
        for batch in batches:
            r = next(
                r
                for r in rows
                if (r["batch"], r["shards"], r["sharding"], r["threads_per_shard"])
                == (batch, shards, sharding, threads)
            )
            ys.append(r["qps"])
        xs = [i + (k - len(labels) / 2) * width + width / 2 for i in range(len(batches))]
        ax.bar(xs, ys, width, label=label)
        for x, y in zip(xs, ys, strict=True):
            ax.text(x, y, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("Gather calls / s")
    plan = result["summary"]["planner"]["predicted"]
    ax.set_title(
        f"1 vs 2 shard processes on 2 cores (planner predicts {plan}; {result['date']})",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small table, short windows")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--inflight", type=int, default=4, help="calls in flight")
    args = parser.parse_args()
    if args.quick:
        n_rows, args.batches, args.rounds, args.calls = 65_536, [64, 256], 1, 12
    else:
        n_rows, args.batches, args.rounds, args.calls = 262_144, [64, 256], 3, 60
    torch.set_num_threads(1)
    t0 = time.time()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="shard-bench-") as tmp:
        workdir = Path(tmp)
        stores = export_stores(n_rows, workdir)
        servers = ReadyProcs(workdir)
        targets: dict[str, list[str]] = {}
        try:
            groups: dict[tuple[str, int], tuple[int, int]] = {}  # (store, threads) -> procs
            for _, store_key, _, shards, _, threads in CONFIGS:
                if (store_key, threads) not in groups:
                    first = len(servers.items)
                    for k in range(shards):
                        cmd = [*CLI, "serve-shard", str(stores[store_key]), "--shard", str(k)]
                        servers.spawn([*cmd, "--threads", str(threads)], f"{store_key}-{k}")
                    groups[(store_key, threads)] = (first, first + shards)
            all_targets = servers.targets()
            pids: dict[str, list[int]] = {}
            for label, store_key, _, _, _, threads in CONFIGS:
                lo, hi = groups[(store_key, threads)]
                targets[label] = all_targets[lo:hi]
                pids[label] = servers.pids[lo:hi]
            rows = asyncio.run(measure(targets, pids, n_rows, args))
        finally:
            servers.stop()
    plan = planner_view(n_rows)
    summary = summarize(rows, plan)
    result = {
        "rows": rows,
        "predicted_winner": plan["predicted"],
        "measured_winner": {k: v["measured_winner"] for k, v in summary["per_batch"].items()},
        "summary": summary,
        "config": {
            "table": [n_rows, DV],
            "dtype": "float32",
            **SPEC,
            "rows_per_query": SPEC["heads"] * SPEC["topm"],
            "batches": args.batches,
            "inflight": args.inflight,
            "rounds": args.rounds,
            "calls_per_window": args.calls,
            "quick": args.quick,
            "loadavg_start": [round(x, 2) for x in load],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.time() - t0, 1),
        },
    }
    out = save(result, "shard_scaling.json", args.out, args.quick)
    plot(json.loads((out / "shard_scaling.json").read_text()), out / "shard_scaling.png")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out / 'shard_scaling.json'} and shard_scaling.png in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
