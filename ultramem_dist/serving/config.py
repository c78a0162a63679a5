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
        if self.kernel_workers < 0:
            raise ValueError("kernel_workers must be >= 0")

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
        ]
