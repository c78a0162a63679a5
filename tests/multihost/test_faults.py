"""Faults across namespace-hosts under verified load: a partitioned link, a whole host killed.

One 3-host Ray cluster for the module (~20 s) plus ~60 s of load and recovery: in the normal
suite; skipped without root. The partition runs first (the kill leaves two hosts).
"""

from __future__ import annotations

import time

import multihost_fixtures  # tests/multihost is on sys.path (pytest prepend import mode)
import pytest

from ultramem_dist.multihost.load import start_load, summarize

cluster3 = multihost_fixtures.cluster3  # the module's 3-host cluster fixture
require_harness = multihost_fixtures.require_harness
pytestmark = pytest.mark.integration
DEADLINE_S = 1.0


@pytest.fixture(scope="module")
def deployed(cluster3, tmp_path_factory):
    from ultramem_dist.cluster import Deployer, PlacementOptions
    from ultramem_dist.store.synth import write_synthetic_store

    root = tmp_path_factory.mktemp("faults")
    write_synthetic_store(root / "store", n_rows=30000, dv=64, shards=3, topm=4)
    deployer = Deployer(PlacementOptions(host="node", drain_s=0.5, ready_timeout_s=90))
    deployer.up(root / "store", replicas=2)
    yield deployer, root
    deployer.down()


def _replicas(deployer):
    snap = deployer.status()
    dep = snap["deployments"][snap["active"]]
    return [
        {"shard": int(s), "replica": int(r), **rec}
        for s, reps in dep["replicas"].items()
        for r, rec in reps.items()
    ]


def test_partitioned_host_fails_calls_by_deadline_and_is_used_again(cluster3, deployed):
    deployer, root = deployed
    reps = _replicas(deployer)
    victim = next(h for h in cluster3.hosts[1:] if any(r["node"] == h.ip for r in reps))
    on_victim = [r for r in reps if r["node"] == victim.ip]
    targets = [r["endpoint"] for r in reps]
    load = start_load(
        cluster3.hosts[0],
        targets,
        root / "store",
        root / "part.json",
        duration_s=9.0,
        concurrency=4,
        deadline_s=DEADLINE_S,
    )
    time.sleep(2.0)
    t_cut = time.monotonic()
    cluster3.partition(victim.index)
    time.sleep(3.0)
    cluster3.heal(victim.index)
    t_heal = time.monotonic()
    samples = load.wait(timeout=60)["samples"]
    stats = summarize(samples, DEADLINE_S)
    assert stats["requests"] > 0 and stats["wrong"] == 0 and stats["partial"] == 0
    assert stats["hung"] == 0, stats
    failed = [s for s in samples if s[2] not in ("ok", "wrong", "partial")]
    shard_ids = {r["shard"] for r in on_victim}
    for s in failed:
        assert s[2] in ("DEADLINE_EXCEEDED", "UNAVAILABLE"), s
        assert any(f"shard {k} " in s[3] for k in shard_ids), s  # names the cut-off shard
        assert t_cut - 0.1 <= s[0] <= t_heal + DEADLINE_S + 1, s
    # after the link returns: served again by the same processes (no restart) with traffic
    before = {(r["shard"], r["replica"]): r["info"]["requests"] for r in on_victim}
    load2 = start_load(
        cluster3.hosts[0],
        targets,
        root / "store",
        root / "part2.json",
        duration_s=3.0,
        concurrency=4,
        deadline_s=DEADLINE_S,
    )
    stats2 = summarize(load2.wait(timeout=60)["samples"], DEADLINE_S)
    assert stats2["errors"] == 0 and stats2["wrong"] == 0 and stats2["partial"] == 0, stats2
    after = {(r["shard"], r["replica"]): r for r in _replicas(deployer)}
    for key, n in before.items():
        assert after[key]["info"]["restarts"] == 0
        assert after[key]["node"] == victim.ip
        assert after[key]["info"]["requests"] > n, f"replica {key} not used after the heal"


def test_killed_host_fails_over_and_ray_restarts_its_replicas_elsewhere(cluster3, deployed):
    deployer, root = deployed
    reps = _replicas(deployer)
    victim = cluster3.hosts[2]
    lost = [(r["shard"], r["replica"]) for r in reps if r["node"] == victim.ip]
    assert lost, "STRICT_SPREAD put no replica on host 2"
    targets = [r["endpoint"] for r in reps]
    load = start_load(
        cluster3.hosts[0],
        targets,
        root / "store",
        root / "kill.json",
        duration_s=8.0,
        concurrency=4,
        deadline_s=DEADLINE_S,
    )
    time.sleep(2.0)
    t_kill = time.monotonic()
    assert victim.kill() > 0
    samples = load.wait(timeout=60)["samples"]
    stats = summarize(samples, DEADLINE_S)
    assert stats["wrong"] == 0 and stats["partial"] == 0 and stats["hung"] == 0, stats
    after_kill = [s for s in samples if s[0] > t_kill + 2 * DEADLINE_S]
    assert after_kill and all(s[2] == "ok" for s in after_kill), summarize(after_kill, 1)
    # Ray declares the host dead and restarts its replicas on the surviving hosts
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = {(r["shard"], r["replica"]): r for r in _replicas(deployer)}
        moved = [now[k] for k in lost if k in now]
        if len(moved) == len(lost) and all(
            r.get("alive") and r["node"] != victim.ip and r["info"]["restarts"] >= 1 for r in moved
        ):
            break
        time.sleep(1.0)
    else:
        pytest.fail(f"replicas {lost} of the killed host were not restarted elsewhere: {now}")
    for shard in {k[0] for k in lost}:
        nodes = [r["node"] for r in now.values() if r["shard"] == shard]
        assert len(set(nodes)) == len(nodes), f"shard {shard} replicas now share a host: {nodes}"
