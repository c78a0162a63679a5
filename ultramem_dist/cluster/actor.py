"""A Ray actor per shard replica: it memory-maps its slice and runs its *own* grpc.aio server.

Clients talk to the server directly (no Ray Serve proxy hop); Ray only places, restarts and
tracks the actors. On (re)start the actor asks the registry for the endpoint it had before and
binds the same port when it can, so clients' channels reconnect to a restarted replica without
any reconfiguration; otherwise it registers its new endpoint and clients refresh.

TLS, mutual TLS and bearer tokens are ServerConfig fields like any other (``ShardSpec.server``:
``tls_cert``, ``tls_key``, ``tls_client_ca``, ``auth_token_file``, ``health_port``). The files are
read on the node that hosts the replica, so they must exist there (e.g. a Secret mounted into
every Ray worker pod); a missing one fails the replica's start with a message naming the file.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from ultramem_dist.cluster.registry import get_registry


@dataclass
class ShardSpec:
    """What one replica serves and how it binds."""

    deployment_id: str
    store: str
    version: str
    shard: int
    replica: int
    host: str = "127.0.0.1"
    """Interface to bind and advertise; ``"node"`` means this Ray node's IP address."""
    port: int = 0
    """Fixed gRPC port (one replica per node, e.g. one per Kubernetes pod); 0 = a free port."""
    torch_threads: int = 1
    """Kernel threads per replica (keep replicas from oversubscribing a node's cores)."""
    server: dict[str, Any] = field(default_factory=dict)
    """Extra :class:`~ultramem_dist.serving.config.ServerConfig` fields (limits, grace, TLS
    files, token file, ...)."""
    placement: dict[str, Any] = field(default_factory=dict)
    """The deployment's :class:`~ultramem_dist.cluster.deploy.PlacementOptions` (as a dict), kept
    so that ``scale`` and ``roll`` can start further replicas the same way."""


SERVER_FILES = {
    "tls_cert": "TLS certificate",
    "tls_key": "TLS private key",
    "tls_client_ca": "TLS client CA",
    "auth_token_file": "auth token file",
}
"""ServerConfig fields that name files the shard server reads on its node."""


def node_server_fields(server: dict[str, Any], where: str) -> dict[str, Any]:
    """``server`` with its file fields as :class:`~pathlib.Path`; raises ``ValueError`` naming
    the field and ``where`` if one of the files is not on this node."""
    out = dict(server)
    for key, what in SERVER_FILES.items():
        value = out.get(key)
        if value is None:
            continue
        path = Path(value)
        if not path.is_file():
            raise ValueError(
                f"{where}: the {what} {path} ({key}) does not exist on this node; every Ray node "
                "that hosts shard replicas needs it at the same path"
            )
        out[key] = path
    return out


async def _start_server(cfg: Any) -> tuple[Any, int]:
    """Build and start the shard server on the actor's server loop (not an actor method: an
    ``async def`` method would turn the whole actor into an asyncio actor)."""
    from ultramem_dist.serving.app import build_server

    server, port = build_server(cfg)
    await server.start()
    return server, port


@ray.remote
class ShardActor:
    """One replica of one shard. Construct through :mod:`ultramem_dist.cluster.deploy`."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from ultramem_dist.serving.config import ServerConfig

        self.spec = ShardSpec(**spec)
        host = ray.util.get_node_ip_address() if self.spec.host == "node" else self.spec.host
        gpu_ids = ray.get_gpu_ids()
        self.device = "cpu"
        if gpu_ids:
            import torch

            if torch.cuda.is_available():
                self.device = "cuda"
        registry = get_registry()
        previous = ray.get(
            registry.previous_endpoint.remote(
                self.spec.deployment_id, self.spec.shard, self.spec.replica
            )
        )
        if self.spec.port:
            ports = [self.spec.port]  # fixed: probes and Services point at it
        else:
            ports = [int(previous.rsplit(":", 1)[1])] if previous else []
            ports.append(0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="shard-grpc"
        )
        where = f"shard {self.spec.shard} replica {self.spec.replica} on node {host}"
        server = node_server_fields(self.spec.server, where)
        self._thread.start()
        last_error: Exception | None = None
        for port in ports:
            cfg = ServerConfig(
                store=Path(self.spec.store),
                shard=self.spec.shard,
                version=self.spec.version,
                host=host,
                port=port,
                torch_threads=self.spec.torch_threads,
                device=self.device,
                **server,
            )
            try:
                self._server, self._port = asyncio.run_coroutine_threadsafe(
                    _start_server(cfg), self._loop
                ).result()
                break
            except OSError as exc:  # previous port taken: take a fresh one
                last_error = exc
        else:
            raise RuntimeError(f"shard {self.spec.shard} could not bind: {last_error}")
        self.endpoint = f"{host}:{self._port}"
        self.restarts = ray.get(
            registry.register.remote(
                self.spec.deployment_id,
                self.spec.shard,
                self.spec.replica,
                self.endpoint,
                os.getpid(),
                ray.get_runtime_context().get_node_id(),
                self.device,
            )
        )

    def info(self) -> dict[str, Any]:
        """Endpoint, pid, device and counters of this replica.

        From the server's metrics: ``requests`` and ``errors`` (Gather calls, cumulative) and
        the successful Gather latency histogram (``latency_count``, ``latency_sum_s``,
        ``latency_buckets`` as ``[[upper_bound_s, cumulative_count], ...]``) plus its median
        ``latency_p50_ms`` since start; two snapshots give the rates over a window.
        """
        servicer = self._server.servicer
        metrics = getattr(servicer, "metrics", None)
        requests = errors = 0.0
        latency: dict[str, Any] = {}
        if metrics is not None:
            from ultramem_dist.serving.metrics import histogram_quantile

            latency = metrics.snapshot("Gather")
            requests, errors = latency.pop("requests"), latency.pop("errors")
            p50 = histogram_quantile(latency["latency_buckets"], 0.5)
            latency["latency_p50_ms"] = None if p50 is None else p50 * 1e3
        return {
            **asdict(self.spec),
            "endpoint": self.endpoint,
            "pid": os.getpid(),
            "device": self.device,
            "restarts": self.restarts,
            "requests": requests,
            "errors": errors,
            **latency,
        }

    def stop(self, grace_s: float = 2.0) -> None:
        """Graceful stop: health NOT_SERVING, finish in-flight calls, close the port."""
        asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
