"""The client's ``GatherStream`` path: the same answers as unary calls, per-message errors keep
the stream, a deadline fails only its own call, and a broken stream's calls are re-sent unary to
another replica within their deadline (nothing lost, nothing partial)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from conftest import HeldKernel, InProcessShard, make_table_spec, random_queries

from ultramem_dist.client import ChannelOptions, GatherClient
from ultramem_dist.errors import InvalidRequestError, ShardUnavailableError
from ultramem_dist.kernels import gather_pool
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables

SPEC = make_table_spec(n_rows=500, dv=24, seed=3)
UNARY = ChannelOptions(streaming=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    export_tables({"row": SPEC, "dim": SPEC}, root, shards=2, by={"row": "row", "dim": "dim"},
                  version="v1")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def pair(store, in_process_shard):
    return [in_process_shard(ServerConfig(store=store, shard=k)) for k in (0, 1)]


def expected(idx, blk, w):
    return gather_pool(SPEC.values, idx, blk, w, SPEC.expansion)


@pytest.mark.parametrize("table", ["row", "dim"])
async def test_streamed_answers_equal_unary_ones(pair, table):
    targets = [s.target for s in pair]
    async with (
        await GatherClient.connect(targets) as streamed,
        await GatherClient.connect(targets, options=UNARY) as unary,
    ):
        assert await streamed.wait_streams_ready(10) and unary.streams is None
        queries = [random_queries(SPEC, t, seed=t) for t in (1, 3, 7, 16)]
        for _ in range(2):
            for q in queries:
                got = await streamed.gather(table, *q)
                assert torch.equal(got, await unary.gather(table, *q))
                torch.testing.assert_close(got, expected(*q), atol=1e-5, rtol=1e-5)
        # many concurrent calls on the same streams: each gets its own answer
        outs = await asyncio.gather(*(streamed.gather(table, *q) for q in queries * 8))
        for out, q in zip(outs, queries * 8, strict=True):
            torch.testing.assert_close(out, expected(*q), atol=1e-5, rtol=1e-5)
        sent = [s.sent for s in streamed.streams]
        assert all(n >= 8 + 32 for n in sent) and all(s.resent == 0 for s in streamed.streams)


async def test_a_refused_gather_raises_its_error_and_the_stream_serves_on(pair):
    async with await GatherClient.connect([s.target for s in pair]) as client:
        assert await client.wait_streams_ready(10)
        idx, blk, w = random_queries(SPEC, 2)
        with pytest.raises(InvalidRequestError, match="INVALID_ARGUMENT.*out of range"):
            await client.gather("dim", idx + 10_000, blk, w)
        out = await client.gather("dim", idx, blk, w)
        torch.testing.assert_close(out, expected(idx, blk, w), atol=1e-5, rtol=1e-5)
        assert all(s.resent == 0 and s.unsupported is False for s in client.streams)


async def test_a_deadline_fails_only_its_own_call(store):
    shard = InProcessShard(ServerConfig(store=store, shard=0, kernel_workers=2))
    held = HeldKernel(shard.server.servicer)
    other = InProcessShard(ServerConfig(store=store, shard=1))
    try:
        async with await GatherClient.connect([shard.target, other.target]) as client:
            assert await client.wait_streams_ready(10)
            idx, blk, w = random_queries(SPEC, 2)
            start = time.monotonic()
            with pytest.raises(ShardUnavailableError, match="DEADLINE_EXCEEDED"):
                await client.gather("dim", idx, blk, w, timeout_s=0.3)
            assert time.monotonic() - start < 1.5
            held.release.set()
            out = await client.gather("dim", idx, blk, w)  # the same stream answers again
            torch.testing.assert_close(out, expected(idx, blk, w), atol=1e-5, rtol=1e-5)
            assert client.streams[0].resent == 0
    finally:
        held.release.set()
        shard.stop()
        other.stop()


async def test_a_broken_stream_is_resent_unary_to_another_replica(store, pair):
    """Shard 0 has two replicas; the one holding a call dies mid-call (its stream breaks)."""
    victim = InProcessShard(ServerConfig(store=store, shard=0, kernel_workers=1))
    held = HeldKernel(victim.server.servicer)
    survivor = pair[0]
    targets = [victim.target, survivor.target, pair[1].target]
    try:
        async with await GatherClient.connect(targets, deadline_s=10) as client:
            assert client.replicas[0] == [victim.target, survivor.target]
            assert await client.wait_streams_ready(10)
            queries = [random_queries(SPEC, 4, seed=s) for s in range(4)]
            calls = [asyncio.ensure_future(client.gather("dim", *q)) for q in queries]
            await asyncio.to_thread(held.started.wait, 10)  # a call is on the victim's stream
            await asyncio.sleep(0.05)
            await asyncio.to_thread(victim.stop, 0.0)  # killed: no grace, its calls cancelled
            outs = await asyncio.gather(*calls)
            for out, q in zip(outs, queries, strict=True):
                torch.testing.assert_close(out, expected(*q), atol=1e-5, rtol=1e-5)
            assert client.streams[0].resent >= 1
            for q in queries:  # later calls avoid the dead replica
                out = await client.gather("dim", *q)
                torch.testing.assert_close(out, expected(*q), atol=1e-5, rtol=1e-5)
    finally:
        held.release.set()
        victim.stop()
