"""Verified load benchmark: C concurrent callers for T seconds against local serve-shard processes.

Usage::

    python benchmarks/loadtest.py            # 32 callers x 60 s, 2 shards x 2 replicas
    python benchmarks/loadtest.py --quick    # 8 callers x 5 s (smoke run, temp output)

Writes ``benchmarks/results/loadtest.json``. A seeded synthetic store (row-sharded, 4096 x 64
fp32, E=4, h_c=2, H*m=16 entries per query) is exported to a temp directory and served by
``shards x replicas`` ``ultramem-dist serve-shard`` processes on 127.0.0.1; the load generator
(:mod:`ultramem_dist.reliability.loadtest`, one asyncio process, the production
``GatherClient``) verifies every answer against the store files with the shared kernel.
Goal: 0 errors, 0 wrong answers, p99 <= 5 x p50. The machine's load average is recorded before
and after: the numbers are only comparable between runs on an equally quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from ultramem_dist.reliability.loadtest import LoadTestConfig, run_loadtest  # noqa: E402
from ultramem_dist.reliability.procs import ShardFleet, cpu_seconds  # noqa: E402
from ultramem_dist.reliability.synthetic import make_synthetic_store  # noqa: E402


def _cpu(fleet: ShardFleet) -> tuple[float, float]:
    """(this process's CPU seconds, all shard processes' CPU seconds)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime, sum(cpu_seconds(r.pid) for r in fleet.replicas if r.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 callers x 5 s, temp output")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--table", default="row", help="row | dim | row_m | dim_m")
    parser.add_argument("--batch", type=int, default=8, help="queries per call")
    parser.add_argument("--warmup", type=float, default=None, help="unrecorded seconds first")
    args = parser.parse_args()
    concurrency = args.concurrency or (8 if args.quick else 32)
    duration = args.duration or (5.0 if args.quick else 60.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 5.0)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ultramem-loadtest-") as tmp:
        store = make_synthetic_store(Path(tmp) / "store", shards=args.shards, seed=0)
        with ShardFleet(store, Path(tmp) / "run", shards=args.shards,
                        replicas=args.replicas) as fleet:  # fmt: skip
            base = {"targets": fleet.targets(), "table": args.table, "batch": args.batch,
                    "store": store, "concurrency": concurrency}  # fmt: skip
            if warmup > 0:  # connections, page cache, allocator: not recorded
                asyncio.run(run_loadtest(LoadTestConfig(duration_s=warmup, **base)))
            load_start = os.getloadavg()
            cpu0 = _cpu(fleet)
            res = asyncio.run(run_loadtest(LoadTestConfig(duration_s=duration, **base)))
            cpu1 = _cpu(fleet)
    load_after = os.getloadavg()
    ratio = res.p99_ms / res.p50_ms if res.p50_ms > 0 else float("inf")
    payload = {
        "concurrency": res.concurrency,
        "duration_s": res.duration_s,
        "requests": res.requests,
        "errors": res.errors,
        "wrong": res.wrong,
        "partial": res.partial,
        "p50_ms": res.p50_ms,
        "p95_ms": res.p95_ms,
        "p99_ms": res.p99_ms,
        "max_ms": res.max_ms,
        "qps": res.qps,
        "p99_over_p50": round(ratio, 2),
        "errors_by_status": res.errors_by_status,
        "goal": {"errors": 0, "wrong": 0, "p99_over_p50_max": 5.0},
        "goal_met": res.errors == 0 and res.wrong == 0 and res.partial == 0 and ratio <= 5.0,
        "setup": {
            "shards": res.shards,
            "replicas": res.replicas,
            "table": res.table,
            "sharding": res.sharding,
            "batch": res.batch,
            "entries_per_query": 16,
            "warmup_s": warmup,
            "server": "ultramem-dist serve-shard --threads 1 (inline kernel), 127.0.0.1",
            "client": "one asyncio process, GatherClient, every answer verified",
        },
        "cpu_s": {  # where the 2 cores went during the measured run
            "load_generator": round(cpu1[0] - cpu0[0], 1),
            "shard_servers": round(cpu1[1] - cpu0[1], 1),
            "wall": res.duration_s,
            "cores": os.cpu_count(),
        },
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_at_start": [round(x, 2) for x in load_start],
        "loadavg_after": [round(x, 2) for x in load_after],
        "quick": args.quick,
    }
    out = save(payload, "loadtest.json", args.out, args.quick)
    print(json.dumps(payload, indent=2))
    print(f"wrote {out / 'loadtest.json'}")
    sys.exit(0 if payload["goal_met"] else 1)


if __name__ == "__main__":
    main()
