"""Call lifecycle on a real (in-process) server: client deadlines reach the shard, expired work
is skipped, concurrent streams and message sizes are capped as configured."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch
from conftest import InProcessShard

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.client import ChannelOptions, GatherClient
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.reliability.synthetic import make_synthetic_store
from ultramem_dist.serving import ServerConfig

KW = {"n_rows": 200, "dv": 16, "d_model": 12, "topm": 4}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("store"), shards=1, **KW)


def _request(tokens=2, per=8, pad_weights: int = 0):
    g = torch.Generator().manual_seed(0)
    req = pb.GatherRequest(table_id="row", table_version="v1")
    encode_tensor(torch.randint(0, 200, (tokens, per), generator=g), req.indices)
    encode_tensor(torch.randint(0, 4, (tokens, per), generator=g), req.blocks)
    encode_tensor(torch.randn(tokens, per + pad_weights, 2, generator=g), req.weights)
    return req


class SlowKernel:
    """Replaces a servicer's kernel step: sleeps, counts calls and the peak concurrency."""

    def __init__(self, servicer, delay_s: float) -> None:
        self.original = servicer._gather_sync
        self.delay_s = delay_s
        self.calls = 0
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()
        servicer._gather_sync = self

    def __call__(self, request, reply):
        with self._lock:
            self.calls += 1
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(self.delay_s)
            self.original(request, reply)
        finally:
            with self._lock:
                self.active -= 1


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_the_shard_sees_the_clients_deadline(store, streaming):
    shard = InProcessShard(ServerConfig(store=store))
    seen: list[float | None] = []
    servicer = shard.server.servicer
    original = servicer._kernel_step  # where both paths (general, stream fast path) start

    async def spy(step, *args, deadline):
        seen.append(None if deadline is None else deadline - time.monotonic())
        return await original(step, *args, deadline=deadline)

    servicer._kernel_step = spy
    opts = ChannelOptions(streaming=streaming)
    try:

        async def run():
            async with await GatherClient.connect(
                shard.target, deadline_s=3.0, options=opts
            ) as client:
                g = torch.Generator().manual_seed(1)
                idx = torch.randint(0, 200, (2, 8), generator=g)
                await client.gather("row", idx, idx % 4, torch.randn(2, 8, 2))
                await client.gather("row", idx, idx % 4, torch.randn(2, 8, 2), timeout_s=0.8)

        asyncio.run(run())
    finally:
        shard.stop()
    # the shard sees (about) the caller's budget: re-based on arrival (grpc-timeout is rounded)
    assert len(seen) >= 2 and all(s is not None for s in seen), seen
    assert 0.5 < seen[0] <= 3.05 and 0.0 < seen[-1] <= 0.85 and seen[-1] < seen[0], seen


def test_work_whose_deadline_passed_in_the_queue_is_skipped(store):
    shard = InProcessShard(ServerConfig(store=store, kernel_workers=1))
    slow = SlowKernel(shard.server.servicer, 0.5)
    try:
        with grpc.insecure_channel(shard.target) as ch:
            stub = pb_grpc.GatherPoolStub(ch)
            first = stub.Gather.future(_request(), timeout=10)
            deadline = time.monotonic() + 10
            while slow.active == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the first call holds the only kernel thread
            late = stub.Gather.future(_request(), timeout=0.2)
            with pytest.raises(grpc.RpcError) as info:
                late.result()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert list(first.result().pooled.shape) == [2, 4, 16]
            time.sleep(0.3)  # the queued call got the thread after its deadline
            assert slow.calls == 1  # ... and was skipped, not computed
            assert list(stub.Gather(_request(), timeout=10).pooled.shape) == [2, 4, 16]
            assert slow.calls == 2
    finally:
        shard.stop()


@pytest.mark.parametrize("limit,expect_parallel", [(1, False), (8, True)])
def test_max_concurrent_streams_caps_calls_per_connection(store, limit, expect_parallel):
    shard = InProcessShard(
        ServerConfig(store=store, kernel_workers=4, max_concurrent_streams=limit)
    )
    slow = SlowKernel(shard.server.servicer, 0.25)
    try:
        with grpc.insecure_channel(shard.target) as ch:
            stub = pb_grpc.GatherPoolStub(ch)
            futures = [stub.Gather.future(_request(), timeout=20) for _ in range(4)]
            for f in futures:
                assert list(f.result().pooled.shape) == [2, 4, 16]
    finally:
        shard.stop()
    assert slow.calls == 4
    assert (slow.peak > 1) is expect_parallel, slow.peak


def test_requests_above_the_message_limit_are_refused_by_grpc(store):
    shard = InProcessShard(ServerConfig(store=store, max_message_bytes=64 << 10))
    try:
        opts = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(shard.target, options=opts) as ch:
            stub = pb_grpc.GatherPoolStub(ch)
            big = _request(pad_weights=5000)  # ~80 KB of weights
            assert big.ByteSize() > 64 << 10
            with pytest.raises(grpc.RpcError) as info:
                stub.Gather(big, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert list(stub.Gather(_request(), timeout=10).pooled.shape) == [2, 4, 16]
            info_reply = stub.Info(pb.InfoRequest(), timeout=10)
            assert info_reply.max_message_bytes == 64 << 10
    finally:
        shard.stop()


def test_server_config_validates_new_limits(tmp_path):
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        ServerConfig(max_concurrent_streams=0)
    opts = dict(ServerConfig(max_concurrent_streams=7).grpc_options())
    assert opts["grpc.max_concurrent_streams"] == 7
    assert "grpc.max_concurrent_streams" not in dict(ServerConfig().grpc_options())


class FakeContext:
    """Just enough of ``grpc.aio.ServicerContext`` to drive the servicer directly."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.status: grpc.StatusCode | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    def code(self) -> grpc.StatusCode | None:
        return self.status

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.status = code
        raise grpc.aio.AbortError(details)


@pytest.mark.parametrize("workers", [0, 1])
def test_servicer_skips_a_call_that_arrives_past_its_deadline(store, workers):
    from ultramem_dist.serving.servicer import GatherPoolServicer
    from ultramem_dist.serving.validate import Limits
    from ultramem_dist.store import load_shard

    servicer = GatherPoolServicer(
        load_shard(store, 0), Limits(16, 64), max_message_bytes=1 << 20, kernel_workers=workers
    )
    slow = SlowKernel(servicer, 0.0)
    try:
        expired = FakeContext(-0.01)
        with pytest.raises(grpc.aio.AbortError, match="deadline passed"):
            asyncio.run(servicer.Gather(_request(), expired))
        assert expired.status == grpc.StatusCode.DEADLINE_EXCEEDED and slow.calls == 0
        for remaining in (None, 5.0):  # no deadline / a live one: computed
            reply = asyncio.run(servicer.Gather(_request(), FakeContext(remaining)))
            assert list(reply.pooled.shape) == [2, 4, 16]
        assert slow.calls == 2
    finally:
        servicer.close()
