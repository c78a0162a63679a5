"""Client-side health checking: a replica that reports NOT_SERVING (draining) gets no new calls
from GatherClient, so a graceful stop never races in-flight traffic."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from conftest import InProcessShard
from grpc_health.v1 import health_pb2
from test_lifecycle import SlowKernel

from ultramem_dist.client import ChannelOptions, GatherClient
from ultramem_dist.reliability.synthetic import make_synthetic_store
from ultramem_dist.serving import ServerConfig

SERVICE = "ultramem.v1.GatherPool"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    kw = {"n_rows": 200, "dv": 16, "d_model": 12, "topm": 4}
    return make_synthetic_store(tmp_path_factory.mktemp("store"), shards=1, **kw)


async def _traffic(targets, options, calls=40):
    async with await GatherClient.connect(targets, options=options) as client:
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, 200, (2, 8), generator=g)
        for _ in range(calls):
            await client.gather("row", idx, idx % 4, torch.randn(2, 8, 2))


@pytest.mark.parametrize("health_check", [True, False])
def test_not_serving_replica_gets_no_new_calls(store, health_check):
    a, b = (InProcessShard(ServerConfig(store=store)) for _ in range(2))
    try:
        count_a, count_b = SlowKernel(a.server.servicer, 0), SlowKernel(b.server.servicer, 0)
        b.run(b.server.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING))
        time.sleep(0.1)
        options = ChannelOptions(health_check=health_check)
        asyncio.run(_traffic([a.target, b.target], options))
        if health_check:
            assert count_b.calls == 0 and count_a.calls == 40
        else:  # control: without health checks round robin keeps using the draining replica
            assert count_b.calls > 0 and count_a.calls + count_b.calls == 40
    finally:
        a.stop()
        b.stop()


def test_health_checks_tolerate_servers_without_the_health_service(store):
    """A replica whose Health service is absent (UNIMPLEMENTED) still counts as healthy."""
    import grpc

    from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
    from ultramem_dist.serving.servicer import GatherPoolServicer
    from ultramem_dist.serving.validate import Limits
    from ultramem_dist.store import load_shard

    async def run():
        server = grpc.aio.server()
        servicer = GatherPoolServicer(
            load_shard(store, 0), Limits(16, 64), max_message_bytes=1 << 20
        )
        pb_grpc.add_GatherPoolServicer_to_server(servicer, server)  # no health, no reflection
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await _traffic([f"127.0.0.1:{port}"], ChannelOptions(health_check=True), calls=3)
        finally:
            await server.stop(0)
            servicer.close()

    asyncio.run(run())


def test_health_watchers_do_not_hold_a_graceful_stop(store):
    """A client's health Watch stream sees NOT_SERVING, then ends after the drain: the stop
    does not wait the whole grace period for it."""
    import grpc
    from grpc_health.v1 import health_pb2_grpc

    shard = InProcessShard(ServerConfig(store=store, drain_s=0.3, grace_s=4.0))
    seen: list[str] = []
    try:
        with grpc.insecure_channel(shard.target) as ch:
            stream = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=30
            )
            first = next(stream)
            seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(first.status))
            t0 = time.monotonic()
            stopping = asyncio.run_coroutine_threadsafe(shard.server.stop(), shard.loop)
            for msg in stream:  # ends when the server ends the watch
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status))
            stopping.result(timeout=10)
            elapsed = time.monotonic() - t0
    finally:
        shard.stop()
    assert seen == ["SERVING", "NOT_SERVING"]
    # drain yes, the 4 s grace no (only "less than the grace" is guaranteed: the box may be loaded)
    assert 0.3 <= elapsed < 4.0, elapsed
