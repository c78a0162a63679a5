"""Chaos on supervised replicas (``serve-shard --respawn``): kill -9 of the serving worker under
verified load is repaired by the replica's own supervisor (a re-forked worker on the same port and
metrics port), with no failed call and no wrong or partial answer."""

from __future__ import annotations

import asyncio

import pytest

from ultramem_dist.reliability.chaos import ChaosConfig, run_chaos
from ultramem_dist.reliability.procs import ShardFleet
from ultramem_dist.reliability.synthetic import make_synthetic_store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("refork-store")
    tables = {"row": ("row", False)}
    return make_synthetic_store(root, shards=1, tables=tables, n_rows=400, dv=16, topm=4)


def test_kill_9_of_a_supervised_worker_is_reforked_under_load(store, tmp_path):
    cfg = ChaosConfig(store=store, workdir=tmp_path, fault="kill-worker", shards=1, replicas=2,
                      concurrency=4, fault_at_s=0.5, distinct_batches=8, settle_s=0.3,
                      grace_s=1.0, drain_s=0.0)  # fmt: skip
    fleet = ShardFleet(store, tmp_path / "fleet", shards=1, replicas=2, metrics=True,
                       grace_s=1.0, respawn=True)  # fmt: skip
    with fleet:
        victim = fleet.replicas[0]
        supervisor = victim.pid
        res = asyncio.run(run_chaos(cfg, fleet))
        assert res.passed, res.to_json()
        assert victim.alive and victim.pid == supervisor  # no cold restart: same supervisor
        assert res.exit_code is None and len(res.worker_pids) == 2, res.to_json()
        old, new = res.worker_pids
        assert old != new == victim.worker_pid and victim.info["pid"] == new
        assert res.restart_s is not None and res.recovery_s is not None, res.notes
        assert res.restart_s <= res.recovery_s < 30
        assert "(supervised replicas)" in res.scenario
        assert res.health_events[-1][1].startswith("closed:")  # the killed worker's stream broke
    assert all(not r.alive for r in fleet.replicas)


def test_kill_worker_config_checks(store, tmp_path):
    with pytest.raises(ValueError, match="re-forks the worker by itself"):
        ChaosConfig(store=store, workdir=tmp_path, fault="kill-worker", shards=1, replicas=2,
                    restart=False)  # fmt: skip
    cfg = ChaosConfig(store=store, workdir=tmp_path, fault="kill-worker", shards=1, replicas=2)
    assert cfg.supervised
    assert not ChaosConfig(store=store, workdir=tmp_path, shards=1, replicas=2).supervised
    plain = ShardFleet(store, tmp_path / "plain")  # not started: nothing to signal
    with pytest.raises(ValueError, match="not supervised"):
        plain.signal_worker(plain.replicas[0])
