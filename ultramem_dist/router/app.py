"""Build and run a router: GatherPool + health + reflection in front of a sharded table version."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from ultramem_dist._private.readyfile import write_ready_file
from ultramem_dist.client import GatherClient, fetch_info
from ultramem_dist.router.config import RouterConfig
from ultramem_dist.router.servicer import RouterServicer
from ultramem_dist.serving.app import SERVICE_NAME, register_and_bind, serve_until_signal
from ultramem_dist.serving.metrics import ShardMetrics
from ultramem_dist.serving.security import (
    BearerTokenInterceptor,
    TokenPolicy,
)

__all__ = ["RouterServer", "build_router", "serve_router"]

log = logging.getLogger(__name__)


class RouterServer:
    """A started-or-not router: its ``grpc.aio.Server``, health servicer and fan-out client."""

    def __init__(
        self,
        server: grpc.aio.Server,
        servicer: RouterServicer,
        health: health_aio.HealthServicer,
        cfg: RouterConfig,
    ) -> None:
        self.grpc_server = server
        self.servicer = servicer
        self.health = health
        self.cfg = cfg

    async def start(self) -> None:
        await self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, optional drain, finish in-flight calls, then close
        the channels to the shards and the metrics endpoint."""
        await self.health.enter_graceful_shutdown()
        if self.cfg.drain_s:
            await asyncio.sleep(self.cfg.drain_s)
        await self.grpc_server.stop(self.cfg.grace_s if grace is None else grace)
        await self.servicer.client.close()
        self.servicer.metrics.close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def build_router(cfg: RouterConfig) -> tuple[RouterServer, int]:
    """Discover the shards' layout (``Info`` on every target), open one channel per shard and
    bind the router's port. ``await server.start()`` to serve. Returns the server and the bound
    port (useful with ``port=0``). Raises ``ShardUnavailableError`` / ``VersionMismatchError``
    if the targets do not make up one complete table version."""
    opts = cfg.channel_options()
    client = await GatherClient.connect(
        cfg.targets,
        version=cfg.version,
        deadline_s=cfg.deadline_s,
        connect_timeout_s=cfg.connect_timeout_s,
        options=opts,
    )
    try:
        first = client.replicas[0][0]
        shard_info = await fetch_info(first, timeout_s=cfg.connect_timeout_s, options=opts)
        metrics = ShardMetrics()
        servicer = RouterServicer(
            client,
            shard_info,
            max_message_bytes=cfg.max_message_bytes,
            default_deadline_s=cfg.deadline_s,
            metrics=metrics,
        )
        interceptors = []
        if cfg.auth_token_file is not None:
            policy = TokenPolicy.from_file(cfg.auth_token_file)
            interceptors.append(BearerTokenInterceptor(policy))
        server = grpc.aio.server(options=cfg.grpc_options(), interceptors=interceptors)
        health = health_aio.HealthServicer()
        port = register_and_bind(server, servicer, health, cfg)
        if cfg.metrics_port is not None:
            metrics.serve(cfg.metrics_port, cfg.host)
    except BaseException:
        await client.close()
        raise
    return RouterServer(server, servicer, health, cfg), port


async def serve_router(cfg: RouterConfig, ready_file: Path | None = None) -> None:
    """Run a router until SIGTERM/SIGINT, then shut down gracefully.

    If ``ready_file`` is given, ``{"port", "pid", "version", "num_shards"}`` is written to it
    (atomically) once the router accepts calls.
    """
    server, port = await build_router(cfg)
    await server.start()
    layout = server.servicer.client.layout
    log.info(
        "router for %s (%d shards) serving on %s:%d",
        layout.version,
        layout.num_shards,
        cfg.host,
        port,
    )
    if ready_file is not None:
        write_ready_file(
            ready_file,
            {
                "port": port,
                "pid": os.getpid(),
                "version": layout.version,
                "num_shards": layout.num_shards,
                "tls": cfg.tls_cert is not None,
            },
        )
    await serve_until_signal(server, "router", cfg.grace_s)
