"""One shard's ``GatherStream`` calls: many gathers per RPC, each reply matched by request id.

A :class:`GatherStreams` holds one channel per replica of a shard (so it knows where each stream
goes; each channel keeps gRPC's health checking and reconnect backoff) and at most one open
stream per replica whose channel is READY, and hands gathers to those streams in turn. A
replica that is down, connecting or draining (health NOT_SERVING) gets no stream; one that comes
back gets a stream at its next turn. A stream that breaks (the replica died or drained for
shutdown, or the server has no such method) fails every gather waiting on it with
:class:`StreamBroken`; the client re-sends those as unary calls, which carry the channel's retry
policy. A broken stream's replica gets a new one after a short pause; a shard that answers
UNIMPLEMENTED is never streamed to again (``GatherClient.connect`` only streams to replicas
whose ``Info`` advertises ``gather_stream`` in the first place).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence

import grpc

from ultramem_dist.client.channels import ChannelOptions, make_channel
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc

__all__ = ["GatherStreams", "StreamBroken"]

log = logging.getLogger(__name__)

REOPEN_PAUSE_S = 0.2
"""After a stream breaks, its slot stays closed this long (its gathers go unary meanwhile), so a
dead replica is not re-dialled for every call."""


class StreamBroken(Exception):
    """The stream a gather was sent on ended before answering it (the gather may be re-sent)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class _Stream:
    """One open ``GatherStream`` call and the gathers waiting for its replies.

    Messages are written by the stream's own writer task, never by the caller: gRPC cancels the
    whole call when a coroutine awaiting ``write`` is cancelled, and callers are cancelled (a
    deadline, a sibling shard's failure) at any time."""

    def __init__(self, stub: pb_grpc.GatherPoolStub) -> None:
        self.call = stub.GatherStream()
        self.pending: dict[int, asyncio.Future[pb.StreamGatherReply]] = {}
        self.broken: StreamBroken | None = None
        self._outbox: collections.deque[pb.StreamGatherRequest] = collections.deque()
        self._wakeup: asyncio.Future[None] | None = None
        self.reader = asyncio.ensure_future(self._read_replies())
        self.writer = asyncio.ensure_future(self._write_requests())

    def send(self, message: pb.StreamGatherRequest) -> asyncio.Future[pb.StreamGatherReply]:
        """Queue one gather (not to be modified afterwards); the future gets its reply, or
        :class:`StreamBroken`."""
        if self.broken is not None:
            raise self.broken
        fut = asyncio.get_running_loop().create_future()
        self.pending[message.request_id] = fut
        self._outbox.append(message)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        return fut

    async def _write_requests(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self._outbox:
                    await self.call.write(self._outbox.popleft())
                self._wakeup = loop.create_future()
                await self._wakeup
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # AioRpcError, InvalidStateError (call over), ...
            self._break_with(exc)

    async def _read_replies(self) -> None:
        try:
            while True:
                reply = await self.call.read()
                if reply is grpc.aio.EOF:
                    break
                fut = self.pending.pop(reply.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
            code = await self.call.code()
            details = await self.call.details() or "the shard ended the stream"
            self._break(StreamBroken(code, details))
        except asyncio.CancelledError:
            self._break(StreamBroken(grpc.StatusCode.CANCELLED, "the client closed the stream"))
            raise
        except Exception as exc:  # AioRpcError, or anything unexpected: never hang a waiter
            self._break_with(exc)

    def _break_with(self, exc: BaseException) -> StreamBroken:
        if isinstance(exc, grpc.aio.AioRpcError):
            broken = StreamBroken(exc.code(), exc.details() or "")
        else:
            broken = StreamBroken(grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}")
        self._break(broken)
        return self.broken or broken

    def _break(self, broken: StreamBroken) -> None:
        if self.broken is None:
            self.broken = broken
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self.broken)

    async def close(self) -> None:
        self.call.cancel()
        for task in (self.writer, self.reader):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await asyncio.sleep(0)  # let grpc's own task for the cancelled call's status finish


class GatherStreams:
    """The ``GatherStream`` calls of one shard: one channel per replica, a stream on each that is
    READY."""

    def __init__(self, replicas: Sequence[str], options: ChannelOptions) -> None:
        self._channels = [make_channel([r], options) for r in replicas]
        self._stubs = [pb_grpc.GatherPoolStub(c) for c in self._channels]
        self._slots: list[_Stream | None] = [None] * len(replicas)
        self._reopen_at = [0.0] * len(replicas)
        self._turn = itertools.cycle(range(len(replicas)))
        self._closing: set[asyncio.Task[None]] = set()  # broken streams being closed
        self.unsupported = not replicas
        """No replica of the shard advertised GatherStream in its ``Info``, or one answered
        UNIMPLEMENTED: unary calls only."""
        self.sent = 0
        """Gathers sent on a stream."""
        self.resent = 0
        """Gathers whose stream ended before their reply (the client re-sends them unary)."""
        for channel in self._channels:  # connect now: the first gathers find streams READY
            channel.get_state(try_to_connect=True)

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until every replica's channel is READY; ``False`` if one is not in time."""
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(c.channel_ready() for c in self._channels))
        except TimeoutError:
            return False
        return True

    def _pick(self) -> _Stream | None:
        """The next replica's stream (opened now if needed), skipping replicas whose channel is
        not READY; ``None`` if no replica can take a stream right now."""
        for _ in range(len(self._slots)):
            i = next(self._turn)
            stream = self._slots[i]
            if stream is not None and stream.broken is not None:
                self._retire(i, stream)
                stream = None
            ready = self._channels[i].get_state(True) == grpc.ChannelConnectivity.READY
            if not ready:  # down, connecting, or draining (health NOT_SERVING)
                continue
            if stream is None:
                if time.monotonic() < self._reopen_at[i]:
                    continue
                stream = self._slots[i] = _Stream(self._stubs[i])
            return stream
        return None

    def _retire(self, i: int, stream: _Stream) -> None:
        self._slots[i] = None
        self._reopen_at[i] = time.monotonic() + REOPEN_PAUSE_S
        assert stream.broken is not None
        if stream.broken.code == grpc.StatusCode.UNIMPLEMENTED:
            self.unsupported = True
        else:
            log.debug("gather stream ended (%s); reopening later", stream.broken)
        task = asyncio.ensure_future(stream.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def gather(
        self, message: pb.StreamGatherRequest, timeout: float
    ) -> pb.StreamGatherReply | None:
        """The reply to ``message`` within ``timeout`` seconds. ``None``: no stream is open right
        now (send it unary). Raises :class:`StreamBroken` if the stream ended before the reply
        (re-send it), ``TimeoutError`` if the deadline passed."""
        if self.unsupported:
            return None
        stream = self._pick()
        if stream is None:
            return None
        fut = stream.send(message)
        self.sent += 1
        async with asyncio.timeout(timeout):
            try:
                return await fut
            except asyncio.CancelledError:
                stream.pending.pop(message.request_id, None)
                raise
            except StreamBroken as exc:
                self.resent += 1
                if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                    self.unsupported = True
                raise

    async def close(self) -> None:
        streams = [s for s in self._slots if s is not None]
        self._slots = [None] * len(self._slots)
        await asyncio.gather(*self._closing, *(s.close() for s in streams), return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self._channels))
