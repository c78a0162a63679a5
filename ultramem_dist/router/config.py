"""Configuration of one router process."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ultramem_dist.client.channels import ChannelOptions, split_targets

__all__ = ["RouterConfig"]

_MIB = 1 << 20


@dataclass
class RouterConfig:
    """Everything :func:`~ultramem_dist.router.app.build_router` needs (only ``targets`` has no
    default)."""

    targets: list[str] = field(default_factory=list)
    """Shard replica endpoints ``HOST:PORT`` (any order; each reports which shard it is).
    A comma-separated string is accepted too."""
    version: str | None = None
    """Table version to route; ``None`` = the only version the targets serve."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 0
    """TCP port; 0 picks a free one (returned by ``build_router``)."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (``None`` = off)."""
    deadline_s: float = 5.0
    """Deadline of the fan-out when the caller sets none (a caller's deadline always wins)."""
    connect_timeout_s: float = 10.0
    """How long start-up waits for the shards' ``Info``."""
    max_message_bytes: int = 64 * _MIB
    """gRPC receive/send limit of the router's own port (and of its channels to the shards,
    capped by what the shards report)."""
    grace_s: float = 5.0
    """On SIGTERM: seconds in-flight calls get to finish after the router stops accepting."""
    drain_s: float = 0.0
    """On SIGTERM: seconds to keep serving after health flips to NOT_SERVING (LB drain)."""
    keepalive_time_ms: int = 30_000
    """Server-initiated HTTP/2 keepalive ping interval."""
    keepalive_timeout_ms: int = 10_000
    """Close a connection whose keepalive ping is not answered within this time."""
    tls_cert: Path | None = None
    """PEM certificate chain of the router's port; with ``tls_key`` the port speaks TLS only."""
    tls_key: Path | None = None
    """PEM private key matching ``tls_cert``."""
    tls_client_ca: Path | None = None
    """Require callers to present a certificate signed by this CA (mutual TLS)."""
    auth_token_file: Path | None = None
    """Accepted bearer tokens of callers (format: :mod:`ultramem_dist.serving.security`)."""
    shard_options: ChannelOptions | None = None
    """Channel settings towards the shards (TLS, the router's own token, retries)."""

    def __post_init__(self) -> None:
        self.targets = split_targets(self.targets)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.deadline_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("deadline_s and connect_timeout_s must be > 0")
        if self.max_message_bytes < 1:
            raise ValueError("max_message_bytes must be >= 1")
        if self.grace_s < 0 or self.drain_s < 0:
            raise ValueError("grace_s and drain_s must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")

    def channel_options(self) -> ChannelOptions:
        """Options of the router's channels to the shards."""
        opts = self.shard_options or ChannelOptions()
        if opts.max_message_bytes > self.max_message_bytes:
            opts = replace(opts, max_message_bytes=self.max_message_bytes)
        return opts

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel arguments of the router's server."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ]
