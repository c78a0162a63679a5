"""Build and run one shard's ``grpc.aio`` server (GatherPool + health + reflection)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ultramem_dist._private.readyfile import write_ready_file
from ultramem_dist.kernels import native
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving.config import ServerConfig
from ultramem_dist.serving.metrics import ShardMetrics
from ultramem_dist.serving.security import (
    BearerTokenInterceptor,
    TokenPolicy,
    add_hardened_gather_pool,
    server_credentials,
)
from ultramem_dist.serving.servicer import GatherPoolServicer
from ultramem_dist.serving.validate import Limits
from ultramem_dist.store.reader import ShardSlice, load_shard

__all__ = ["SERVICE_NAME", "ShardServer", "build_server", "serve"]

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GatherPool"].full_name


class DrainingHealthServicer(health_aio.HealthServicer):
    """``grpc.health.v1`` whose Watch streams end when :meth:`end_watches` is called.

    Clients with health checking keep a Watch stream open per replica; a graceful stop would
    otherwise wait the whole grace period for those never-ending calls. The stop sequence ends
    them after the drain, once every watcher has seen NOT_SERVING.
    """

    def __init__(self) -> None:
        super().__init__()
        self._ending: asyncio.Event | None = None

    def _ending_event(self) -> asyncio.Event:
        if self._ending is None:
            self._ending = asyncio.Event()
        return self._ending

    async def Watch(self, request, context) -> None:  # type: ignore[no-untyped-def]  # noqa: N802
        watch = asyncio.ensure_future(super().Watch(request, context))
        ending = asyncio.ensure_future(self._ending_event().wait())
        try:
            await asyncio.wait({watch, ending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, ending):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def end_watches(self) -> None:
        """End every Watch stream (the RPCs complete with OK)."""
        self._ending_event().set()


class ShardServer:
    """A started-or-not shard server: the ``grpc.aio.Server`` plus its health and servicer."""

    def __init__(
        self,
        server: grpc.aio.Server,
        servicer: GatherPoolServicer,
        health: health_aio.HealthServicer,
        cfg: ServerConfig,
        health_server: grpc.aio.Server | None = None,
    ) -> None:
        self.grpc_server = server
        self.servicer = servicer
        self.health = health
        self.cfg = cfg
        self.health_server = health_server
        """Plaintext health-only server (``cfg.health_port``), or ``None``."""
        self.health_port: int | None = None

    async def start(self) -> None:
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, optional drain, stop accepting, finish in-flight."""
        await self.health.enter_graceful_shutdown()  # every service -> NOT_SERVING
        if self.cfg.drain_s:
            await asyncio.sleep(self.cfg.drain_s)
        if isinstance(self.health, DrainingHealthServicer):
            self.health.end_watches()  # health watchers must not hold the stop for `grace`
        self.servicer.end_streams()  # nor gather streams (their callers re-send elsewhere)
        await self.grpc_server.stop(self.cfg.grace_s if grace is None else grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        self.servicer.close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def shard_to_device(shard: ShardSlice, device: str) -> ShardSlice:
    """Copy every table of ``shard`` to ``device`` (no-op on CPU, where they stay mmap'd and
    torch is never imported)."""
    if device == "cpu":
        return shard
    import torch  # a GPU shard's tables are torch tensors

    if torch.device(device).type == "cpu":
        return shard
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    tables = {
        tid: dataclasses.replace(t, device_values=t.values.to(device))
        for tid, t in shard.tables.items()
    }
    return dataclasses.replace(shard, tables=tables)


class _MethodSymbolPool:
    """The default descriptor pool, plus method symbols: ``FindFileContainingSymbol`` of
    ``pkg.Service.Method`` answers the service's file. The upb pool only knows messages,
    enums, services and fields, so ``grpcurl describe ultramem.v1.GatherPool.Gather`` got
    "Symbol not found" from the stock reflection servicer."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # noqa: N802 (protobuf's API name)
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                raise KeyError(f"Couldn't find symbol {symbol}") from None
            if method not in service.methods_by_name:
                raise
            return service.file


def register_and_bind(
    server: grpc.aio.Server, servicer: object, health: object, cfg: object
) -> int:
    """Add GatherPool (undecodable bytes -> INVALID_ARGUMENT), health and reflection to
    ``server`` and bind ``cfg.host:cfg.port`` (TLS when ``cfg.tls_cert``/``tls_key`` are set).
    Shared by the shard server and the router; returns the bound port."""
    add_hardened_gather_pool(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
        pool=_MethodSymbolPool(descriptor_pool.Default()),
    )
    address = f"{cfg.host}:{cfg.port}"
    try:
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc reports a failed bind (port in use) as RuntimeError
        raise OSError(f"could not bind {address} (in use?): {exc}") from None
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port


def build_server(cfg: ServerConfig, shard: ShardSlice | None = None) -> tuple[ShardServer, int]:
    """Load (verify + mmap) the shard and bind a server to ``cfg.host:cfg.port``.

    Call from the event loop that will run it; ``await server.start()`` to serve. Returns the
    server and the bound port (useful with ``port=0``). Raises a ``StoreError`` subclass if the
    shard's files are missing, corrupt or inconsistent (nothing is served then).
    """
    if cfg.torch_threads:  # the native kernel's threads (and torch's, once it is loaded)
        native.set_kernel_threads(cfg.torch_threads)
    if shard is None:
        shard = load_shard(cfg.store, cfg.shard, cfg.version, verify=cfg.verify)
    shard = shard_to_device(shard, cfg.device)
    lib = native.library()  # build / load the native CPU kernel now, not on the first request
    if cfg.torch_threads and (lib is None or cfg.device != "cpu"):
        import torch  # the torch path serves here: it gets the same thread count

        torch.set_num_threads(cfg.torch_threads)
    metrics = ShardMetrics()
    servicer = GatherPoolServicer(
        shard,
        Limits(cfg.max_batch, cfg.max_per_query),
        max_message_bytes=cfg.max_message_bytes,
        kernel_workers=cfg.kernel_workers,
        metrics=metrics,
    )
    interceptors = []
    if cfg.auth_token_file is not None:
        interceptors.append(BearerTokenInterceptor(TokenPolicy.from_file(cfg.auth_token_file)))
    server = grpc.aio.server(options=cfg.grpc_options(), interceptors=interceptors)
    health = DrainingHealthServicer()
    port = register_and_bind(server, servicer, health, cfg)
    health_server = health_port = None
    if cfg.health_port is not None:
        health_server = grpc.aio.server(options=cfg.grpc_options())
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        try:
            health_port = health_server.add_insecure_port(f"{cfg.host}:{cfg.health_port}")
        except RuntimeError:  # in use
            health_port = 0
        if health_port == 0:
            raise OSError(f"could not bind the health port {cfg.host}:{cfg.health_port}")
    if cfg.metrics_port is not None:
        metrics.serve(cfg.metrics_port, cfg.host)
    shard_server = ShardServer(server, servicer, health, cfg, health_server)
    shard_server.health_port = health_port
    return shard_server, port


async def serve(
    cfg: ServerConfig, ready_file: Path | None = None, *, shard: ShardSlice | None = None
) -> None:
    """Run a shard server until SIGTERM/SIGINT, then shut down gracefully.

    If ``ready_file`` is given, ``{"port", "pid", "shard", "version"}`` is written to it
    (atomically) once the server accepts calls. ``shard``: an already verified and mapped slice
    of ``cfg``'s store (the ``--respawn`` supervisor's), instead of loading it here.
    """
    server, port = build_server(cfg, shard)
    await server.start()
    manifest = server.servicer.shard.manifest
    log.info("shard %d of %s serving on %s:%d", cfg.shard, manifest.version, cfg.host, port)
    if ready_file is not None:
        write_ready_file(
            ready_file,
            {
                "port": port,
                "pid": os.getpid(),
                "shard": cfg.shard,
                "version": manifest.version,
                "health_port": server.health_port,
                "tls": cfg.tls_cert is not None,
            },
        )
    await serve_until_signal(server, f"shard {cfg.shard}", cfg.grace_s)


class _Stoppable(Protocol):
    async def wait_for_termination(self) -> Any: ...
    async def stop(self) -> Any: ...


async def serve_until_signal(server: _Stoppable, name: str, grace_s: float) -> None:
    """Serve until the server ends or SIGTERM/SIGINT arrives; on a signal, ``server.stop()``
    (its graceful drain). Shared by the shard server and the router."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("%s: signal received, draining (grace %.1fs)", name, grace_s)
        await server.stop()
    waiter.cancel()
    stopper.cancel()
