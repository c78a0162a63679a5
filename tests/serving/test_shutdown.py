"""Graceful shutdown: health flips to NOT_SERVING, in-flight calls finish, new calls are refused."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from conftest import InProcessShard, make_table_spec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_bad_requests import request
from typer.testing import CliRunner

from ultramem_dist.cli import load_commands
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables

app = load_commands()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    export_tables({"row": make_table_spec()}, root, shards=2, by="row", version="v1")
    return root


def test_graceful_stop_drains_in_flight_calls(store):
    shard = InProcessShard(ServerConfig(store=store, shard=1, drain_s=0.6, kernel_workers=1))
    servicer = shard.server.servicer
    original = servicer._gather_sync

    def slow(req, reply):
        time.sleep(0.5)
        original(req, reply)

    servicer._gather_sync = slow
    try:
        with grpc.insecure_channel(shard.target) as ch:
            stub = pb_grpc.GatherPoolStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            in_flight = stub.Gather.future(request(), timeout=10)
            time.sleep(0.15)
            stopping = asyncio.run_coroutine_threadsafe(shard.server.stop(grace=3), shard.loop)
            time.sleep(0.2)  # inside the drain window: still reachable, but NOT_SERVING
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            reply = in_flight.result(timeout=10)  # the in-flight call completed
            assert list(reply.pooled.shape) == [3, 4, 32]
            stopping.result(timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                stub.Info(pb.InfoRequest(), timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        shard.stop()


def test_sigterm_stops_a_shard_process_cleanly(store, spawn_shards):
    (proc,) = spawn_shards(store, [0])
    with grpc.insecure_channel(proc.target) as ch:
        info = pb_grpc.GatherPoolStub(ch).Info(pb.InfoRequest(), timeout=10)
        assert info.shard_index == 0
    start = time.monotonic()
    assert proc.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 5
    assert "draining" in proc.log.read_text()


def test_serve_shard_refuses_a_corrupt_store(store, tmp_path):
    f = store / "v1" / "shard-00000-of-00002.safetensors"
    data = f.read_bytes()
    try:
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        res = CliRunner().invoke(app, ["serve-shard", str(store), "--shard", "0"])
        assert res.exit_code == 2
        assert "refusing to serve" in res.output and "sha256" in " ".join(res.output.split())
    finally:
        f.write_bytes(data)
