"""``ultramem.v1.GatherPool`` servicer: decode -> validate -> kernel -> encode."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import numpy as np

from ultramem_dist._private.codec import NAME_TO_PB, encode_array
from ultramem_dist._private.status import status_for
from ultramem_dist.errors import UltraMemError
from ultramem_dist.kernels import gather_pool
from ultramem_dist.kernels.gather_pool import native_plan
from ultramem_dist.kernels.native import NativePlan, kernel_threads
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving.metrics import (
    ShardMetrics,
    gather_reply_bytes,
    measured_gather,
    received_bytes,
)
from ultramem_dist.serving.security import (
    TABLE_SCOPE,
    read_gather_leniently,
    read_leniently,
    scope_refusal,
)
from ultramem_dist.serving.validate import GatherQuery, Limits, decode_request
from ultramem_dist.serving.wire import WireAnswer, WireMessage, wire_path
from ultramem_dist.store.manifest import SCHEMA_VERSION
from ultramem_dist.store.reader import ShardSlice, ShardTable

__all__ = ["GatherPoolServicer", "kernel_plan", "run_kernel"]

_STREAM_MESSAGES = (pb.StreamGatherRequest, WireMessage)

log = logging.getLogger(__name__)


class _DeadlinePassed(Exception):
    """The caller's deadline passed before the shard started the work (the work is skipped)."""


class _StreamState:
    """One open GatherStream: whether it waits for the next message, whether it must end."""

    __slots__ = ("idle", "closing")

    def __init__(self) -> None:
        self.idle = True
        self.closing = False


def _entries(request: pb.GatherRequest) -> int:
    """Lookup entries in a validated request (from the declared indices shape)."""
    n = 1
    for d in request.indices.shape:
        n *= d
    return n


def kernel_plan(table: ShardTable) -> NativePlan | None:
    """The native kernel bound to a served table (``None``: it is on a GPU, or no compiler)."""
    e = table.entry
    if table.device_values is not None:  # a GPU shard: the torch path
        return None
    return native_plan(
        table.array, table.segments, e.num_cores, sum_segments=e.merged, dtype=table.dtype,
        pre=table.pre_array, pre_gelu=e.pre_gelu,
    )  # fmt: skip


def run_kernel(q: GatherQuery, plan: NativePlan | None = None) -> np.ndarray:
    """The shard's answer for a validated query: ``[T, E, cols]`` or merged ``[T, cols]``,
    float32. ``plan`` is the table's :func:`kernel_plan` (servers build it once); without one
    the call goes through :func:`~ultramem_dist.kernels.gather_pool` (GPU or torch path)."""
    t = q.table
    if plan is not None:
        out = plan.run(
            q.indices, q.blocks, q.weights, q.offsets, q.num_blocks, kernel_threads(),
            pre_input=q.pre_input,
        )  # fmt: skip
    else:  # the torch path (GPU shard, or no native library): imports torch on first use
        import torch

        dev = t.values.device  # cuda when the shard was started with ServerConfig.device="cuda"
        out = gather_pool(
            t.values,
            torch.from_numpy(q.indices).to(dev),
            torch.from_numpy(q.blocks).to(dev),
            torch.from_numpy(q.weights).to(dev),
            q.num_blocks,
            segments=t.segments,
            offsets=torch.from_numpy(q.offsets).to(dev),
            sum_segments=t.entry.merged,
            pre_values=None if t.pre_values is None else t.pre_values.to(dev),
            pre_input=None if q.pre_input is None else torch.from_numpy(q.pre_input).to(dev),
            pre_gelu=t.entry.pre_gelu,
        )
        out = out.cpu().numpy()
    return out.reshape(q.num_tokens, out.shape[-1]) if t.entry.merged else out


_T = TypeVar("_T")


def _if_live(deadline: float | None, step: Callable[..., _T], *args: Any) -> _T:
    if deadline is not None and time.monotonic() >= deadline:
        raise _DeadlinePassed
    return step(*args)


