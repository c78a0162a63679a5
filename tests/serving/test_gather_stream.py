"""``GatherStream`` on a real (in-process) shard server: each message gets exactly the unary
``Gather``'s answer or status, a bad message never ends the stream (an unreadable one does,
with INVALID_ARGUMENT), expired work is skipped, and a graceful stop ends open streams."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import grpc
import pytest
import torch
from conftest import HeldKernel, InProcessShard, make_table_spec

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables

N, E, HC, DV = 400, 4, 2, 16
STREAM = "/ultramem.v1.GatherPool/GatherStream"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    spec = make_table_spec(n_rows=N, dv=DV)
    export_tables({"row": spec, "mrg": spec}, root, shards=1, by="row",
                  merged={"row": False, "mrg": True}, version="v1")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(store, in_process_shard):
    return in_process_shard(ServerConfig(store=store, max_batch=16))


def gather_request(seed: int, table="row", version="v1", T=3, L=8, hi=N) -> pb.GatherRequest:
    g = torch.Generator().manual_seed(seed)
    req = pb.GatherRequest(table_id=table, table_version=version)
    encode_tensor(torch.randint(0, hi, (T, L), generator=g), req.indices)
    encode_tensor(torch.randint(0, E, (T, L), generator=g), req.blocks)
    encode_tensor(torch.randn(T, L, HC, generator=g), req.weights)
    return req


def message(request_id: int, req: pb.GatherRequest, timeout_us: int = 0):
    return pb.StreamGatherRequest(request_id=request_id, gather=req, timeout_us=timeout_us)


async def _exchange(target: str, messages: list, raw: bool = False) -> tuple[list, grpc.StatusCode]:
    """Write every message on one stream, half-close (unless ``raw``: the server will end it),
    read every reply; the final status."""
    async with grpc.aio.insecure_channel(target) as ch:
        if raw:
            call = ch.stream_stream(STREAM, response_deserializer=pb.StreamGatherReply.FromString)()
        else:
            call = pb_grpc.GatherPoolStub(ch).GatherStream()
        replies = []
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            for m in messages:  # a write after the server ended the call raises
                await call.write(m)
            if not raw:  # (a write racing the server's end fails the call as INTERNAL)
                await call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):  # read raises at a non-OK end
            while (r := await call.read()) is not grpc.aio.EOF:
                replies.append(r)
        return replies, await call.code()


def test_each_message_gets_the_unary_answer_with_its_id(server):
    requests = [gather_request(seed, table) for seed in range(6) for table in ("row", "mrg")]
    ids = [1000 - 7 * i for i in range(len(requests))]  # any ids, not in order
    wire = server.server.servicer._wire  # the native fast path (None without a compiler)
    before = wire.answered if wire is not None else 0
    replies, code = asyncio.run(
        _exchange(server.target, [message(i, r) for i, r in zip(ids, requests, strict=True)])
    )
    assert code == grpc.StatusCode.OK
    assert [r.request_id for r in replies] == ids
    if wire is not None:  # all answered there; the unary calls below take the general path
        assert wire.answered - before == len(requests)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GatherPoolStub(ch)
        assert stub.Info(pb.InfoRequest(), timeout=10).gather_stream  # advertised
        for req, rep in zip(requests, replies, strict=True):
            assert rep.code == 0 and rep.message == ""
            assert rep.gather == stub.Gather(req, timeout=10)  # bit for bit, header and data


@pytest.mark.parametrize(
    "bad,code,fragment",
    [
        (gather_request(1, hi=N + 50), grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        (gather_request(1, T=17), grpc.StatusCode.INVALID_ARGUMENT, "16"),
        (gather_request(1, table="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (gather_request(1, version="v0"), grpc.StatusCode.FAILED_PRECONDITION, "v0"),
        (pb.GatherRequest(table_id="row", table_version="v1"), grpc.StatusCode.INVALID_ARGUMENT,
         "indices"),
    ],
)  # fmt: skip
def test_a_bad_message_gets_its_status_and_the_stream_goes_on(server, bad, code, fragment):
    good = gather_request(2)
    replies, end = asyncio.run(
        _exchange(server.target, [message(1, good), message(2, bad), message(3, good)])
    )
    assert end == grpc.StatusCode.OK and [r.request_id for r in replies] == [1, 2, 3]
    assert replies[1].code == code.value[0], replies[1]
    assert fragment in replies[1].message and not replies[1].HasField("gather")
    assert replies[0].code == replies[2].code == 0
    assert replies[0].gather == replies[2].gather


def test_an_unreadable_message_ends_the_stream_and_the_server_serves_on(server):
    good = message(1, gather_request(3)).SerializeToString()
    replies, code = asyncio.run(
        _exchange(server.target, [good, b"\xff\xff\xff not a protobuf"], raw=True)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [r.request_id for r in replies] == [1]  # answered up to the unreadable message
    replies, code = asyncio.run(_exchange(server.target, [message(5, gather_request(3))]))
    assert code == grpc.StatusCode.OK and replies[0].code == 0


def test_stream_gathers_are_counted_like_unary_ones(server):
    def calls() -> float:
        snap = server.server.servicer.metrics.snapshot("Gather")
        return snap["requests"]

    before = calls()
    asyncio.run(_exchange(server.target, [message(i, gather_request(i)) for i in range(4)]))
    assert calls() - before == 4


def test_work_whose_deadline_passed_in_the_queue_is_skipped(store):
    shard = InProcessShard(ServerConfig(store=store, kernel_workers=1))
    slow = HeldKernel(shard.server.servicer)

    async def run():
        async with grpc.aio.insecure_channel(shard.target) as ch:
            stub = pb_grpc.GatherPoolStub(ch)
            first, second = stub.GatherStream(), stub.GatherStream()
            await first.write(message(1, gather_request(1)))
            await asyncio.to_thread(slow.started.wait, 10)  # the only kernel thread is taken
            await second.write(message(2, gather_request(2), timeout_us=50_000))
            await asyncio.sleep(0.2)  # the 50 ms budget passes in the queue
            slow.release.set()
            late, done = await second.read(), await first.read()
            for call in (first, second):
                await call.done_writing()
            return late, done

    try:
        late, done = asyncio.run(run())
    finally:
        slow.release.set()
        shard.stop()
    assert done.code == 0 and late.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "skipped" in late.message and slow.calls == 1


def test_with_kernel_threads_a_stream_answers_several_messages_at_once(store):
    shard = InProcessShard(ServerConfig(store=store, kernel_workers=2))
    servicer = shard.server.servicer
    original = servicer._gather_sync
    active, peak, lock = [0], [0], threading.Lock()

    def slow(request, reply):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        original(request, reply)

    servicer._gather_sync = slow
    try:
        requests = [gather_request(seed) for seed in range(4)]
        replies, code = asyncio.run(
            _exchange(shard.target, [message(10 + i, r) for i, r in enumerate(requests)])
        )
        with grpc.insecure_channel(shard.target) as ch:
            want = [pb_grpc.GatherPoolStub(ch).Gather(r, timeout=10) for r in requests]
    finally:
        shard.stop()
    assert code == grpc.StatusCode.OK and peak[0] == 2  # two kernel threads busy at once
    by_id = {r.request_id: r for r in replies}
    assert sorted(by_id) == [10, 11, 12, 13]
    assert [by_id[10 + i].gather for i in range(4)] == want


@pytest.mark.parametrize("kernel_workers", [1, 2])
def test_graceful_stop_answers_what_it_read_then_ends_open_streams(store, kernel_workers):
    shard = InProcessShard(ServerConfig(store=store, kernel_workers=kernel_workers))
    slow = HeldKernel(shard.server.servicer)

    async def run():
        async with grpc.aio.insecure_channel(shard.target) as ch:
            stub = pb_grpc.GatherPoolStub(ch)
            busy, idle = stub.GatherStream(), stub.GatherStream()
            await idle.write(message(7, gather_request(7)))
            slow.release.set()
            assert (await idle.read()).code == 0  # idle from now on
            slow.release.clear()
            slow.started.clear()
            await busy.write(message(8, gather_request(8)))
            await asyncio.to_thread(slow.started.wait, 10)
            start = time.monotonic()
            stopping = asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(shard.server.stop(grace=30), shard.loop)
            )
            assert await idle.read() is grpc.aio.EOF  # the idle stream ends at once
            assert await idle.code() == grpc.StatusCode.OK
            slow.release.set()
            reply = await busy.read()  # the message being computed is answered first
            assert reply.request_id == 8 and reply.code == 0
            assert await busy.read() is grpc.aio.EOF
            assert await busy.code() == grpc.StatusCode.OK
            await stopping
            return time.monotonic() - start

    try:
        took = asyncio.run(run())
    finally:
        slow.release.set()
        shard.stop()
    assert took < 10  # never the 30 s grace
