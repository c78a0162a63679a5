"""Configuration of one shard server process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServerConfig"]

_MIB = 1 << 20


@dataclass
class ServerConfig:
    """Everything :func:`~ultramem_dist.serving.app.build_server` needs (all fields default)."""

    store: Path = field(default_factory=lambda: Path("store"))
    """Store root directory (contains ``LATEST`` and one directory per version)."""
    shard: int = 0
    """Which shard of the store version this server owns."""
    version: str | None = None
    """Store version to serve; ``None`` = the one ``LATEST`` names."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 0
    """TCP port; 0 picks a free one (returned by ``build_server``)."""
    max_batch: int = 4096
    """Largest accepted number of query tokens T per request."""
    max_per_query: int = 1024
    """Largest accepted number of entries L per query token (H*m plus slack)."""
    max_message_bytes: int = 64 * _MIB
    """gRPC receive/send limit (requests above it are refused by gRPC itself)."""
    grace_s: float = 5.0
    """On SIGTERM: seconds in-flight calls get to finish after the server stops accepting."""
    drain_s: float = 0.0
    """On SIGTERM: seconds to keep serving after health flips to NOT_SERVING (LB drain)."""
    keepalive_time_ms: int = 30_000
    """Server-initiated HTTP/2 keepalive ping interval."""
    keepalive_timeout_ms: int = 10_000
    """Close a connection whose keepalive ping is not answered within this time."""
    min_client_ping_interval_ms: int = 5_000
    """Reject client pings more frequent than this (protects against ping floods)."""
    kernel_workers: int = 0
    """Threads that run the kernel off the event loop; 0 (default) runs it inline on the loop,
    which saves a thread hop per call (lowest latency with one call in flight); use >= 1 to
    overlap gRPC I/O with kernels under concurrent load."""
    torch_threads: int | None = None
    """``torch.set_num_threads`` for the kernel; ``None`` leaves torch's default."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (``None`` = off)."""
    device: str = "cpu"
    """Where the shard's tables live and the kernel runs: ``cpu`` or ``cuda[:N]`` (the slice is
    copied to the GPU once at start; replies are copied back)."""
    max_concurrent_streams: int | None = None
    """Per-connection cap on concurrent calls (``grpc.max_concurrent_streams``); ``None`` keeps
    gRPC's default. Calls above the cap wait in the client until a stream frees up."""
    tls_cert: Path | None = None
    """PEM certificate chain of the gRPC port; with ``tls_key`` the port speaks TLS only."""
    tls_key: Path | None = None
    """PEM private key matching ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    auth_token_file: Path | None = None
    """Bearer-token file (:mod:`ultramem_dist.serving.security`); GatherPool calls then need
    ``authorization: Bearer <token>``. Health and reflection stay open."""
    verify: str = "always"
    """How to check the store files on load: ``always`` (sha256 every file), ``cached`` (skip
    files a trusted record outside the store says this node already hashed, unchanged) or
    ``never`` (sizes only); see :mod:`ultramem_dist.store.verify`."""
    health_port: int | None = None
    """Also serve ``grpc.health.v1`` (only) in plaintext on this port, for probes that cannot
    speak TLS (kubelet gRPC probes); ``None`` = off."""

    def __post_init__(self) -> None:
        self.store = Path(self.store)
        if self.shard < 0:
            raise ValueError(f"shard must be >= 0, got {self.shard}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_batch", "max_per_query", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.grace_s < 0 or self.drain_s < 0:
            raise ValueError("grace_s and drain_s must be >= 0")
        if self.verify not in ("always", "cached", "never"):
            raise ValueError(f"verify must be always, cached or never, not {self.verify!r}")
        if self.kernel_workers < 0:
            raise ValueError("kernel_workers must be >= 0")
        if self.max_concurrent_streams is not None and self.max_concurrent_streams < 1:
            raise ValueError("max_concurrent_streams must be >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be in [0, 65535], got {self.health_port}")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel arguments of the server (explicit message limits and keepalive)."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_client_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.so_reuseport", 0),
        ] + (
            [("grpc.max_concurrent_streams", self.max_concurrent_streams)]
            if self.max_concurrent_streams is not None
            else []
        )
