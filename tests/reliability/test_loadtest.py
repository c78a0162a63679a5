"""The load generator against real gRPC servers (in-process, loopback): it passes a healthy
deployment and catches wrong and silently partial answers."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from conftest import InProcessShard
from typer.testing import CliRunner

from ultramem_dist.cli import load_commands
from ultramem_dist.reliability.loadtest import LoadTestConfig, run_loadtest
from ultramem_dist.reliability.synthetic import make_synthetic_store, synthetic_spec
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables

app = load_commands()

KW = {"n_rows": 400, "dv": 16, "d_model": 12, "topm": 4}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    make_synthetic_store(root / "good", shards=2, seed=1, **KW)
    # "bad": same version id and shapes, shard 1's rows zeroed (a shard that silently adds
    # nothing) -> answers equal shard 0's contribution alone
    spec = synthetic_spec(seed=1, **KW)  # the "row" table of "good"
    export_tables({"row": spec}, root / "good_row", shards=2, by="row", version="v1")
    spec.values = spec.values.clone()
    spec.values[200:] = 0
    export_tables({"row": spec}, root / "zeroed", shards=2, by="row", version="v1")
    other = synthetic_spec(seed=99, **KW)  # other values under the same version id
    export_tables({"row": other}, root / "other", shards=2, by="row", version="v1")
    return root


def _servers(store, shards, replicas=1):
    return [
        InProcessShard(ServerConfig(store=store, shard=k)) for k in shards for _ in range(replicas)
    ]


def _load(targets, store, **kw):
    cfg = LoadTestConfig(targets=targets, store=store, **kw)
    return asyncio.run(run_loadtest(cfg))


def test_healthy_replicated_deployment_passes(stores):
    servers = _servers(stores / "good", [0, 1], replicas=2)
    try:
        targets = [s.target for s in servers]
        for table in ("row", "dim_m"):
            res = _load(targets, stores / "good", table=table, concurrency=4, duration_s=1.0)
            assert res.passed, res.to_json()
            assert res.requests > 10 and res.ok == res.requests
            assert res.replicas == [2, 2] and res.shards == 2
            assert 0 < res.p50_ms <= res.p95_ms <= res.p99_ms <= res.max_ms
            assert res.qps > 0
        capped = _load(targets, stores / "good", table="row", concurrency=3, max_requests=7)
        assert capped.requests == 7
    finally:
        for s in servers:
            s.stop()


def test_wrong_and_partial_answers_are_counted(stores):
    zeroed, other = _servers(stores / "zeroed", [1]), _servers(stores / "other", [1])
    good0 = _servers(stores / "good_row", [0])
    try:
        res = _load([good0[0].target, zeroed[0].target], stores / "good_row", table="row",
                    concurrency=2, max_requests=20, distinct_batches=4)  # fmt: skip
        assert res.partial == 20 and res.wrong == 0 and not res.passed
        res = _load([good0[0].target, other[0].target], stores / "good_row", table="row",
                    concurrency=2, max_requests=20, distinct_batches=4)  # fmt: skip
        assert res.wrong == 20 and not res.passed
    finally:
        for s in (*zeroed, *other, *good0):
            s.stop()


def test_errors_are_counted_by_status(stores):
    (s0,) = _servers(stores / "good", [0])
    (s1,) = _servers(stores / "good", [1])
    try:
        # a 1 ms deadline on a loaded machine: some calls fail, none may be "ok but wrong"
        res = _load([s0.target, s1.target], stores / "good", table="row", concurrency=4,
                    max_requests=40, deadline_s=0.001)  # fmt: skip
        assert res.requests == 40 and res.errors + res.ok == 40
        assert res.wrong == 0 and res.partial == 0
        assert set(res.errors_by_status) <= {"DEADLINE_EXCEEDED", "ShardUnavailableError"}
        # shard 1 dies after the client connected: every call fails loudly, none is partial
        stop = asyncio.Event()
        cfg = LoadTestConfig(targets=[s0.target, s1.target], store=stores / "good",
                             table="row", concurrency=2, duration_s=30, deadline_s=1.0)  # fmt: skip

        async def run():
            task = asyncio.ensure_future(run_loadtest(cfg, stop=stop))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(s1.stop)
            await asyncio.sleep(1.0)
            stop.set()
            return await task

        res = asyncio.run(run())
        assert res.errors > 0 and res.partial == 0 and res.wrong == 0
        assert "UNAVAILABLE" in res.errors_by_status, res.errors_by_status
    finally:
        s0.stop()
        s1.stop()


def test_cli_loadtest_writes_json_and_refuses_remote_targets(stores, tmp_path):
    servers = _servers(stores / "good", [0, 1])
    try:
        target = ",".join(s.target for s in servers)
        out = tmp_path / "lt.json"
        res = CliRunner().invoke(
            app,
            ["loadtest", "--target", target, "--store", str(stores / "good"), "--table", "dim",
             "--concurrency", "3", "--duration", "0.5", "--json-out", str(out)],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        data = json.loads(out.read_text())
        assert data["passed"] and data["requests"] > 0 and data["wrong"] == 0
        assert {"p50_ms", "p95_ms", "p99_ms", "qps", "errors_by_status"} <= set(data)
        res = CliRunner().invoke(app, ["loadtest", "--target", target, "--duration", "0.5"])
        assert res.exit_code == 2 and "--store" in res.output
        res = CliRunner().invoke(
            app, ["loadtest", "--target", "192.0.2.1:50051", "--no-verify", "--duration", "1"]
        )
        assert res.exit_code == 2 and "non-loopback" in " ".join(res.output.split())
    finally:
        for s in servers:
            s.stop()


def test_reference_is_independent_of_the_servers(stores):
    """Guard against a vacuous verifier: the zeroed store really differs from the good one."""
    from ultramem_dist.reliability.reference import StoreReference

    a = StoreReference(stores / "good").table("row").values
    b = StoreReference(stores / "zeroed").table("row").values
    assert torch.equal(a[:200], b[:200]) and not torch.equal(a, b)
