"""Chaos on real ``serve-shard`` processes under verified load: kill -9 a replica (R = 2), then
SIGTERM one (graceful drain, health watched). No failed call, no wrong or partial answer; the
failover and recovery times are measured (asserted only loosely: the machine is shared)."""

from __future__ import annotations

import asyncio

import pytest

from ultramem_dist.reliability.chaos import ChaosConfig, run_chaos
from ultramem_dist.reliability.procs import ShardFleet
from ultramem_dist.reliability.synthetic import make_synthetic_store

pytestmark = pytest.mark.integration
REPLICAS = [2, 1]  # shard 0 has two replicas (the victim's shard), shard 1 one


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos-store")
    tables = {"row": ("row", False)}
    return make_synthetic_store(root, shards=2, tables=tables, n_rows=1000, dv=32, topm=4)


@pytest.fixture(scope="module")
def fleet(store, tmp_path_factory):
    fl = ShardFleet(store, tmp_path_factory.mktemp("fleet"), shards=2, replicas=REPLICAS,
                    metrics=True, grace_s=1.0, drain_s=0.3)  # fmt: skip
    fl.start()
    yield fl
    fl.stop()
    assert all(not r.alive for r in fl.replicas)  # nothing left behind


def _config(store, tmp_path, **kw):
    return ChaosConfig(
        store=store,
        workdir=tmp_path,
        shards=2,
        replicas=REPLICAS,
        concurrency=6,
        fault_at_s=1.0,
        distinct_batches=16,
        settle_s=0.5,
        grace_s=1.0,
        drain_s=0.3,
        **kw,
    )


def test_kill_9_of_a_replica_under_load_loses_nothing_and_recovers(store, fleet, tmp_path):
    old_pid = fleet.replicas[0].pid
    res = asyncio.run(run_chaos(_config(store, tmp_path, fault="kill", victim=(0, 0)), fleet))
    assert res.passed, res.to_json()
    assert res.requests > 50 and res.exit_code == -9
    assert fleet.replicas[0].alive and fleet.replicas[0].pid != old_pid  # restarted
    assert res.restart_s is not None and res.recovery_s is not None, res.notes
    assert res.restart_s <= res.recovery_s < 60
    # a killed replica never says NOT_SERVING: its stream just breaks
    assert [name for _, name in res.health_events][:1] == ["SERVING"]
    assert res.health_events[-1][1].startswith("closed:")


def test_sigterm_drains_health_first_under_load(store, fleet, tmp_path):
    cfg = _config(store, tmp_path, fault="term", victim=(0, 1), restart=False)
    res = asyncio.run(run_chaos(cfg, fleet))
    assert res.passed, res.to_json()
    assert res.exit_code == 0  # clean exit after draining
    names = [name for _, name in res.health_events]
    assert names[0] == "SERVING" and "NOT_SERVING" in names, res.health_events
    flip = next(t for t, n in res.health_events if n == "NOT_SERVING")
    closed = next(t for t, n in res.health_events if n.startswith("closed:"))
    assert 0 <= flip < closed  # NOT_SERVING is visible before the port goes away
    assert closed >= 0.3 - 0.05  # ... for at least the configured drain
