"""The router's ``ultramem.v1.GatherPool`` servicer: one whole table version behind one endpoint.

A caller sends an ordinary ``GatherRequest`` for the WHOLE table (global row ids, every column);
the router hands it to a :class:`~ultramem_dist.client.GatherClient` — the same fan-out/fan-in
code Python callers use directly (row split + partial sums, or full request + column
concatenation; replicas, retries, versions) — and answers one ``GatherReply``. Its ``Info``
describes the table as a single shard (``shard_index`` 0 of 1, every row and column), so a
generic client needs no sharding logic at all.

The caller's deadline bounds the whole fan-out; a cancelled call cancels the shard calls.
Requests are checked for shape and limits here; ids, block ids and weights are checked by the
shards, whose refusals are passed on with the same status code. An UltraMemV2 request's
``pre_input`` is checked as a shard checks it and forwarded whole to every shard called.
"""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import torch

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist._private.status import status_for
from ultramem_dist.client import GatherClient
from ultramem_dist.errors import UltraMemError
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving import v2
from ultramem_dist.serving.metrics import (
    ShardMetrics,
    measured_gather,
)
from ultramem_dist.serving.validate import Limits, check_version, decode_entries

__all__ = ["RouterServicer", "whole_table_info"]

log = logging.getLogger(__name__)


def whole_table_info(shard_info: pb.InfoReply, max_message_bytes: int) -> pb.InfoReply:
    """The ``Info`` of a whole table version seen as ONE shard, from any shard's ``Info``:
    shard 0 of 1, rows ``[0, N)`` and columns ``[0, out_width)`` of every table."""
    info = pb.InfoReply()
    info.CopyFrom(shard_info)
    info.shard_index = 0
    info.num_shards = 1
    info.max_message_bytes = max_message_bytes
    info.gather_stream = False  # the router answers unary Gather only
    for t in info.tables:
        t.row_lo, t.row_hi = 0, t.n_rows
        t.col_lo, t.col_hi = 0, t.out_width
    return info


def _dense_from_ragged(
    indices: torch.Tensor, blocks: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CSR batch as ``[T, max_len]`` tensors; padding entries are row 0, block 0 with zero
    weights, so they add exactly nothing to any pooled sum."""
    lengths = offsets[1:] - offsets[:-1]
    num_tokens = lengths.numel()
    width = int(lengths.max()) if num_tokens else 0
    idx = torch.zeros(num_tokens, width, dtype=indices.dtype)
    blk = torch.zeros(num_tokens, width, dtype=blocks.dtype)
    w = torch.zeros(num_tokens, width, weights.shape[-1], dtype=weights.dtype)
    if indices.numel():
        token = torch.repeat_interleave(torch.arange(num_tokens), lengths)
        col = torch.arange(indices.numel()) - offsets[:-1].repeat_interleave(lengths)
        idx[token, col] = indices
        blk[token, col] = blocks
        w[token, col] = weights
    return idx, blk, w


class RouterServicer(pb_grpc.GatherPoolServicer):
    """Serves a whole table version by fanning out to its shards with a ``GatherClient``."""

    def __init__(
        self,
        client: GatherClient,
        shard_info: pb.InfoReply,
        *,
        max_message_bytes: int,
        default_deadline_s: float = 5.0,
        metrics: ShardMetrics | None = None,
    ) -> None:
        self._client = client
        self._default_deadline_s = default_deadline_s
        self._info = whole_table_info(shard_info, max_message_bytes)
        self._info_bytes = self._info.ByteSize()
        self._metrics = metrics or ShardMetrics()
        layout = client.layout
        self._metrics.set_table_version(
            layout.version,
            model_id=layout.model_id,
            config_hash=layout.config_hash,
            shard="all",
            num_shards=layout.num_shards,
            role="router",
        )

    @property
    def client(self) -> GatherClient:
        """The fan-out client (its ``layout`` is the shards' real layout)."""
        return self._client

    @property
    def info(self) -> pb.InfoReply:
        """What ``Info`` answers: the whole table as one shard."""
        return self._info

    @property
    def metrics(self) -> ShardMetrics:
        """The router's Prometheus metrics (same names as a shard's; role="router")."""
        return self._metrics

    # -- request checks ---------------------------------------------------------------------

    def _decode(
        self, req: pb.GatherRequest
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray | None, int]:
        """Dense ``[T, L]`` indices, blocks, ``[T, L, h_c]`` weights, the UltraMemV2
        ``pre_input`` (``None`` when the request has none) and the entry count."""
        check_version(req, self._client.version, "router")
        t = self._client.table(req.table_id)  # TableNotFoundError -> NOT_FOUND
        layout = self._client.layout
        e = decode_entries(req, Limits(layout.max_batch, layout.max_per_query), t.num_cores)
        entries = e.indices.size
        indices, blocks, weights = (torch.from_numpy(a) for a in (e.indices, e.blocks, e.weights))
        if e.offsets is not None:
            offsets = torch.from_numpy(e.offsets)
            indices, blocks, weights = _dense_from_ragged(indices, blocks, weights, offsets)
        pre = None  # checked here as a shard checks it (presence, shape, dtype, finite)
        if t.pre_vdim:
            pre = v2.decode_pre_input(req, e.num_tokens, t.pre_vdim)
        else:
            v2.check_pre_input_absent(req, req.table_id)
        return indices, blocks, weights, pre, entries

    # -- RPCs ----------------------------------------------------------------------------------

    async def Gather(  # noqa: N802 (gRPC method name)
        self, request: pb.GatherRequest, context: grpc.aio.ServicerContext
    ) -> pb.GatherReply:
        return await measured_gather(self._metrics, request, context, self._gather)

    async def _gather(
        self, request: pb.GatherRequest, context: grpc.aio.ServicerContext
    ) -> pb.GatherReply:
        start = time.perf_counter()
        table = request.table_id if request.table_id in self._client.layout.tables else "?"
        remaining = context.time_remaining()
        timeout = self._default_deadline_s if remaining is None else remaining
        try:
            indices, blocks, weights, pre, entries = self._decode(request)
            pooled = await self._client.gather(
                request.table_id, indices, blocks, weights, pre_input=pre, timeout_s=timeout
            )
        except UltraMemError as exc:
            code = status_for(exc)
            if code == grpc.StatusCode.UNAVAILABLE and remaining is not None:
                left = context.time_remaining()
                if left is not None and left <= 0:  # the caller's own deadline ran out
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
            self._metrics.table_call(table, code.name)
            await context.abort(code, f"router: {exc}")
        except Exception as exc:  # never crash the router on a bad request or reply
            log.exception("router Gather failed")
            self._metrics.table_call(table, "INTERNAL")
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"router: internal error ({type(exc).__name__}: {exc})",
            )
        reply = pb.GatherReply(
            table_id=request.table_id, table_version=self._client.version, shard_index=0
        )
        encode_tensor(pooled, reply.pooled)
        self._metrics.table_call(table, "OK", time.perf_counter() - start, entries)
        return reply

    async def Info(  # noqa: N802 (gRPC method name)
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoReply:
        self._metrics.begin("Info")
        self._metrics.end("Info", "OK", 0.0, request.ByteSize(), self._info_bytes)
        return self._info
