"""The harness and a deployment across three namespace-hosts (real Ray nodes, 198.18.x links).

These start a 3-node Ray cluster (~20 s) and are in the normal suite; they skip without root.
"""

from __future__ import annotations

import json
import sys

import multihost_fixtures  # tests/multihost is on sys.path (pytest prepend import mode)
import pytest
import torch

from ultramem_dist.multihost import MultiHost
from ultramem_dist.multihost.harness import BENCH_NET

cluster3 = multihost_fixtures.cluster3  # the module's 3-host cluster fixture
require_harness = multihost_fixtures.require_harness
pytestmark = pytest.mark.integration


def test_harness_without_ray_leaves_nothing_behind():
    require_harness()
    mh = MultiHost(hosts=2, memory_limit_bytes=256 << 20, ray=False)
    with mh:
        ips = [h.ip for h in mh.hosts]
        assert all(__import__("ipaddress").ip_address(ip) in BENCH_NET for ip in ips)
        mh.hosts[1].listen(7000)
        assert mh.hosts[0].reaches(ips[1], 7000)
        limit = (mh.hosts[1].cgroup / "memory.limit_in_bytes").read_text().strip()
        assert int(limit) == 256 << 20
        mh.partition(1)
        assert not mh.hosts[0].reaches(ips[1], 7000, timeout=1.0)  # link down: unreachable
        mh.heal(1)
        assert mh.hosts[0].reaches(ips[1], 7000, timeout=5.0)
        assert mh.leftovers()  # exists while up
    assert mh.leftovers() == []


def test_replicas_of_each_shard_land_on_different_hosts(cluster3, tmp_path):
    from ultramem_dist.cluster import Deployer, PlacementOptions
    from ultramem_dist.cluster.deploy import replica_nodes
    from ultramem_dist.model import MemoryLM, preset, save_pretrained
    from ultramem_dist.store.export import export_checkpoint

    torch.manual_seed(0)
    model = MemoryLM(preset("micro")).eval()
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    export_checkpoint(ckpt, tmp_path / "store", shards=3, by="row", version="v1")
    deployer = Deployer(PlacementOptions(host="node", drain_s=0.5, ready_timeout_s=90))
    try:
        deployer.up(tmp_path / "store", replicas=2)
        snap = deployer.status()
        host_ips = {h.ip for h in cluster3.hosts}
        nodes = replica_nodes(snap)
        assert sorted(nodes) == [0, 1, 2]
        for shard, ips in nodes.items():
            assert len(set(ips)) == len(ips) == 2, f"shard {shard} replicas share a host: {ips}"
            assert set(ips) <= host_ips
        dep = snap["deployments"][snap["active"]]
        for reps in dep["replicas"].values():
            for rec in reps.values():
                assert rec["endpoint"].split(":")[0] == rec["node"]  # served on its host's IP
        # a client inside host 0's namespace reaches every shard; remote == local tokens
        probe = cluster3.hosts[0].run(
            [
                sys.executable,
                "-m",
                "ultramem_dist.multihost.probe",
                cluster3.ray_address,
                str(ckpt),
            ],
            timeout=180,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        result = json.loads(probe.stdout.strip().splitlines()[-1])
        assert result["tokens_identical"] is True
        assert result["max_abs_diff"] < 1e-4
        assert {e.split(":")[0] for e in result["endpoints"]} <= host_ips
        # STRICT_SPREAD really is strict: 4 replicas of a shard do not fit on 3 hosts
        strict = Deployer(
            PlacementOptions(host="node", strategy="STRICT_SPREAD", ready_timeout_s=5)
        )
        with pytest.raises(TimeoutError, match="STRICT_SPREAD"):
            strict.up(tmp_path / "store", replicas=4)
    finally:
        deployer.down()