class GatherPoolServicer(pb_grpc.GatherPoolServicer):
    """Serves one shard's slice of every table of one store version."""

    def __init__(
        self,
        shard: ShardSlice,
        limits: Limits,
        *,
        max_message_bytes: int,
        kernel_workers: int = 0,
        metrics: ShardMetrics | None = None,
    ) -> None:
        self._shard = shard
        self._limits = limits
        self._max_message_bytes = max_message_bytes
        self._metrics = metrics or ShardMetrics()
        self._kernel_workers = kernel_workers
        self._executor = (
            ThreadPoolExecutor(kernel_workers, thread_name_prefix="gather-kernel")
            if kernel_workers
            else None
        )
        # the native kernel bound to each table once (None: GPU tables / no compiler)
        self._plans = {tid: kernel_plan(t) for tid, t in shard.tables.items()}
        self._info = self._build_info()
        self._wire = wire_path(shard, self._plans, limits)  # None: no native library
        self._ending: asyncio.Event | None = None  # set by end_streams(); made on the loop
        self._info_bytes = self._info.ByteSize()
        m = shard.manifest
        self._metrics.set_table_version(
            m.version,
            model_id=m.model_id,
            config_hash=m.config_hash,
            shard=shard.shard,
            num_shards=m.num_shards,
        )

    @property
    def shard(self) -> ShardSlice:
        return self._shard

    @property
    def metrics(self) -> ShardMetrics:
        """This server's Prometheus metrics (read them; the servicer records them)."""
        return self._metrics

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._metrics.close()

    def _build_info(self) -> pb.InfoReply:
        m = self._shard.manifest
        tables = []
        for tid, st in self._shard.tables.items():
            e, s = st.entry, st.slot
            tables.append(
                pb.TableInfo(
                    table_id=tid,
                    n_rows=e.n_rows,
                    dv=e.dv,
                    expansion=e.expansion,
                    num_cores=e.num_cores,
                    d_model=e.d_model,
                    topm=e.topm,
                    heads=e.heads,
                    merged=e.merged,
                    sharding=pb.SHARDING_ROW if e.sharding == "row" else pb.SHARDING_DIM,
                    row_lo=s.row_lo,
                    row_hi=s.row_hi,
                    col_lo=s.col_lo,
                    col_hi=s.col_hi,
                    out_width=e.out_width,
                    storage_dtype=NAME_TO_PB[m.dtype],
                    pre_vdim=e.pre_vdim,
                )
            )
        return pb.InfoReply(
            shard_index=self._shard.shard,
            num_shards=m.num_shards,
            table_version=m.version,
            model_id=m.model_id,
            config_hash=m.config_hash,
            tables=tables,
            max_batch=self._limits.max_batch,
            max_per_query=self._limits.max_per_query,
            max_message_bytes=self._max_message_bytes,
            schema_version=SCHEMA_VERSION,
            gather_stream=True,
        )

    def _gather_sync(self, request: pb.GatherRequest, reply: pb.GatherReply) -> None:
        """Answer ``request`` into ``reply`` (raises on a bad request; ``reply`` is then unset)."""
        q = decode_request(request, self._shard, self._limits)
        pooled = run_kernel(q, self._plans[request.table_id])
        reply.table_id = request.table_id
        reply.table_version = self._shard.manifest.version
        reply.shard_index = self._shard.shard
        encode_array(pooled, reply.pooled)

    @staticmethod
    def _deadline_of(context: grpc.aio.ServicerContext) -> float | None:
        """The caller's deadline (propagated by gRPC) as a ``time.monotonic()`` instant."""
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _kernel_step(self, step: Callable[..., _T], *args: Any, deadline: float | None) -> _T:
        """``step(*args)`` (a gather's kernel step) on the loop, or on a kernel thread; raises
        :class:`_DeadlinePassed` instead when the caller's deadline passed before it starts (a
        call may wait for a kernel thread)."""
        if self._executor is None:
            return _if_live(deadline, step, *args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _if_live, deadline, step, *args)

    async def _answer(
        self, request: pb.GatherRequest, reply: pb.GatherReply, deadline: float | None
    ) -> None:
        """Run the kernel for ``request`` into ``reply`` (the general path)."""
        await self._kernel_step(self._gather_sync, request, reply, deadline=deadline)

    def _failure(self, exc: Exception, table: str) -> tuple[grpc.StatusCode, str]:
        """The status and message a failed gather ends with (recorded in the metrics)."""
        where = f"shard {self._shard.shard}"
        if isinstance(exc, _DeadlinePassed):
            return (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{where}: the caller's deadline passed before the work started; skipped",
            )
        if isinstance(exc, UltraMemError):
            code = status_for(exc)
            self._metrics.table_call(table, code.name)
            return code, f"{where}: {exc}"
        # never crash the server on a bad request
        log.error("Gather failed on %s", where, exc_info=exc)
        self._metrics.table_call(table, "INTERNAL")
        return grpc.StatusCode.INTERNAL, f"{where}: internal error ({type(exc).__name__}: {exc})"

    def _table_label(self, request: pb.GatherRequest) -> str:
        return request.table_id if request.table_id in self._shard.tables else "?"

    async def Gather(  # noqa: N802 (gRPC method name)
        self, request: pb.GatherRequest | WireMessage, context: grpc.aio.ServicerContext
    ) -> pb.GatherReply | bytes:
        if type(request) is not WireMessage:
            return await measured_gather(self._metrics, request, context, self._gather)
        # (a scoped token was checked by the interceptor, on request.table_id)
        start = time.perf_counter()
        self._metrics.begin("Gather")
        done = await self._answer_wire(request, None, self._deadline_of(context))
        if done is None:  # the general path answers it, or words its refusal
            parsed = request.parse()
            return await measured_gather(self._metrics, parsed, context, self._gather, begun=start)
        self._record_wire(done, time.perf_counter() - start, request.request_bytes)
        return done.reply

    def read_gather_message(self, raw: bytes) -> WireMessage | pb.GatherRequest | Any:
        """Unary ``Gather``'s request deserializer (see :meth:`read_stream_message`)."""
        if self._wire is None:
            return read_gather_leniently(raw)
        return self._wire.read(raw, read_gather_leniently, streamed=False)

    async def _gather(
        self, request: pb.GatherRequest, context: grpc.aio.ServicerContext
    ) -> pb.GatherReply:
        start = time.perf_counter()
        table = self._table_label(request)
        reply = pb.GatherReply()
        failure = None
        try:
            await self._answer(request, reply, self._deadline_of(context))
        except Exception as exc:
            failure = self._failure(exc, table)
        if failure is not None:
            await context.abort(*failure)
        self._metrics.table_call(table, "OK", time.perf_counter() - start, _entries(request))
        return reply

    # -- GatherStream ------------------------------------------------------------------------

    def end_streams(self) -> None:
        """End every open GatherStream (a shutdown's drain): no further message is read, the
        replies under way are sent, then the stream completes with OK (at once if it was only
        waiting for a message). The caller re-sends anything unanswered elsewhere."""
        self._ending_event().set()

    def _ending_event(self) -> asyncio.Event:
        if self._ending is None:  # made on first use, on the server's event loop
            self._ending = asyncio.Event()
        return self._ending

    async def GatherStream(  # noqa: N802 (gRPC method name)
        self, request_iterator: object, context: grpc.aio.ServicerContext
    ) -> None:
        ending_event = self._ending_event()
        if ending_event.is_set():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"shard {self._shard.shard} is shutting down"
            )
        state = _StreamState()
        serving = asyncio.ensure_future(self._serve_stream(context, state))
        ending = asyncio.ensure_future(ending_event.wait())
        try:
            await asyncio.wait({serving, ending}, return_when=asyncio.FIRST_COMPLETED)
            if not serving.done():  # draining: end after the replies under way, if any
                state.closing = True
                if state.idle:
                    serving.cancel()  # interrupts the read only (see _serve_stream)
                await serving
            else:
                serving.result()  # re-raise an abort (unreadable message) for gRPC
        finally:
            ending.cancel()
            if not serving.done():  # the RPC itself was cancelled (caller gone)
                serving.cancel()

    async def _serve_stream(self, context: grpc.aio.ServicerContext, state: _StreamState) -> None:
        """Read and answer the stream's messages: one at a time with the kernel on the event
        loop, up to ``kernel_workers`` at once (replies in completion order) with kernel
        threads. On a drain, a read in progress is cancelled and the answers under way are
        still written."""
        scope = TABLE_SCOPE.get()
        width = self._kernel_workers or 1
        slots = asyncio.Semaphore(width)
        write_lock = asyncio.Lock()  # one write at a time on a call
        answering: set[asyncio.Task[None]] = set()

        async def answer(message: pb.StreamGatherRequest | WireMessage) -> None:
            try:
                reply, record = await self._stream_gather(message, scope)
                try:
                    async with write_lock:
                        await context.write(reply)
                finally:
                    record()  # after the write: the metrics are not on the reply's path
            finally:
                slots.release()

        try:
            while not state.closing:
                await slots.acquire()
                state.idle = True
                try:
                    message = await context.read()
                except asyncio.CancelledError:
                    if not state.closing:
                        raise
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    break  # draining: no further message is read
                finally:
                    state.idle = False
                if message is grpc.aio.EOF:
                    break
                if type(message) not in _STREAM_MESSAGES:  # the lenient decoder's stand-in
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "stream message is not a valid ultramem.v1.StreamGatherRequest "
                        "protobuf message; stream ended",
                    )
                if width == 1:
                    await answer(message)
                else:
                    task = asyncio.ensure_future(answer(message))
                    answering.add(task)
                    task.add_done_callback(answering.discard)
            if answering:
                await asyncio.gather(*answering)
        finally:
            for task in answering:
                task.cancel()

    def read_stream_message(self, raw: bytes) -> WireMessage | pb.StreamGatherRequest | Any:
        """``GatherStream``'s request deserializer: a :class:`WireMessage` for the fast path
        (``serving/wire.py``) when the native library reads it, else the generated code's
        message (or the stand-in for bytes that are not one, which ends the stream)."""
        if self._wire is None:
            return read_leniently(raw)
        return self._wire.read(raw, read_leniently)

    def _kernel_is_ours(self) -> bool:
        # a replaced kernel step (test doubles, instrumentation) must see every gather: the
        # fast path, which runs the kernel itself, then stands aside
        return getattr(self._gather_sync, "__func__", None) is GatherPoolServicer._gather_sync

    async def _answer_wire(
        self, message: WireMessage, scope: Collection[str] | None, deadline: float | None
    ) -> WireAnswer | None:
        """``message`` answered on the fast path, or ``None`` for the general path (anything
        it does not answer, every refusal included, is worded there)."""
        wire = self._wire
        if wire is None or not self._kernel_is_ours():
            return None
        table = wire.table_for(message)
        if table is None or scope_refusal(scope, table.table_id) is not None:
            return None
        threads = kernel_threads()
        try:
            return await self._kernel_step(wire.answer, message, table, threads, deadline=deadline)
        except (_DeadlinePassed, MemoryError):
            return None  # the general path answers it (DEADLINE_EXCEEDED, or its own failure)

    def _record_wire(self, done: WireAnswer, seconds: float, request_bytes: int) -> None:
        """Metrics of a gather answered on the fast path, as the general path records them."""
        self._metrics.table_call(done.table_id, "OK", seconds, done.entries)
        self._metrics.end("Gather", "OK", seconds, request_bytes, done.reply_bytes)

    async def _stream_gather(
        self, message: pb.StreamGatherRequest | WireMessage, scope: Collection[str] | None
    ) -> tuple[pb.StreamGatherReply | bytes, Callable[[], None]]:
        """One gather on a stream: its reply, and what records it like a unary ``Gather`` (to
        call once the reply is written)."""
        start = time.perf_counter()
        self._metrics.begin("Gather")
        timeout_us = message.timeout_us  # the caller's budget, from this message's arrival
        deadline = time.monotonic() + timeout_us * 1e-6 if timeout_us else None
        if type(message) is WireMessage:
            done = await self._answer_wire(message, scope, deadline)
            if done is not None:
                seconds, size = time.perf_counter() - start, message.request_bytes
                return done.reply, lambda: self._record_wire(done, seconds, size)
            message = message.parse()  # the general path answers it, or words its refusal
        request = message.gather
        table = self._table_label(request)
        out = pb.StreamGatherReply(request_id=message.request_id)
        failure = None
        refusal = scope_refusal(scope, request.table_id)
        if refusal is not None:
            failure = (grpc.StatusCode.PERMISSION_DENIED, refusal)
        else:
            try:
                await self._answer(request, out.gather, deadline)
            except Exception as exc:
                failure = self._failure(exc, table)
        seconds = time.perf_counter() - start
        if failure is not None:
            out.ClearField("gather")
            out.code = failure[0].value[0]
            out.message = failure[1]

        def record() -> None:
            if failure is None:
                self._metrics.table_call(table, "OK", seconds, _entries(request))
                code, sent = "OK", gather_reply_bytes(out.gather)
            else:
                code, sent = failure[0].name, 0
            self._metrics.end("Gather", code, seconds, received_bytes(request, code), sent)

        return out, record

    async def Info(  # noqa: N802 (gRPC method name)
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoReply:
        start = time.perf_counter()
        self._metrics.begin("Info")
        self._metrics.end(
            "Info", "OK", time.perf_counter() - start, request.ByteSize(), self._info_bytes
        )
        return self._info
