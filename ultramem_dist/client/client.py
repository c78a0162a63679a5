"""asyncio client of a sharded value store: fan a batch of lookups out to every shard, fan in.

>>> client = await GatherClient.connect(["10.0.0.1:7000", "10.0.0.2:7000"])
>>> pooled = await client.gather("mem0", indices, blocks, weights)   # [T, E, Dv] (merged: [T, D])
>>> pooled = await client.gather("shared", indices, blocks, weights, pre_input=pre)  # UltraMemV2

Every call has a deadline. A call either returns the complete result or raises: a shard that
cannot answer in time raises :class:`~ultramem_dist.errors.ShardUnavailableError` naming it, and
a reply from another table version raises :class:`~ultramem_dist.errors.VersionMismatchError`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Sequence

import grpc
import numpy as np
import torch

from ultramem_dist._private.codec import decode_array, encode_array
from ultramem_dist._private.status import code_for_number, error_for
from ultramem_dist.client.channels import (
    ChannelOptions,
    expand_targets,
    make_channel,
    split_targets,
)
from ultramem_dist.client.layout import StoreLayout, TableLayout
from ultramem_dist.client.router import concat_columns, host_array, split_for_wire, sum_partials
from ultramem_dist.client.streams import GatherStreams, StreamBroken
from ultramem_dist.errors import (
    InvalidRequestError,
    RemoteError,
    ShardUnavailableError,
    TableNotFoundError,
    UltraMemError,
    VersionMismatchError,
)
from ultramem_dist.kernels.gather_pool import dense_offsets
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc

__all__ = ["GatherClient", "fetch_info"]

log = logging.getLogger(__name__)
_INT32_MAX = 2**31 - 1


async def fetch_info(
    target: str, *, timeout_s: float = 5.0, options: ChannelOptions | None = None
) -> pb.InfoReply:
    """``Info`` of one endpoint (raises ShardUnavailableError naming it if unreachable)."""
    opts = options or ChannelOptions()
    async with make_channel([target], opts) as channel:
        try:
            return await pb_grpc.GatherPoolStub(channel).Info(pb.InfoRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_for(
                exc.code(), f"endpoint {target}: Info failed: {exc.code().name}: {exc.details()}"
            ) from None


_LIMITS = {t: (int(np.iinfo(t).min), int(np.iinfo(t).max)) for t in (np.int32, np.int64)}


def _ids_dtype(n: int) -> type[np.integer]:
    return np.int32 if n <= _INT32_MAX else np.int64


def _narrow(a: np.ndarray, dtype: type[np.integer]) -> np.ndarray:
    """Integers as ``dtype`` for the wire when every value fits, else int64: a value that does
    not fit must reach the shard as itself (and be refused there), never wrapped into a valid
    row or block id."""
    if a.dtype == dtype or a.size == 0:
        return a
    lo, hi = _LIMITS[dtype]
    if lo <= int(a.min()) and int(a.max()) <= hi:
        return a.astype(dtype)
    return a.astype(np.int64, copy=False)


class GatherClient:
    """Fan-out/fan-in client over one store version. Build it with :meth:`connect`."""

    def __init__(
        self,
        layout: StoreLayout,
        replicas: list[list[str]],
        *,
        deadline_s: float,
        options: ChannelOptions,
        stream_replicas: list[list[str]] | None = None,
    ) -> None:
        """``stream_replicas``: per shard, the replicas to open GatherStreams to (default: all;
        :meth:`connect` passes those whose ``Info`` advertises ``gather_stream``)."""
        self.layout = layout
        self.replicas = replicas
        self.deadline_s = deadline_s
        self.options = options
        self._channels = [make_channel(r, options) for r in replicas]
        self._stubs = [pb_grpc.GatherPoolStub(c) for c in self._channels]
        self._streams = (
            [GatherStreams(r, options) for r in stream_replicas or replicas]
            if options.streaming
            else None
        )
        self._request_ids = itertools.count(1)

    @classmethod
    async def connect(
        cls,
        targets: str | Sequence[str],
        *,
        version: str | None = None,
        deadline_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        options: ChannelOptions | None = None,
    ) -> GatherClient:
        """Discover the layout with ``Info`` on every target, then open one channel per shard.

        Targets are shard replicas in any order; each reports which shard it is. Targets serving
        another version than ``version`` (default: the only version served) are ignored, and an
        unreachable target is skipped if its shard has another replica. Raises if a shard of the
        version has no reachable replica.
        """
        opts = options or ChannelOptions()
        addrs = split_targets(targets)
        if not opts.secure:  # with TLS, names must stay names (certificate host checks)
            addrs = expand_targets(addrs)
        results = await asyncio.gather(
            *(fetch_info(t, timeout_s=connect_timeout_s, options=opts) for t in addrs),
            return_exceptions=True,
        )
        by_version: dict[str, dict[int, list[tuple[str, pb.InfoReply]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        failures: list[str] = []
        for target, res in zip(addrs, results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, UltraMemError):
                    raise res
                failures.append(str(res))
                continue
            by_version[res.table_version][res.shard_index].append((target, res))
        if not by_version:
            raise ShardUnavailableError("no target answered Info: " + "; ".join(failures))
        if version is None:
            if len(by_version) > 1:
                raise VersionMismatchError(
                    f"targets serve several table versions {sorted(by_version)}; pass the version"
                )
            version = next(iter(by_version))
        if version not in by_version:
            raise VersionMismatchError(
                f"no target serves table version {version!r}; served: {sorted(by_version)}"
            )
        shards = by_version[version]
        num_shards = next(iter(shards.values()))[0][1].num_shards
        missing = [k for k in range(num_shards) if k not in shards]
        if missing:
            detail = ("; unreachable: " + "; ".join(failures)) if failures else ""
            raise ShardUnavailableError(
                f"version {version!r} has {num_shards} shards but no reachable replica of "
                f"shard(s) {missing}{detail}"
            )
        for f in failures:
            log.warning("skipping unreachable replica: %s", f)
        layout = StoreLayout.from_infos([shards[k][0][1] for k in range(num_shards)])
        replicas = [[t for t, _ in shards[k]] for k in range(num_shards)]
        # streams go to the replicas whose Info says they answer GatherStream
        streaming = [[t for t, info in shards[k] if info.gather_stream] for k in range(num_shards)]
        max_msg = min(info.max_message_bytes for k in shards for _, info in shards[k])
        if max_msg and max_msg < opts.max_message_bytes:
            opts = dataclasses.replace(opts, max_message_bytes=max_msg)
        return cls(layout, replicas, deadline_s=deadline_s, options=opts, stream_replicas=streaming)

    @property
    def version(self) -> str:
        return self.layout.version

    @property
    def streams(self) -> list[GatherStreams] | None:
        """Each shard's ``GatherStream`` state (``None``: ``ChannelOptions.streaming`` is off)."""
        return self._streams

    async def wait_streams_ready(self, timeout_s: float = 5.0) -> bool:
        """Wait until every replica can take a stream (gathers sent before that go unary);
        ``False`` if some replica is not READY within ``timeout_s`` or streaming is off."""
        if self._streams is None:
            return False
        ready = await asyncio.gather(*(s.wait_ready(timeout_s) for s in self._streams))
        return all(ready)

    def table(self, table_id: str) -> TableLayout:
        try:
            return self.layout.tables[table_id]
        except KeyError:
            raise TableNotFoundError(
                f"table {table_id!r} is not in store version {self.version!r}; "
                f"tables: {sorted(self.layout.tables)}"
            ) from None

    async def close(self) -> None:
        if self._streams is not None:
            await asyncio.gather(*(s.close() for s in self._streams))
        await asyncio.gather(*(c.close() for c in self._channels))

    async def __aenter__(self) -> GatherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- gather ------------------------------------------------------------------------------

    def _check_inputs(
        self, t: TableLayout, indices: np.ndarray, blocks: np.ndarray, weights: np.ndarray
    ) -> None:
        if indices.ndim != 2:
            raise InvalidRequestError(f"indices must be [T, L], got {list(indices.shape)}")
        if blocks.shape != indices.shape:
            raise InvalidRequestError(
                f"blocks shape {list(blocks.shape)} != indices shape {list(indices.shape)}"
            )
        want = (*indices.shape, t.num_cores)
        if weights.shape != want:
            raise InvalidRequestError(f"weights shape {list(weights.shape)}, expected {list(want)}")
        if indices.shape[0] > self.layout.max_batch:
            raise InvalidRequestError(
                f"batch of {indices.shape[0]} queries is above the shards' limit of "
                f"{self.layout.max_batch}"
            )

    @staticmethod
    def _pre_array(
        t: TableLayout, pre_input: torch.Tensor | np.ndarray | None, num_tokens: int
    ) -> np.ndarray | None:
        """``pre_input`` as the float32 ``[T, pre_vdim]`` array the shards expect, after
        checking that the table takes one (UltraMemV2 with pre-values) and its shape."""
        if t.pre_vdim == 0:
            if pre_input is not None:
                raise InvalidRequestError(
                    f"pre_input: table {t.table_id!r} has no pre-values (not an UltraMemV2 "
                    "table); send the lookup without pre_input"
                )
            return None
        if pre_input is None:
            raise InvalidRequestError(
                f"pre_input: table {t.table_id!r} is an UltraMemV2 table with pre-values; the "
                f"lookup must carry pre_input float32 [T, {t.pre_vdim}]"
            )
        if isinstance(pre_input, torch.Tensor) and pre_input.dtype != torch.float32:
            pre_input = pre_input.float()
        pre = host_array(pre_input)
        if pre.shape != (num_tokens, t.pre_vdim):
            raise InvalidRequestError(
                f"pre_input: shape {list(pre.shape)}; expected [{num_tokens}, {t.pre_vdim}] "
                "(one row of pre_vdim per query token)"
            )
        return np.ascontiguousarray(pre, dtype=np.float32)

    def _request(
        self,
        table_id: str,
        indices: np.ndarray,
        blocks: np.ndarray,
        weights: np.ndarray,
        offsets: np.ndarray | None,
        n_rows: int,
        pre_input: np.ndarray | None = None,
    ) -> pb.StreamGatherRequest:
        msg = pb.StreamGatherRequest()
        req = msg.gather
        req.table_id = table_id
        req.table_version = self.version
        encode_array(_narrow(indices, _ids_dtype(n_rows)), req.indices)
        encode_array(_narrow(blocks, np.int32), req.blocks)
        encode_array(weights.astype(np.float32, copy=False), req.weights)
        if offsets is not None:
            encode_array(_narrow(offsets, _ids_dtype(int(offsets[-1]))), req.offsets)
        if pre_input is not None:
            encode_array(pre_input, req.pre_input)
        return msg

    def _time_left(self, shard: int, deadline: float) -> float:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise ShardUnavailableError(
                f"{self._where(shard)}: deadline passed before the call was sent"
            )
        return timeout

    async def _call(
        self,
        shard: int,
        t: TableLayout,
        msg: pb.StreamGatherRequest,
        num_tokens: int,
        deadline: float,
    ) -> np.ndarray:
        timeout = self._time_left(shard, deadline)
        if self._streams is not None:
            try:
                streamed = await self._streams[shard].gather(msg, timeout)
            except TimeoutError:
                raise self.status_error(
                    shard, t, grpc.StatusCode.DEADLINE_EXCEEDED, "no reply on the gather stream"
                ) from None
            except StreamBroken as exc:  # re-sent unary below, within the same deadline
                log.debug("%s: gather stream broke (%s); re-sending unary", self._where(shard), exc)
                timeout = self._time_left(shard, deadline)
            else:
                if streamed is not None:
                    if streamed.code:
                        code = code_for_number(streamed.code)
                        raise self.status_error(shard, t, code, streamed.message)
                    return self.check_reply(shard, t, streamed.gather, num_tokens)
        try:
            reply = await self._stubs[shard].Gather(msg.gather, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self.rpc_error(shard, t, exc) from None
        return self.check_reply(shard, t, reply, num_tokens)

    def _where(self, shard: int) -> str:
        return f"shard {shard} ({','.join(self.replicas[shard])})"

    def rpc_error(self, shard: int, t: TableLayout, exc: grpc.RpcError) -> UltraMemError:
        """The typed error for a failed Gather call to ``shard``, naming it and the status."""
        return self.status_error(shard, t, exc.code(), exc.details())

    def status_error(
        self, shard: int, t: TableLayout, code: grpc.StatusCode, details: str | None
    ) -> UltraMemError:
        """The typed error for a gather of ``shard`` that ended with ``code`` (unary or
        streamed), naming the shard and the status."""
        where = self._where(shard)
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            msg = (
                f"{where} could not answer table {t.table_id!r} within the "
                f"{self.deadline_s:g}s deadline: {code.name}: {details}"
            )
        else:
            msg = f"{where} refused table {t.table_id!r}: {code.name}: {details}"
        return error_for(code, msg)

    def check_reply(
        self, shard: int, t: TableLayout, reply: pb.GatherReply, num_tokens: int
    ) -> np.ndarray:
        """The pooled values of ``shard``'s reply (a read-only view of its bytes), after
        checking version, identity and shape."""
        if reply.table_version != self.version:
            raise VersionMismatchError(
                f"{self._where(shard)} answered with table version {reply.table_version!r}, "
                f"requested {self.version!r}"
            )
        if reply.shard_index != shard or reply.table_id != t.table_id:
            raise RemoteError(
                f"{self._where(shard)} answered as shard {reply.shard_index} "
                f"for table {reply.table_id!r}"
            )
        want = t.out_shape(num_tokens, shard)
        try:
            pooled = decode_array(
                reply.pooled,
                name="pooled",
                dtypes=(torch.float32,),
                max_elements=max(1, num_tokens * t.expansion * t.out_width),
                ndims=(len(want),),
            )
        except InvalidRequestError as exc:
            raise RemoteError(f"{self._where(shard)} sent a malformed reply: {exc}") from None
        if pooled.shape != want:
            raise RemoteError(
                f"{self._where(shard)} sent shape {list(pooled.shape)}, expected {list(want)}"
            )
        return pooled

    async def gather(
        self,
        table_id: str,
        indices: torch.Tensor,
        blocks: torch.Tensor,
        weights: torch.Tensor,
        *,
        pre_input: torch.Tensor | np.ndarray | None = None,
        timeout_s: float | None = None,
    ) -> torch.Tensor:
        """Pooled values of a batch: ``[T, E, Dv]`` (merged table: ``[T, D]``), float32.

        Args:
            indices: ``[T, L]`` global physical row ids (``L = H * m``).
            blocks: ``[T, L]`` IVE block ids.
            weights: ``[T, L, h_c]`` per-core weights.
            pre_input: ``[T, pre_vdim]`` per-token pre-value input, required for (and only
                for) an UltraMemV2 table with pre-values (``TableLayout.pre_vdim > 0``).
            timeout_s: deadline for the whole fan-out (default: the client's ``deadline_s``).
        """
        budget = self.deadline_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        t, calls = self.prepare(table_id, indices, blocks, weights, pre_input)
        for _, msg in calls:  # the shard skips work it dequeues after this (streams only)
            msg.timeout_us = max(1, int(budget * 1e6))
        num_tokens = indices.shape[0]
        results = await self._fan_out(t, calls, num_tokens, deadline)
        return self.combine(t, results, num_tokens)

    def prepare(
        self,
        table_id: str,
        indices: torch.Tensor,
        blocks: torch.Tensor,
        weights: torch.Tensor,
        pre_input: torch.Tensor | np.ndarray | None = None,
    ) -> tuple[TableLayout, list[tuple[int, pb.StreamGatherRequest]]]:
        """Check a batch and build the per-shard requests: ``(table, [(shard, request)])``.
        Row tables: only shards owning some entry get a request; dim tables: every shard (one
        message). Each message carries this call's request id; the unary form is ``.gather``.
        ``pre_input`` (UltraMemV2) goes whole into every request: a row shard's CSR request
        still has one row per token, and a dim shard holds every row's pre-values."""
        t = self.table(table_id)
        ids, blk, w = host_array(indices), host_array(blocks), host_array(weights)
        self._check_inputs(t, ids, blk, w)
        pre = self._pre_array(t, pre_input, ids.shape[0])
        calls: list[tuple[int, pb.StreamGatherRequest]] = []
        if t.sharding == "row" and len(t.rows) > 1:
            parts = split_for_wire(
                ids.reshape(-1),
                blk.reshape(-1),
                w.reshape(-1, w.shape[-1]),
                dense_offsets(*ids.shape),
                [lo for lo, _ in t.rows],
            )
            for k, part in enumerate(parts):
                if part is not None:  # a shard owning no entry contributes exactly zero
                    calls.append((k, self._request(table_id, *part, t.n_rows, pre)))
        else:  # the whole batch to every shard, dense (no offsets)
            req = self._request(table_id, ids, blk, w, None, t.n_rows, pre)
            calls = [(k, req) for k in range(self.layout.num_shards)]
        request_id = next(self._request_ids)
        for _, msg in calls:
            msg.request_id = request_id
        return t, calls

    @staticmethod
    def combine(t: TableLayout, results: list[np.ndarray], num_tokens: int) -> torch.Tensor:
        """The full answer from every called shard's part (row: sum, dim: concatenation)."""
        if t.sharding == "row":
            return sum_partials(results, t.out_shape(num_tokens))
        return concat_columns(results)

    async def _fan_out(
        self,
        t: TableLayout,
        calls: list[tuple[int, pb.StreamGatherRequest]],
        num_tokens: int,
        deadline: float,
    ) -> list[np.ndarray]:
        if not calls:
            return []
        if len(calls) == 1:
            k, req = calls[0]
            return [await self._call(k, t, req, num_tokens, deadline)]
        tasks = [
            asyncio.ensure_future(self._call(k, t, req, num_tokens, deadline)) for k, req in calls
        ]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        for task in pending:
            task.cancel()
        # every finished task's exception is retrieved (no "never retrieved" noise from GC)
        failures = [t.exception() for t in tasks if t.done() and not t.cancelled()]
        first = next((e for e in failures if e is not None), None)
        if first is not None:  # first failure in shard order; never a partial result
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            raise first
        return [task.result() for task in tasks]
