"""The asyncio client: layout discovery, fan-out, deadlines, versions, replicas, the backend."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import torch
from conftest import InProcessShard, make_table_spec, random_queries

from ultramem_dist.client import ChannelOptions, GatherClient, RemoteValueStore
from ultramem_dist.errors import (
    InvalidRequestError,
    ShardUnavailableError,
    TableNotFoundError,
    VersionMismatchError,
)
from ultramem_dist.kernels import gather_pool
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables

SPEC = make_table_spec()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    for version in ("v1", "v2"):
        export_tables(
            {"row": SPEC, "dim": SPEC},
            root,
            shards=2,
            by={"row": "row", "dim": "dim"},
            version=version,
        )
    return root


@pytest.fixture(scope="module")
def one_shard_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store1")
    export_tables({"row": SPEC}, root, shards=1, by="row", version="v1")
    return root


@pytest.fixture(scope="module")
def shards(store, in_process_shard):
    return [in_process_shard(ServerConfig(store=store, shard=k, version="v1")) for k in (0, 1)]


def _targets(servers):
    return ",".join(s.target for s in servers)


def _ref(idx, blk, w):
    return gather_pool(SPEC.values, idx, blk, w, SPEC.expansion)


@pytest.mark.parametrize("table", ["row", "dim"])
async def test_gather_matches_local_and_reads_the_layout(shards, table):
    async with await GatherClient.connect(_targets(reversed(shards))) as client:
        assert client.version == "v1" and client.layout.num_shards == 2
        assert client.replicas == [[shards[0].target], [shards[1].target]]
        t = client.table(table)
        assert t.sharding == table and (t.n_rows, t.dv, t.expansion) == (600, 32, 4)
        idx, blk, w = random_queries(SPEC, 9)
        out = await client.gather(table, idx, blk, w)
        torch.testing.assert_close(out, _ref(idx, blk, w), atol=1e-6, rtol=1e-5)
        # all entries on shard 0 only: shard 1 gets no call for a row table
        idx0 = torch.randint(0, 300, (2, 8))
        out0 = await client.gather(table, idx0, blk[:2], w[:2])
        torch.testing.assert_close(out0, _ref(idx0, blk[:2], w[:2]), atol=1e-6, rtol=1e-5)


async def test_client_side_checks(shards):
    async with await GatherClient.connect(_targets(shards)) as client:
        idx, blk, w = random_queries(SPEC, 2)
        with pytest.raises(TableNotFoundError, match="'nope' is not in store version 'v1'"):
            await client.gather("nope", idx, blk, w)
        with pytest.raises(InvalidRequestError, match="weights shape"):
            await client.gather("row", idx, blk, w[..., :1])


@pytest.mark.parametrize("table", ["row", "dim"])
async def test_ids_beyond_int32_are_refused_not_wrapped(shards, table):
    """The wire narrows ids to int32 for small tables; 2**32 + 3 would wrap to row 3."""
    async with await GatherClient.connect(_targets(shards)) as client:
        idx, blk, w = random_queries(SPEC, 2)
        idx[1, 0] = 2**32 + 3
        with pytest.raises(InvalidRequestError, match=r"indices: value 4294967299 is out of range"):
            await client.gather(table, idx, blk, w)
        blk[0, 0], idx[1, 0] = 2**32 + 1, 3
        with pytest.raises(InvalidRequestError, match=r"blocks: value 4294967297 is out of range"):
            await client.gather(table, idx, blk, w)


async def test_server_errors_come_back_typed_and_name_the_shard(shards):
    async with await GatherClient.connect(_targets(shards)) as client:
        idx, blk, w = random_queries(SPEC, 2)
        blk[0, 0] = 99
        with pytest.raises(
            InvalidRequestError, match=r"shard \d .* refused table 'dim'.*IVE block"
        ):
            await client.gather("dim", idx, blk, w)


async def test_slow_shard_fails_the_call_within_the_deadline_naming_it(store):
    fast = InProcessShard(ServerConfig(store=store, shard=0, version="v1"))
    slow = InProcessShard(ServerConfig(store=store, shard=1, version="v1"))
    original = slow.server.servicer._gather_sync
    slow.server.servicer._gather_sync = lambda req, out: (time.sleep(1.0), original(req, out))
    try:
        client = await GatherClient.connect([fast.target, slow.target], deadline_s=0.3)
        async with client:
            idx, blk, w = random_queries(SPEC, 4)
            start = time.monotonic()
            with pytest.raises(ShardUnavailableError) as info:
                await client.gather("dim", idx, blk, w)
            assert time.monotonic() - start < 0.9
            msg = str(info.value)
            assert f"shard 1 ({slow.target})" in msg and "0.3s deadline" in msg
            assert "DEADLINE_EXCEEDED" in msg
    finally:
        fast.stop()
        slow.stop()


async def test_dead_shard_fails_the_call_naming_it(store):
    a = InProcessShard(ServerConfig(store=store, shard=0, version="v1"))
    b = InProcessShard(ServerConfig(store=store, shard=1, version="v1"))
    try:
        client = await GatherClient.connect([a.target, b.target], deadline_s=2.0)
        async with client:
            b.stop()
            idx, blk, w = random_queries(SPEC, 4)
            with pytest.raises(
                ShardUnavailableError, match=rf"shard 1 \({b.target}\).*UNAVAILABLE"
            ):
                await client.gather("dim", idx, blk, w)
    finally:
        a.stop()


async def test_connect_needs_every_shard(shards):
    with pytest.raises(ShardUnavailableError, match=r"no reachable replica of shard\(s\) \[1\]"):
        await GatherClient.connect(shards[0].target)
    with pytest.raises(ShardUnavailableError, match="no target answered"):
        await GatherClient.connect("127.0.0.1:1", connect_timeout_s=1)


async def test_version_selection_and_mismatch(store, shards, in_process_shard):
    v2 = [in_process_shard(ServerConfig(store=store, shard=k, version="v2")) for k in (0, 1)]
    mixed = _targets(shards + v2)
    with pytest.raises(VersionMismatchError, match="several table versions"):
        await GatherClient.connect(mixed)
    with pytest.raises(VersionMismatchError, match="no target serves table version 'v3'"):
        await GatherClient.connect(mixed, version="v3")
    async with await GatherClient.connect(mixed, version="v2") as client:
        assert client.replicas == [[v2[0].target], [v2[1].target]]
        idx, blk, w = random_queries(SPEC, 3)
        torch.testing.assert_close(await client.gather("row", idx, blk, w), _ref(idx, blk, w))


async def test_reply_from_another_version_is_refused(store):
    a = InProcessShard(ServerConfig(store=store, shard=0, version="v1"))
    b = InProcessShard(ServerConfig(store=store, shard=1, version="v1"))
    original = b.server.servicer._gather_sync

    def wrong_version(req, reply):
        original(req, reply)
        reply.table_version = "v2"

    b.server.servicer._gather_sync = wrong_version
    try:
        async with await GatherClient.connect([a.target, b.target]) as client:
            idx, blk, w = random_queries(SPEC, 3)
            with pytest.raises(VersionMismatchError, match="answered with table version 'v2'"):
                await client.gather("dim", idx, blk, w)
    finally:
        a.stop()
        b.stop()


async def test_server_of_another_version_at_the_same_address_is_refused(store):
    a = InProcessShard(ServerConfig(store=store, shard=0, version="v1"))
    b = InProcessShard(ServerConfig(store=store, shard=1, version="v1"))
    try:
        async with await GatherClient.connect([a.target, b.target]) as client:
            port = b.port
            b.stop()
            b = InProcessShard(ServerConfig(store=store, shard=1, version="v2", port=port))
            idx, blk, w = random_queries(SPEC, 3)
            with pytest.raises(VersionMismatchError, match="FAILED_PRECONDITION"):
                await client.gather("dim", idx, blk, w)
    finally:
        a.stop()
        b.stop()


def _ok_count(server) -> float:
    metric = server.server.servicer._metrics.requests
    return sum(metric.labels(t, "OK")._value.get() for t in ("row",))


async def test_replicas_round_robin_and_fail_over(one_shard_store):
    reps = [InProcessShard(ServerConfig(store=one_shard_store, shard=0)) for _ in range(2)]
    try:
        opts = ChannelOptions(max_attempts=4)
        async with await GatherClient.connect(_targets(reps), deadline_s=3, options=opts) as client:
            assert client.replicas == [[r.target for r in reps]]
            idx, blk, w = random_queries(SPEC, 2)
            for _ in range(10):
                await client.gather("row", idx, blk, w)
            assert all(_ok_count(r) >= 2 for r in reps)  # both replicas got traffic
            reps[0].stop()
            for _ in range(10):  # every call still succeeds, on the surviving replica
                out = await client.gather("row", idx, blk, w)
                torch.testing.assert_close(out, _ref(idx, blk, w))
    finally:
        for r in reps:
            r.stop()


def test_remote_value_store_is_a_thread_backed_backend(shards):
    from ultramem_dist.model import Selection

    idx, blk, w = random_queries(SPEC, 5)
    before = {t.name for t in threading.enumerate()}
    store = RemoteValueStore(_targets(shards))
    try:
        fut = store.submit("dim", Selection(idx, blk, w))
        assert isinstance(fut, concurrent.futures.Future)
        torch.testing.assert_close(fut.result(timeout=10), _ref(idx, blk, w))
        torch.testing.assert_close(
            store.lookup("row", Selection(idx, blk, w), timeout=10), _ref(idx, blk, w)
        )
        bad = store.submit("nope", Selection(idx, blk, w))
        with pytest.raises(TableNotFoundError):
            bad.result(timeout=10)
    finally:
        store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.submit("dim", Selection(idx, blk, w))
    assert "ultramem-remote-store" not in {t.name for t in threading.enumerate()} - before


def test_remote_value_store_connect_failure_cleans_up():
    before = threading.active_count()
    with pytest.raises(ShardUnavailableError):
        RemoteValueStore("127.0.0.1:1", connect_timeout_s=1)
    assert threading.active_count() <= before
