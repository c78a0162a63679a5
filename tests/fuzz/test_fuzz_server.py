"""Fuzzing a real ``serve-shard`` process with raw bytes over a generic gRPC method, garbage on
its TCP port, and requests claiming shape [2**40, 2**20]: every call ends in a defined status,
the process never dies, and its peak RSS does not move."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ultramem_dist.kernels import gather_pool
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.reliability.fuzz import (
    GATHER_METHOD,
    case_stream,
    fuzz_endpoint,
    hostile_shape_request,
    peak_rss_kib,
    tcp_garbage,
    valid_request,
)
from ultramem_dist.reliability.procs import ShardFleet
from ultramem_dist.reliability.synthetic import make_synthetic_store, synthetic_spec
from ultramem_dist.serving.validate import Limits

pytestmark = pytest.mark.integration
N, E, HC, MAX_MSG = 400, 4, 2, 256 << 10
KW = {"n_rows": N, "dv": 16, "d_model": 12, "topm": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = make_synthetic_store(tmp_path_factory.mktemp("store"), shards=1,
                                tables={"row": ("row", False)}, seed=3, **KW)  # fmt: skip
    limits = ["--max-batch", "64", "--max-per-query", "64", "--max-message-bytes", str(MAX_MSG)]
    fleet = ShardFleet(root, tmp_path_factory.mktemp("run"), extra_args=limits)
    fleet.start()
    yield fleet.replicas[0]
    fleet.stop()


def _check_alive_and_correct(rep) -> None:
    assert rep.alive, "the server process died"
    base = valid_request("row", "v1", N, E, HC, seed=5)
    with grpc.insecure_channel(rep.target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        raw = ch.unary_unary(GATHER_METHOD)(base.SerializeToString(), timeout=10)
    reply = pb.GatherReply.FromString(raw)
    got = torch.frombuffer(bytearray(reply.pooled.data), dtype=torch.float32).view(3, E, 16)
    spec = synthetic_spec(seed=3, **KW)
    idx = torch.frombuffer(bytearray(base.indices.data), dtype=torch.int64).view(3, 8)
    blk = torch.frombuffer(bytearray(base.blocks.data), dtype=torch.int64).view(3, 8)
    w = torch.frombuffer(bytearray(base.weights.data), dtype=torch.float32).view(3, 8, HC)
    torch.testing.assert_close(got, gather_pool(spec.values, idx, blk, w, E))


def test_raw_byte_fuzzing_never_gives_an_undefined_status_or_kills_the_server(server):
    base = valid_request("row", "v1", N, E, HC)
    stream = case_stream(base, Limits(64, 64), seed=11, oversize_bytes=MAX_MSG, oversize_every=50)
    stats = fuzz_endpoint(server.target, stream, 500, timeout_s=10, time_budget_s=60)
    assert stats.cases >= 100
    assert stats.undefined_count == 0, stats.undefined
    assert {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} <= set(stats.by_status)
    assert tcp_garbage("127.0.0.1", server.port, seed=1, connections=15) == 15
    _check_alive_and_correct(server)


def test_huge_declared_shapes_cost_no_memory(server):
    base = valid_request("row", "v1", N, E, HC)
    payloads = [
        hostile_shape_request(base, shape).SerializeToString()
        for shape in ([2**40, 2**20], [2**20, 2**40], [2**62, 2], [2**31, 2**31])
    ]
    with grpc.insecure_channel(server.target) as ch:
        call = ch.unary_unary(GATHER_METHOD)
        for _ in range(20):  # warm up the allocator with normal traffic
            call(base.SerializeToString(), timeout=10)
        _, hwm_before = peak_rss_kib(server.pid)
        for _ in range(50):
            for p in payloads:
                with pytest.raises(grpc.RpcError) as info:
                    call(p, timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "above the limit" in info.value.details()
        rss_after, hwm_after = peak_rss_kib(server.pid)
    assert hwm_after - hwm_before < 16 << 10, (hwm_before, hwm_after)  # < 16 MiB of peak
    _check_alive_and_correct(server)
