"""Chaos runs: kill or drain a shard replica under verified load, measure failover and recovery.

A scenario starts ``shards x replicas`` serve-shard processes on loopback
(:class:`~ultramem_dist.reliability.procs.ShardFleet`), runs the verifying load generator
against them, and at ``fault_at_s`` hits one replica:

* ``kill`` — ``SIGKILL`` (the process vanishes mid-call: in-flight calls fail with UNAVAILABLE
  and the client's retry policy re-sends them to the other replica);
* ``term`` — ``SIGTERM`` (graceful drain: health NOT_SERVING, in-flight calls finish, then
  the port closes);
* ``kill-worker`` — ``SIGKILL`` of the serving worker of a supervised replica
  (``serve-shard --respawn``, :mod:`ultramem_dist.serving.supervisor`): the crash of the serving
  process, which the replica's own supervisor repairs by re-forking a worker from its
  preloaded image on the same port.

For ``kill`` and ``term`` the harness then restarts the replica's process on the same port (a
cold start, as Kubernetes restarts a pod or Ray an actor; with ``respawn=True`` ``kill`` hits the
supervisor, i.e. the whole replica). Reported times, all measured from the fault:

* ``restart_s`` — the replacement is serving (its ready file written: a new process, or for
  ``kill-worker`` a new worker pid);
* ``recovery_s`` — the replacement has answered Gather calls of the load again, i.e. the shard
  is back at full capacity (all R replicas in rotation); read from the replica's Prometheus
  counter of successful calls;
* ``failover_max_ms`` — the slowest call that was in flight at the fault or started in the
  second after it (what a caller experiences while the client fails over);
* ``min_qps_ratio`` — the worst 0.5 s throughput window after the fault divided by the median
  window before it.

``health_events`` records what a ``grpc.health.v1`` Watch stream on the victim saw (a drained
replica must say ``NOT_SERVING`` before its port closes; a killed one just disappears).

Correctness is judged on every answer (ok / partial / wrong, see
:mod:`ultramem_dist.reliability.reference`); any failed call counts as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ultramem_dist.client import ChannelOptions
from ultramem_dist.reliability.loadtest import LoadTestConfig, Sample, run_loadtest
from ultramem_dist.reliability.procs import Replica, ShardFleet

__all__ = ["FAULTS", "WORKER_FAULTS", "ChaosConfig", "ChaosResult", "run_chaos", "timeline_stats"]

FAULTS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "kill-worker": signal.SIGKILL}
WORKER_FAULTS = frozenset({"kill-worker"})
"""Faults that hit the serving worker of a supervised replica, not the replica's process."""
_WINDOW_S = 0.5


@dataclass
class ChaosConfig:
    store: Path
    workdir: Path
    fault: str = "kill"
    shards: int = 2
    replicas: int | list[int] = 2
    """Replicas per shard (or a count per shard)."""
    victim: tuple[int, int] = (0, 0)
    """(shard, replica index) to hit."""
    concurrency: int = 8
    batch: int = 8
    table: str | None = None
    fault_at_s: float = 2.0
    """Seconds of (answered) load before the fault."""
    settle_s: float = 1.5
    """Seconds of load kept after recovery."""
    max_duration_s: float = 90.0
    """Hard cap of the whole load phase."""
    restart: bool = True
    deadline_s: float = 5.0
    drain_s: float = 0.5
    grace_s: float = 2.0
    max_reconnect_backoff_ms: int = 250
    """Client reconnect backoff cap (how soon a restarted replica is retried)."""
    distinct_batches: int = 64
    """Distinct verified query batches the load cycles through."""
    respawn: bool = False
    """Run the replicas as ``serve-shard --respawn`` (implied by ``kill-worker``)."""

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {sorted(FAULTS)}, got {self.fault!r}")
        if self.fault in WORKER_FAULTS and not self.restart:
            raise ValueError(
                f"{self.fault}: the replica's supervisor re-forks the worker by itself; "
                "restart=False (leave the victim down) does not apply"
            )
        counts = self.replica_counts
        if len(counts) != self.shards:
            raise ValueError(f"replicas {self.replicas!r} does not match {self.shards} shards")
        shard, index = self.victim
        if not 0 <= shard < self.shards or not 0 <= index < counts[shard]:
            raise ValueError(f"victim {self.victim} is not a replica of {counts}")
        if counts[shard] < 2:
            raise ValueError(
                f"shard {shard} has {counts[shard]} replica(s); chaos needs >= 2 to fail over"
            )

    @property
    def supervised(self) -> bool:
        """Replicas run ``serve-shard --respawn``."""
        return self.respawn or self.fault in WORKER_FAULTS

    @property
    def replica_counts(self) -> list[int]:
        if isinstance(self.replicas, int):
            return [self.replicas] * self.shards
        return list(self.replicas)


