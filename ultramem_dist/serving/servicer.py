"""``ultramem.v1.GatherPool`` servicer: decode -> validate -> kernel -> encode."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import torch

from ultramem_dist._private.codec import DTYPE_TO_PB, encode_array
from ultramem_dist._private.status import status_for
from ultramem_dist.errors import UltraMemError
from ultramem_dist.kernels import gather_pool
from ultramem_dist.kernels.gather_pool import native_plan
from ultramem_dist.kernels.native import NativePlan
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving.metrics import (
    ShardMetrics,
    measured_gather,
)
from ultramem_dist.serving.validate import GatherQuery, Limits, decode_request
from ultramem_dist.store.manifest import SCHEMA_VERSION
from ultramem_dist.store.reader import ShardSlice, ShardTable

__all__ = ["GatherPoolServicer", "kernel_plan", "run_kernel"]

log = logging.getLogger(__name__)
_STORAGE_PB = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _DeadlinePassed(Exception):
    """The caller's deadline passed before the shard started the work (the work is skipped)."""


def _entries(request: pb.GatherRequest) -> int:
    """Lookup entries in a validated request (from the declared indices shape)."""
    n = 1
    for d in request.indices.shape:
        n *= d
    return n


def kernel_plan(table: ShardTable) -> NativePlan | None:
    """The native kernel bound to a served table (``None``: it is on a GPU, or no compiler)."""
    e = table.entry
    return native_plan(table.values, table.segments, e.num_cores, sum_segments=e.merged)


def run_kernel(q: GatherQuery, plan: NativePlan | None = None) -> np.ndarray:
    """The shard's answer for a validated query: ``[T, E, cols]`` or merged ``[T, cols]``,
    float32. ``plan`` is the table's :func:`kernel_plan` (servers build it once); without one
    the call goes through :func:`~ultramem_dist.kernels.gather_pool` (GPU or torch path)."""
    t = q.table
    if plan is not None:
        out = plan.run(
            q.indices, q.blocks, q.weights, q.offsets, q.num_blocks, torch.get_num_threads()
        )
    else:
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
        )
        out = out.cpu().numpy()
    return out.reshape(q.num_tokens, out.shape[-1]) if t.entry.merged else out


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
        self._executor = (
            ThreadPoolExecutor(kernel_workers, thread_name_prefix="gather-kernel")
            if kernel_workers
            else None
        )
        # the native kernel bound to each table once (None: GPU tables / no compiler)
        self._plans = {tid: kernel_plan(t) for tid, t in shard.tables.items()}
        self._info = self._build_info()
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
                    storage_dtype=DTYPE_TO_PB[_STORAGE_PB[m.dtype]],
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
        )

    def _gather_sync(self, request: pb.GatherRequest) -> pb.GatherReply:
        q = decode_request(request, self._shard, self._limits)
        pooled = run_kernel(q, self._plans[request.table_id])
        reply = pb.GatherReply(
            table_id=request.table_id,
            table_version=self._shard.manifest.version,
            shard_index=self._shard.shard,
        )
        encode_array(pooled, reply.pooled)
        return reply

    @staticmethod
    def _deadline_of(context: grpc.aio.ServicerContext) -> float | None:
        """The caller's deadline (propagated by gRPC) as a ``time.monotonic()`` instant."""
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    def _gather_if_live(self, request: pb.GatherRequest, deadline: float | None) -> pb.GatherReply:
        if deadline is not None and time.monotonic() >= deadline:
            raise _DeadlinePassed
        return self._gather_sync(request)

    async def Gather(  # noqa: N802 (gRPC method name)
        self, request: pb.GatherRequest, context: grpc.aio.ServicerContext
    ) -> pb.GatherReply:
        return await measured_gather(self._metrics, request, context, self._gather)

    async def _gather(
        self, request: pb.GatherRequest, context: grpc.aio.ServicerContext
    ) -> pb.GatherReply:
        start = time.perf_counter()
        table = request.table_id if request.table_id in self._shard.tables else "?"
        deadline = self._deadline_of(context)
        try:
            if self._executor is None:
                reply = self._gather_if_live(request, deadline)
            else:  # a call may wait for a kernel thread: re-check its deadline when it starts
                loop = asyncio.get_running_loop()
                reply = await loop.run_in_executor(
                    self._executor, self._gather_if_live, request, deadline
                )
        except _DeadlinePassed:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"shard {self._shard.shard}: the caller's deadline passed before the work "
                "started; skipped",
            )
        except UltraMemError as exc:
            code = status_for(exc)
            self._metrics.table_call(table, code.name)
            await context.abort(code, f"shard {self._shard.shard}: {exc}")
        except Exception as exc:  # never crash the server on a bad request
            log.exception("Gather failed on shard %d", self._shard.shard)
            self._metrics.table_call(table, "INTERNAL")
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"shard {self._shard.shard}: internal error ({type(exc).__name__}: {exc})",
            )
        entries = _entries(request)
        self._metrics.table_call(table, "OK", time.perf_counter() - start, entries)
        return reply

    async def Info(  # noqa: N802 (gRPC method name)
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoReply:
        start = time.perf_counter()
        self._metrics.begin("Info")
        self._metrics.end(
            "Info", "OK", time.perf_counter() - start, request.ByteSize(), self._info_bytes
        )
        return self._info
