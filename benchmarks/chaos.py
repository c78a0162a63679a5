"""Chaos benchmark: kill -9 / SIGTERM a shard replica (R = 2) under verified load, kill -9 the
serving worker of a supervised replica (``serve-shard --respawn``); optionally ``ray.kill`` a
Ray ShardActor.

Usage::

    python benchmarks/chaos.py            # kill, term, kill-worker; 2 shards x 2 replicas
    python benchmarks/chaos.py --ray      # ... plus ray.kill of a shard actor
    python benchmarks/chaos.py --quick    # shorter phases (smoke run, temp output)

Writes ``benchmarks/results/chaos.json``: totals over the scenarios (``requests``, ``errors``,
``wrong``, ``partial``, ``recovery_s`` = the slowest recovery) and every scenario's details
(:mod:`ultramem_dist.reliability.chaos` defines restart/recovery/failover times and
ok/partial/wrong). Processes: seeded synthetic store, ``serve-shard`` replicas on 127.0.0.1;
for ``kill``/``term`` the harness restarts the victim's process on its port (a cold start, as
Kubernetes or Ray would); for ``kill-worker`` the replica's own supervisor re-forks its worker
from the preloaded image (``--respawn``, :mod:`ultramem_dist.serving.supervisor`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from ultramem_dist.client import ChannelOptions  # noqa: E402
from ultramem_dist.reliability.chaos import ChaosConfig, run_chaos, timeline_stats  # noqa: E402
from ultramem_dist.reliability.loadtest import LoadTestConfig, Sample, run_loadtest  # noqa: E402
from ultramem_dist.reliability.procs import ShardFleet  # noqa: E402
from ultramem_dist.reliability.synthetic import make_synthetic_store  # noqa: E402


async def ray_scenario(store: Path, concurrency: int, fault_at: float, settle: float) -> dict:
    """``ray.kill`` (with restart) of shard 0 replica 0 of a Ray deployment under load."""
    import ray

    from ultramem_dist.cluster import Deployer, PlacementOptions
    from ultramem_dist.cluster.registry import NAMESPACE

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local throw-away cluster
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             namespace=NAMESPACE, logging_level="ERROR")  # fmt: skip
    deployer = Deployer(PlacementOptions(drain_s=0.5))
    try:
        dep_id = deployer.up(store, replicas=2)
        dep = deployer.status()["deployments"][dep_id]
        endpoints = sorted(r["endpoint"] for reps in dep["replicas"].values()
                           for r in reps.values())  # fmt: skip
        victim = ray.get_actor(f"ultramem-{dep_id}-s0-r0", namespace=NAMESPACE)
        stop = asyncio.Event()
        first: list[float] = []

        def seen(s: Sample) -> None:
            if not first:
                first.append(s.end)

        cfg = LoadTestConfig(targets=endpoints, concurrency=concurrency, duration_s=120,
                             store=store, keep_samples=True, distinct_batches=64,
                             options=ChannelOptions(max_reconnect_backoff_ms=250))  # fmt: skip
        load = asyncio.ensure_future(run_loadtest(cfg, stop=stop, on_sample=seen))
        while not first and not load.done():
            await asyncio.sleep(0.05)
        await asyncio.sleep(fault_at)
        t_fault = time.monotonic()
        ray.kill(victim, no_restart=False)
        recovery = restart = None
        limit = t_fault + 90
        while time.monotonic() < limit:
            try:
                info = await asyncio.to_thread(ray.get, victim.info.remote(), timeout=5)
            except Exception:  # restarting
                await asyncio.sleep(0.1)
                continue
            if info["restarts"] >= 1 and restart is None:
                restart = time.monotonic() - t_fault
            if info["restarts"] >= 1 and info["requests"] > 0:
                recovery = time.monotonic() - t_fault
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(settle)
        stop.set()
        res = await load
    finally:
        deployer.down()
        ray.shutdown()
    failover_ms, qps_before, ratio = timeline_stats(res.samples, t_fault)
    return {
        "scenario": "ray.kill shard 0 replica 0 (Ray restarts the actor on its port)",
        "shards": res.shards, "replicas": res.replicas, "concurrency": concurrency,
        "requests": res.requests, "errors": res.errors, "wrong": res.wrong,
        "partial": res.partial, "errors_by_status": res.errors_by_status,
        "restart_s": None if restart is None else round(restart, 3),
        "recovery_s": None if recovery is None else round(recovery, 3),
        "failover_max_ms": round(failover_ms, 1), "qps_before": round(qps_before, 1),
        "min_qps_ratio": round(ratio, 3), "p50_ms": res.p50_ms, "p99_ms": res.p99_ms,
        "duration_s": res.duration_s,
    }  # fmt: skip


def idle_restart_s(store: Path, workdir: Path, rounds: int = 3) -> list[float]:
    """kill -9 + restart of one replica with no load running: the bare process start cost
    (interpreter and imports — no torch on a CPU shard —, the shard's verification — cached
    after the first load, ``serve-shard --verify cached`` —, bind) on this machine."""
    import signal

    times = []
    with ShardFleet(store, workdir, shards=[0], replicas=1) as fleet:
        rep = fleet.replicas[0]
        for _ in range(rounds):
            fleet.signal(rep, signal.SIGKILL)
            fleet.wait_exit(rep)
            t0 = time.monotonic()
            fleet.restart(rep)
            times.append(round(time.monotonic() - t0, 3))
    return times


def idle_refork_s(store: Path, workdir: Path, rounds: int = 3) -> list[float]:
    """kill -9 of a supervised replica's worker with no load running: fault -> the re-forked
    worker serves (its pid in the ready file). Rounds are spaced past the supervisor's
    ``--respawn-min-uptime`` (1 s), so each re-fork is immediate, as for a lone crash."""
    import signal

    times = []
    with ShardFleet(store, workdir, shards=[0], replicas=1, respawn=True) as fleet:
        rep = fleet.replicas[0]
        for _ in range(rounds):
            time.sleep(1.2)
            t0 = time.monotonic()
            old = fleet.signal_worker(rep, signal.SIGKILL)
            fleet.wait_worker(rep, old, 30)
            times.append(round(time.monotonic() - t0, 3))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases, temp output")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--ray", action="store_true", help="also ray.kill a Ray shard actor")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    fault_at, settle = (1.0, 0.5) if args.quick else (3.0, 3.0)
    load_before = os.getloadavg()
    scenarios = []
    with tempfile.TemporaryDirectory(prefix="ultramem-chaos-") as tmp:
        store = make_synthetic_store(Path(tmp) / "store", shards=args.shards, seed=0,
                                     tables={"row": ("row", False)})  # fmt: skip
        idle = idle_restart_s(store, Path(tmp) / "idle", rounds=2 if args.quick else 5)
        print(f"idle restart times: {idle}", flush=True)
        idle_refork = idle_refork_s(store, Path(tmp) / "refork", rounds=2 if args.quick else 3)
        print(f"idle re-fork times: {idle_refork}", flush=True)
        for fault in ("kill", "term", "kill-worker"):
            # a re-fork recovers in well under a second: keep >= 2 full 0.5 s throughput
            # windows of load after the fault so min_qps_ratio measures something
            keep = max(settle, 1.5) if fault == "kill-worker" else settle
            cfg = ChaosConfig(store=store, workdir=Path(tmp) / f"run-{fault}", fault=fault,
                              shards=args.shards, replicas=args.replicas,
                              concurrency=args.concurrency, fault_at_s=fault_at,
                              settle_s=keep)  # fmt: skip
            print(f"scenario {fault} ...", flush=True)
            scenarios.append(asyncio.run(run_chaos(cfg)).to_json())
            print(json.dumps(scenarios[-1]), flush=True)
        if args.ray:
            print("scenario ray.kill ...", flush=True)
            scenarios.append(asyncio.run(ray_scenario(store, args.concurrency, fault_at, settle)))
            print(json.dumps(scenarios[-1]), flush=True)
    recov = [s["recovery_s"] for s in scenarios if s["recovery_s"] is not None]
    totals = {k: sum(s[k] for s in scenarios) for k in ("requests", "errors", "wrong", "partial")}
    clean = all(totals[k] == 0 for k in ("errors", "wrong", "partial"))
    by_scenario = {s["scenario"]: s["recovery_s"] for s in scenarios}
    refork = [s for s in scenarios if s["scenario"].startswith("kill-worker")]
    payload = {
        **totals,
        "recovery_s": max(recov) if len(recov) == len(scenarios) else None,
        "recovery_s_by_scenario": by_scenario,
        "goal": {"errors": 0, "wrong": 0, "partial": 0, "recovery_s_max": 5.0},
        "goal_met": clean and len(recov) == len(scenarios) and max(recov) < 5.0,
        "goal_met_worker_crash": clean
        and bool(refork)
        and all(s["recovery_s"] is not None and s["recovery_s"] < 5.0 for s in refork),
        "definitions": {
            "partial": "reply shape/coverage differs from the request's, or the answer equals "
            "the sum of a proper subset of the shards' contributions (row: a partial sum "
            "missing a shard; dim: a shard's columns absent) while the full answer differs",
            "wrong": "any other answer that is not within rtol 1e-4 / atol 1e-5 of the "
            "reference computed from the store files with the shared kernel",
            "restart_s": "fault -> the replacement serves (ready file: a new process; for "
            "kill-worker a new worker pid re-forked by the replica's supervisor)",
            "kill-worker": "SIGKILL of the serving worker of a serve-shard --respawn replica; "
            "kill and term are cold restarts of a whole (unsupervised) replica",
            "recovery_s": "fault -> the replacement has answered load traffic (full capacity)",
            "cold_start_s": "median of idle_restart_s (5 rounds): idle cold start of a replica "
            "to serving, verification cached",
            "idle_restart_s": "kill -9 + restart with no load: the bare process start cost; "
            "under load the replacement competes with the load for the same 2 cores",
            "idle_refork_s": "kill -9 of a supervised replica's worker with no load -> the "
            "re-forked worker serves (no import, no sha256: fork + build/bind the gRPC server)",
        },
        "idle_restart_s": idle,
        "cold_start_s": statistics.median(idle),
        "idle_refork_s": idle_refork,
        "scenarios": scenarios,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "quick": args.quick,
    }
    out = save(payload, "chaos.json", args.out, args.quick)
    print(json.dumps({k: v for k, v in payload.items() if k != "scenarios"}, indent=2))
    print(f"wrote {out / 'chaos.json'}")
    sys.exit(0 if totals["errors"] == totals["wrong"] == totals["partial"] == 0 else 1)


if __name__ == "__main__":
    main()