@dataclass
class ChaosResult:
    scenario: str
    shards: int
    replicas: list[int]
    concurrency: int
    requests: int
    errors: int
    wrong: int
    partial: int
    errors_by_status: dict[str, int]
    exit_code: int | None
    """The victim process's exit status (``None`` for ``kill-worker``: the replica's supervisor
    reaps the worker and keeps running; see ``worker_pids``)."""
    restart_s: float | None
    recovery_s: float | None
    failover_max_ms: float
    qps_before: float
    min_qps_ratio: float
    p50_ms: float
    p99_ms: float
    duration_s: float
    health_events: list[tuple[float, str]] = field(default_factory=list)
    """(seconds after the fault, status) seen by a Health.Watch stream on the victim."""
    notes: list[str] = field(default_factory=list)
    worker_pids: list[int] = field(default_factory=list)
    """``kill-worker``: [killed worker, its re-forked replacement] (the replacement is absent
    if none served in time)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def passed(self) -> bool:
        return self.errors == 0 and self.wrong == 0 and self.partial == 0


def timeline_stats(samples: list[Sample], t_fault: float) -> tuple[float, float, float]:
    """(slowest call around the fault in ms, median QPS before, worst QPS ratio after)."""
    around = [s for s in samples if s.start <= t_fault + 1.0 and s.end >= t_fault]
    failover_ms = max(((s.end - s.start) * 1e3 for s in around), default=0.0)
    if not samples:
        return failover_ms, 0.0, 0.0
    t0 = min(s.start for s in samples)
    t1 = max(s.end for s in samples)
    n = int((t1 - t0) / _WINDOW_S) + 1
    counts = [0] * n
    for s in samples:
        counts[int((s.end - t0) / _WINDOW_S)] += 1
    fault_w = int((t_fault - t0) / _WINDOW_S)
    before = counts[1:fault_w]  # skip the ramp-up window and the one holding the fault
    after = counts[fault_w + 1 : n - 1]  # full windows after the fault
    base = statistics.median(before) if before else 0.0
    ratio = (min(after) / base) if (after and base) else 0.0
    return failover_ms, base / _WINDOW_S, ratio


async def _wait(predicate: Any, timeout_s: float, every_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(every_s)
    return False


async def _watch_health(rep: Replica, events: list[tuple[float, str]]) -> None:
    """Append (monotonic time, status) for every Health.Watch update until the stream ends."""
    async with grpc.aio.insecure_channel(rep.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            async for msg in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status)
                events.append((time.monotonic(), name))
        except grpc.aio.AioRpcError as exc:
            events.append((time.monotonic(), f"closed:{exc.code().name}"))
        else:
            events.append((time.monotonic(), "closed:OK"))


async def run_chaos(cfg: ChaosConfig, fleet: ShardFleet | None = None) -> ChaosResult:
    """Run one chaos scenario end to end.

    Without ``fleet`` the scenario starts (and always tears down) its own processes; with one
    (already started, ``metrics=True``) it uses and keeps it.
    """
    own = fleet is None
    if fleet is None:
        fleet = ShardFleet(
            cfg.store,
            cfg.workdir,
            shards=cfg.shards,
            replicas=cfg.replica_counts,
            metrics=True,
            grace_s=cfg.grace_s,
            drain_s=cfg.drain_s,
            respawn=cfg.supervised,
        )
        fleet.start()
    notes: list[str] = []
    events: list[tuple[float, str]] = []
    worker_pids: list[int] = []
    watcher: asyncio.Future | None = None
    try:
        victim = next(r for r in fleet.replicas if (r.shard, r.index) == tuple(cfg.victim))
        if cfg.fault in WORKER_FAULTS and not victim.supervised:
            raise ValueError(f"{cfg.fault} needs supervised replicas (ShardFleet(respawn=True))")
        stop = asyncio.Event()
        load_cfg = LoadTestConfig(
            targets=fleet.targets(),
            concurrency=cfg.concurrency,
            duration_s=cfg.max_duration_s,
            table=cfg.table,
            batch=cfg.batch,
            store=cfg.store,
            deadline_s=cfg.deadline_s,
            keep_samples=True,
            distinct_batches=cfg.distinct_batches,
            options=ChannelOptions(max_reconnect_backoff_ms=cfg.max_reconnect_backoff_ms),
        )
        first: list[float] = []

        def seen(sample: Sample) -> None:
            if not first:
                first.append(sample.end)

        load = asyncio.ensure_future(run_loadtest(load_cfg, stop=stop, on_sample=seen))
        await _wait(lambda: bool(first) or load.done(), 120)
        if load.done():  # the load failed to start: surface its error
            load.result()
            raise RuntimeError("the load ended before the fault")
        await asyncio.sleep(max(0.0, first[0] + cfg.fault_at_s - time.monotonic()))
        watcher = asyncio.ensure_future(_watch_health(victim, events))
        await _wait(lambda: bool(events) or watcher.done(), 10)  # SERVING seen first
        t_fault = time.monotonic()
        restart_s = recovery_s = exit_code = None
        if cfg.fault in WORKER_FAULTS:
            old = fleet.signal_worker(victim, FAULTS[cfg.fault])
            worker_pids.append(old)
            # the supervisor re-forks by itself; a new worker pid in the ready file = serving
            ready = await _wait(
                lambda: victim.worker_pid not in (None, old) or not victim.alive,
                fleet.ready_timeout_s,
                every_s=0.01,
            )
            if ready and victim.alive:
                restart_s = time.monotonic() - t_fault
                worker_pids.append(fleet.wait_worker(victim, old, 5))
                recovery_s = await _await_load(fleet, victim, t_fault, cfg, notes)
            else:
                notes.append(f"no re-forked worker served: {fleet.tail(victim, 500)}")
        else:
            fleet.signal(victim, FAULTS[cfg.fault])
            exited = await _wait(lambda: not victim.alive, cfg.grace_s + cfg.drain_s + 15)
            exit_code = victim.proc.returncode if victim.proc is not None else None
            if not exited:
                notes.append("victim did not exit in time; killed")
                fleet.signal(victim, signal.SIGKILL)
                await _wait(lambda: not victim.alive, 10)
        if cfg.restart and cfg.fault not in WORKER_FAULTS:
            fleet.restart(victim, wait=False)
            ready = await _wait(
                lambda: victim.ready_file.exists() or not victim.alive, fleet.ready_timeout_s
            )
            if ready and victim.alive:
                fleet.wait_ready(victim, 5)
                restart_s = time.monotonic() - t_fault
                recovery_s = await _await_load(fleet, victim, t_fault, cfg, notes)
            else:
                notes.append(f"restart failed: {fleet.tail(victim, 500)}")
        await asyncio.sleep(cfg.settle_s)
        stop.set()
        result = await load
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
        if own:
            fleet.stop()
    failover_ms, qps_before, ratio = timeline_stats(result.samples, t_fault)
    supervised = " (supervised replicas)" if cfg.supervised else ""
    return ChaosResult(
        scenario=f"{cfg.fault} shard {cfg.victim[0]} replica {cfg.victim[1]}{supervised}",
        shards=cfg.shards,
        replicas=cfg.replica_counts,
        concurrency=cfg.concurrency,
        requests=result.requests,
        errors=result.errors,
        wrong=result.wrong,
        partial=result.partial,
        errors_by_status=result.errors_by_status,
        exit_code=exit_code,
        restart_s=None if restart_s is None else round(restart_s, 3),
        recovery_s=None if recovery_s is None else round(recovery_s, 3),
        failover_max_ms=round(failover_ms, 1),
        qps_before=round(qps_before, 1),
        min_qps_ratio=round(ratio, 3),
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        duration_s=result.duration_s,
        health_events=[(round(t - t_fault, 3), name) for t, name in events],
        notes=notes,
        worker_pids=worker_pids,
    )


async def _await_load(
    fleet: ShardFleet, victim: Replica, t_fault: float, cfg: ChaosConfig, notes: list[str]
) -> float | None:
    """Seconds from the fault until the serving replacement has answered load calls (its
    Prometheus counter of successful calls; a re-forked worker serves the same metrics port
    with a fresh counter), or ``None`` if it never did within the load's time cap."""
    limit = time.monotonic() + max(1.0, cfg.max_duration_s - (time.monotonic() - t_fault))
    while time.monotonic() < limit:  # scrape off the loop: never stall the load
        served = await asyncio.to_thread(fleet.served, victim)
        if served:
            return time.monotonic() - t_fault
        await asyncio.sleep(0.05)
    notes.append("the restarted replica never received load")
    return None
