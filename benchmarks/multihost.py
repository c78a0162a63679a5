"""Multi-host scale-out on one box: 3 namespace-hosts, a real 3-node Ray cluster, big stores.

Runs (as root) on :class:`ultramem_dist.multihost.MultiHost` — network namespaces on a bridge in
198.18.0.0/15, a memory cgroup per host (``--host-memory-gib``, default 4), a Ray head on host 0
and workers on hosts 1-2 — and measures, in this order:

1. ``tokens_identical``: greedy generation in host 0 with every table remote == the local model.
2. ``partition``: host 1's link down for 3 s under verified load (replicas=2).
3. ``netem``: the skip-layer overlap (benchmarks/overlap.py's ``measure``) with 0/1/5 ms
   delay on the host 0 -> host 1 hop: ``tc netem`` where the kernel has it, else the
   user-space delay relay (``method`` in each row says which).
4. ``size_scaling``: bf16 stores of 0.5/2/8 GiB (``--sizes``), 3 row shards, one per host:
   streaming export time and peak RSS (its own process), deploy (load + sha256 verify, cold:
   the files' pages dropped with ``posix_fadvise`` first), first lookup, steady p50 at batch
   64, shard RSS; every store's lookups verified against rows read directly from its files.
5. ``throughput``: QPS at batch 64 with 1, 2, 3 shard hosts, one client (host 0).
6. ``host_kill``: host 2 SIGKILLed (every process of its cgroup/namespace) under verified load.

Writes benchmarks/results/multihost.json and multihost.png. Big stores live under
``--work-dir`` (default /tmp) and are deleted at the end.

    sudo nice -n 10 python benchmarks/multihost.py [--sizes 0.5,2,8] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402
import torch  # noqa: E402
from common import plot_path, save  # noqa: E402

from ultramem_dist.cluster import Deployer, PlacementOptions  # noqa: E402
from ultramem_dist.multihost import MultiHost, skip_reason  # noqa: E402
from ultramem_dist.multihost.harness import pin_registry  # noqa: E402
from ultramem_dist.multihost.load import start_load, summarize  # noqa: E402

GIB = 1 << 30


def say(*a: object) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def replicas(deployer: Deployer) -> list[dict[str, Any]]:
    snap = deployer.status()
    dep = snap["deployments"][snap["active"]]
    return [
        {"shard": int(s), "replica": int(r), **rec}
        for s, reps in dep["replicas"].items()
        for r, rec in reps.items()
    ]


def undeploy(deployer: Deployer) -> None:
    """Stop every deployment but keep the registry (pinned to host 0 by :func:`main`)."""
    snap = ray.get(deployer.registry.snapshot.remote())
    for dep_id in snap["deployments"]:
        deployer.stop_deployment(dep_id)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_cache(version_dir: Path) -> None:
    """Evict this store's pages only (never the whole machine's cache)."""
    for f in version_dir.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bigcheck(mh: MultiHost, cfg: dict[str, Any]) -> dict[str, Any]:
    proc = mh.hosts[0].run(
        [sys.executable, "-m", "ultramem_dist.multihost.bigcheck", json.dumps(cfg)], timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bigcheck failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_store(out: Path, gib: float, shards: int) -> dict[str, Any]:
    """The streaming export in its own process (so its peak RSS is its own)."""
    cmd = [
        sys.executable,
        "-m",
        "ultramem_dist.store.synth",
        str(out),
        "--gib",
        str(gib),
        "--shards",
        str(shards),
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tokens_identical(mh: MultiHost, work: Path) -> dict[str, Any]:
    from ultramem_dist.model import MemoryLM, preset, save_pretrained
    from ultramem_dist.store.export import export_checkpoint

    torch.manual_seed(0)
    ckpt = save_pretrained(MemoryLM(preset("micro")).eval(), work / "micro-ckpt")
    export_checkpoint(ckpt, work / "micro-store", shards=3, by="row", version="v1")
    deployer = Deployer(PlacementOptions(host="node", drain_s=0.5, ready_timeout_s=120))
    deployer.up(work / "micro-store", replicas=2)
    nodes = sorted({(r["shard"], r["node"]) for r in replicas(deployer)})
    proc = mh.hosts[0].run(
        [sys.executable, "-m", "ultramem_dist.multihost.probe", mh.ray_address, str(ckpt)],
        timeout=300,
    )
    undeploy(deployer)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["replica_nodes"] = nodes
    return out


def faults_store(work: Path) -> Path:
    from ultramem_dist.store.synth import write_synthetic_store

    write_synthetic_store(work / "fault-store", n_rows=30000, dv=64, shards=3, topm=4)
    return work / "fault-store"


def partition(mh: MultiHost, store: Path, work: Path, deadline_s: float) -> dict[str, Any]:
    deployer = Deployer(PlacementOptions(host="node", drain_s=0.5, ready_timeout_s=120))
    deployer.up(store, replicas=2)
    reps = replicas(deployer)
    victim = next(h for h in mh.hosts[1:] if any(r["node"] == h.ip for r in reps))
    targets = [r["endpoint"] for r in reps]
    load = start_load(
        mh.hosts[0],
        targets,
        store,
        work / "part.json",
        duration_s=9.0,
        concurrency=4,
        deadline_s=deadline_s,
    )
    time.sleep(2.0)
    mh.partition(victim.index)
    time.sleep(3.0)
    mh.heal(victim.index)
    samples = load.wait(timeout=120)["samples"]
    stats = summarize(samples, deadline_s)
    before = {
        (r["shard"], r["replica"]): r["info"]["requests"] for r in reps if r["node"] == victim.ip
    }
    load2 = start_load(
        mh.hosts[0],
        targets,
        store,
        work / "part2.json",
        duration_s=3.0,
        concurrency=4,
        deadline_s=deadline_s,
    )
    after_stats = summarize(load2.wait(timeout=60)["samples"], deadline_s)
    now = {(r["shard"], r["replica"]): r for r in replicas(deployer)}
    stats.update(
        victim_host=victim.index,
        deadline_s=deadline_s,
        partition_s=3.0,
        error_messages=sorted({s[3][:160] for s in samples if s[3]})[:3],
        used_again_after_heal=all(now[k]["info"]["requests"] > n for k, n in before.items()),
        restarts_after_heal=sum(now[k]["info"]["restarts"] for k in before),
        after_heal=after_stats,
    )
    undeploy(deployer)
    return stats


def netem(mh: MultiHost, work: Path, delays: list[float], args: Any) -> list[dict[str, Any]]:
    """The overlap measurement with the decoding driver *inside host 0* and the shard on host 1,
    over a link made slow by ``delay_ms``.

    * ``method: "netem"`` (the kernel has ``sch_netem``): ``tc netem`` on host 1's own
      interface: every packet it sends, i.e. each reply, is late by the delay; one round trip
      host 0 -> host 1 gains it once.
    * ``method: "relay"`` (no netem, e.g. this Firecracker kernel): the user-space relay of
      :mod:`ultramem_dist.multihost.delay` at both ends of the hop. The shard binds host 1's
      loopback on a fixed port P; a relay in host 1 (``198.18.x.2:P`` -> ``127.0.0.1:P``) holds
      every reply chunk ``delay_ms``, a relay in host 0 (``127.0.0.1:P`` -> ``198.18.x.2:P``)
      every request chunk ``delay_ms``; the client in host 0 dials the registered
      ``127.0.0.1:P`` unchanged. Each call crosses the real veth/bridge hop plus ``delay_ms``
      each way (a round trip gains 2 x ``delay_ms``); the 0 ms baseline runs through the same
      two relays, so the rows differ only in the delay."""
    missing = mh.netem_available()
    method = "relay" if missing else "netem"
    if missing:
        say(f"netem: {missing}; using the user-space delay relay instead")
    cfg = {
        "address": mh.ray_address,
        "netns": mh.hosts[1].netns,
        "host1_ip": mh.hosts[1].ip,
        "method": method,
        "delays": delays,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "work": str(work),
    }
    proc = mh.hosts[0].run(
        [sys.executable, str(Path(__file__).resolve()), "--netem-child", json.dumps(cfg)],
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"netem run failed: {proc.stderr[-3000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in rows:
        row["netem_unavailable"] = missing
    return rows


def _netem_delay(netns: str, delay_ms: float) -> None:
    base = ["ip", "netns", "exec", netns, "tc", "qdisc"]
    if delay_ms > 0:
        subprocess.run(
            [*base, "replace", "dev", "eth0", "root", "netem", "delay", f"{delay_ms}ms"],
            check=True,
            capture_output=True,
        )
    else:
        subprocess.run([*base, "del", "dev", "eth0", "root"], capture_output=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_relay(prefix: list[str], listen: str, target: str, up: float, down: float) -> Any:
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "ultramem_dist.multihost.delay",
        f"--listen={listen}",
        f"--target={target}",
        f"--delay-ms={up}",
        f"--reply-delay-ms={down}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"delay relay `{' '.join(cmd)}` did not start: {line!r}")
    return proc


@contextlib.contextmanager
def _relays(cfg: dict[str, Any], port: int, delay_ms: float) -> Iterator[None]:
    """The two ends of the slow hop (see :func:`netem`); both stopped on exit."""
    procs = []
    try:
        far = f"{cfg['host1_ip']}:{port}"
        procs.append(
            _start_relay(
                ["ip", "netns", "exec", cfg["netns"]], far, f"127.0.0.1:{port}", 0.0, delay_ms
            )
        )
        procs.append(_start_relay([], f"127.0.0.1:{port}", far, delay_ms, 0.0))
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def netem_child(cfg: dict[str, Any]) -> None:
    from overlap import hidden_fraction, measure, shape_config

    from ultramem_dist.model import MemoryLM, save_pretrained
    from ultramem_dist.store.export import export_checkpoint

    torch.set_num_threads(1)  # as benchmarks/overlap.py: the model thread; shards get the rest
    ray.init(
        address=cfg["address"], namespace="ultramem", logging_level="ERROR", log_to_driver=False
    )
    work = Path(cfg["work"])
    torch.manual_seed(0)
    ckpt = save_pretrained(MemoryLM(shape_config("span2")).eval(), work / "span2-ckpt")
    export_checkpoint(ckpt, work / "span2-store", shards=1, by="row", version="bench")
    relay = cfg.get("method") == "relay"
    out = []
    for d in cfg["delays"]:
        port = _free_port()
        placement = PlacementOptions(host="node", drain_s=0.5, resources={"host1": 0.01})
        if relay:
            placement = PlacementOptions(
                host="127.0.0.1", port=port, drain_s=0.5, resources={"host1": 0.01}
            )
        with contextlib.ExitStack() as stack:
            if relay:
                stack.enter_context(_relays(cfg, port, d))
            else:
                _netem_delay(cfg["netns"], d)
                stack.callback(_netem_delay, cfg["netns"], 0)
            try:
                times = measure(
                    ckpt,
                    work / "span2-store",
                    ["process"],
                    SimpleNamespace(batch=1, tokens=cfg["tokens"], rounds=cfg["rounds"]),
                    placement=placement,
                )["process"]
            finally:
                undeploy(Deployer())  # frees the fixed port before the next delay
        ms, hidden = hidden_fraction(times)
        out.append(
            {
                "delay_ms": d,
                "method": "relay" if relay else "netem",
                "rtt_added_ms": 2 * d if relay else d,
                "hidden_fraction": round(hidden, 3),
                "ms_per_token": ms,
                "samples_ms": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "transport": "process",
            }
        )
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    ray.shutdown()
    print(json.dumps(out))


def deploy_spread(store: Path, hosts: int) -> tuple[Deployer, float]:
    """One replica per shard, each on its own host (the ``slot`` resource: 1 per host)."""
    deployer = Deployer(
        PlacementOptions(host="node", drain_s=0.5, ready_timeout_s=900, resources={"slot": 1})
    )
    t0 = time.perf_counter()
    deployer.up(store, replicas=1)
    return deployer, time.perf_counter() - t0


def size_scaling(mh: MultiHost, work: Path, sizes: list[float]) -> list[dict[str, Any]]:
    out = []
    for gib in sizes:
        store = work / f"synth-{gib}g"
        say(f"export {gib} GiB")
        res = write_store(store, gib, 3)
        drop_cache(Path(res["version_dir"]))
        say(f"deploy {gib} GiB", res)
        deployer, load_s = deploy_spread(store, 3)
        reps = replicas(deployer)
        targets = [r["endpoint"] for r in reps]
        check = bigcheck(
            mh,
            {
                "targets": targets,
                "store": str(store),
                "batch": 64,
                "verify_batches": 3,
                "calls": 200,
            },
        )
        row = {
            "store_bytes": res["store_bytes"],
            "export_s": round(res["export_s"], 2),
            "export_peak_rss_bytes": res["peak_rss_bytes"],
            "load_verify_s": round(load_s, 2),
            "first_lookup_ms": check["first_lookup_ms"],
            "p50_ms": check["p50_ms"],
            "shard_rss_bytes": max(rss(r["info"]["pid"]) for r in reps),
            "host_memory_usage_bytes": [h.memory_usage() for h in mh.hosts],
            "host_memory_max_usage_bytes": [h.memory_max_usage() for h in mh.hosts],
            "shard_nodes": sorted(r["node"] for r in reps),
            "verified_batches": check["verified_batches"],
            "wrong": check["wrong"],
            "max_abs_err": check["max_abs_err"],
        }
        out.append(row)
        say("size", row)
        undeploy(deployer)
        if gib != min(sizes):
            shutil.rmtree(store, ignore_errors=True)
    return out


def throughput(mh: MultiHost, work: Path, gib: float, seconds: float) -> list[dict[str, Any]]:
    out = []
    for n in (1, 2, 3):
        store = work / f"tput-{n}"
        write_store(store, gib, n)
        deployer, _ = deploy_spread(store, n)
        reps = replicas(deployer)
        pids = [r["info"]["pid"] for r in reps]
        cpu0 = [cpu_s(p) for p in pids]
        check = bigcheck(
            mh,
            {
                "targets": [r["endpoint"] for r in reps],
                "store": str(store),
                "batch": 64,
                "verify_batches": 1,
                "calls": 20,
                "qps_s": seconds,
                "concurrency": 8,
            },
        )
        calls = check["qps_calls"] + 21
        cpu = [cpu_s(p) - c for p, c in zip(pids, cpu0, strict=True)]
        out.append(
            {
                "hosts": n,
                "qps": check["qps"],
                "batch": 64,
                "concurrency": 8,
                "shard_cpu_ms_per_call_per_host": [round(1e3 * c / calls, 3) for c in cpu],
                "shard_nodes": sorted(r["node"] for r in reps),
            }
        )
        say("throughput", out[-1])
        undeploy(deployer)
        shutil.rmtree(store, ignore_errors=True)
    base = out[0]["qps"] or 1.0
    for row in out:
        row["ratio_vs_1"] = round((row["qps"] or 0) / base, 3)
    return out


def host_kill(mh: MultiHost, store: Path, work: Path, deadline_s: float) -> dict[str, Any]:
    from ultramem_dist.reliability.chaos import timeline_stats
    from ultramem_dist.reliability.loadtest import Sample

    deployer = Deployer(PlacementOptions(host="node", drain_s=0.5, ready_timeout_s=120))
    deployer.up(store, replicas=2)
    reps = replicas(deployer)
    victim = mh.hosts[2]
    lost = [(r["shard"], r["replica"]) for r in reps if r["node"] == victim.ip]
    load = start_load(
        mh.hosts[0],
        [r["endpoint"] for r in reps],
        store,
        work / "kill.json",
        duration_s=10.0,
        concurrency=4,
        deadline_s=deadline_s,
    )
    time.sleep(3.0)
    t_kill = time.monotonic()
    killed = victim.kill()
    samples = load.wait(timeout=120)["samples"]
    stats = summarize(samples, deadline_s)
    failover_ms, base_qps, min_ratio = timeline_stats(
        [Sample(s[0], s[1], s[2]) for s in samples], t_kill
    )
    recovery_s = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = {(r["shard"], r["replica"]): r for r in replicas(deployer)}
        moved = [now.get(k) for k in lost]
        if all(r and r.get("alive") and r["node"] != victim.ip for r in moved):
            targets = [r["endpoint"] for r in now.values()]
            try:  # full capacity: every replica (the moved ones too) answers verified calls
                check = start_load(
                    mh.hosts[0],
                    targets,
                    store,
                    work / "kill2.json",
                    duration_s=1.0,
                    concurrency=2,
                    deadline_s=deadline_s,
                )
                got = summarize(check.wait(timeout=60)["samples"], deadline_s)
            except RuntimeError:
                got = {"errors": 1}
            if got.get("errors") == 0 and got.get("wrong") == 0:
                recovery_s = round(time.monotonic() - t_kill, 2)
                break
        time.sleep(0.5)
    stats.update(
        killed_processes=killed,
        lost_replicas=len(lost),
        failover_max_ms=round(failover_ms, 1),
        qps_before=round(base_qps, 1),
        min_qps_ratio_after=round(min_ratio, 3),
        recovery_s=recovery_s,
        restarted_on=sorted({now[k]["node"] for k in lost}) if recovery_s else None,
        deadline_s=deadline_s,
    )
    undeploy(deployer)
    return stats


def plot(sizes: list[dict[str, Any]], tput: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    gib = [r["store_bytes"] / GIB for r in sizes]
    ax = axes[0]
    ax.plot(gib, [r["export_s"] for r in sizes], "o-", label="export (s)")
    ax.plot(gib, [r["load_verify_s"] for r in sizes], "s-", label="deploy: load+sha256 (s)")
    ax.set_xlabel("store size (GiB, bf16)")
    ax.set_ylabel("seconds")
    ax.legend()
    ax.set_title("time vs store size")
    ax = axes[1]
    ax.plot(gib, [r["export_peak_rss_bytes"] / GIB for r in sizes], "o-", label="export peak RSS")
    ax.plot(gib, [r["shard_rss_bytes"] / GIB for r in sizes], "s-", label="largest shard RSS")
    ax.set_xlabel("store size (GiB, bf16)")
    ax.set_ylabel("GiB")
    ax.legend()
    ax.set_title("memory vs store size")
    ax = axes[2]
    ax.plot(gib, [r["first_lookup_ms"] for r in sizes], "o-", label="first lookup, cold (ms)")
    ax.plot(gib, [r["p50_ms"] for r in sizes], "s-", label="steady p50, batch 64 (ms)")
    ax.set_xlabel("store size (GiB, bf16)")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("lookup latency vs store size")
    fig.suptitle("ultramem-dist on 3 namespace-hosts (one 2-core box)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def checkpoint(result: dict[str, Any], args: Any) -> None:
    """Partial results after every step (a later crash keeps what was measured)."""
    path = Path(tempfile.gettempdir()) / "ultramem-multihost-partial.json"
    path.write_text(json.dumps(result, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5,2,8", help="store sizes in GiB")
    ap.add_argument("--host-memory-gib", type=float, default=4.0)
    ap.add_argument("--throughput-gib", type=float, default=0.5)
    ap.add_argument("--throughput-s", type=float, default=6.0)
    ap.add_argument("--delays", default="0,1,5")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--skip", default="", help="comma list of steps to skip")
    ap.add_argument("--quick", action="store_true", help="small sizes; results to a temp dir")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--netem-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.netem_child:
        netem_child(json.loads(args.netem_child))
        return
    reason = skip_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    sizes = [float(x) for x in args.sizes.split(",")] if not args.quick else [0.05, 0.1]
    skip = set(filter(None, args.skip.split(",")))
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    work = Path(tempfile.mkdtemp(prefix="ultramem-multihost-bench-", dir=args.work_dir))
    result: dict[str, Any] = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    deadline_s = 1.0
    try:
        with MultiHost(hosts=3, memory_limit_bytes=int(args.host_memory_gib * GIB)) as mh:
            ray.init(
                address=mh.ray_address,
                namespace="ultramem",
                logging_level="ERROR",
                log_to_driver=False,
            )
            pin_registry(0)
            result.update(
                hosts=3,
                host_ips=[h.ip for h in mh.hosts],
                host_memory_limit_bytes=mh.memory_limit_bytes,
            )
            steps = [
                ("tokens", lambda: tokens_identical(mh, work)),
                ("partition", lambda: partition(mh, fstore, work, deadline_s)),
                (
                    "netem",
                    lambda: netem(mh, work, [float(x) for x in args.delays.split(",")], args),
                ),
                ("size", lambda: size_scaling(mh, work, sizes)),
                (
                    "throughput",
                    lambda: throughput(
                        mh, work, 0.05 if args.quick else args.throughput_gib, args.throughput_s
                    ),
                ),
                ("kill", lambda: host_kill(mh, fstore, work, deadline_s)),
            ]
            keys = {
                "tokens": "tokens_detail",
                "partition": "partition",
                "netem": "netem",
                "size": "size_scaling",
                "throughput": "throughput",
                "kill": "host_kill",
            }
            fstore = faults_store(work)
            try:
                for name, step in steps:
                    if name in skip:
                        continue
                    try:
                        result[keys[name]] = step()
                    except Exception as exc:  # noqa: BLE001 - recorded; the other steps run
                        import traceback

                        traceback.print_exc()
                        result.setdefault("failed_steps", {})[name] = repr(exc)[:2000]
                        checkpoint(result, args)
                        continue
                    say(name, result[keys[name]])
                    if name == "tokens":
                        result["tokens_identical"] = result["tokens_detail"]["tokens_identical"]
                    if name == "size":
                        result["store_bytes"] = max(
                            r["store_bytes"] for r in result["size_scaling"]
                        )
                    checkpoint(result, args)
            finally:
                ray.shutdown()  # before the teardown: a driver whose GCS vanishes aborts
        result["leftovers"] = mh.leftovers()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["loadavg_start"] = load_start
    result["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out_dir = save(result, "multihost.json", args.out, args.quick)
    if result.get("size_scaling"):
        plot(
            result["size_scaling"],
            result.get("throughput", []),
            out_dir / "multihost.png" if (args.out or args.quick) else plot_path("multihost.png"),
        )
    say("wrote", out_dir)


if __name__ == "__main__":
    main()
