"""gRPC channels to shard replicas: round-robin + retry on UNAVAILABLE via the service config.

All replicas of one shard share ONE channel whose target lists every replica address
(``ipv4:a:p1,b:p2``); the ``round_robin`` load-balancing policy spreads calls over the READY
replicas and skips failed ones, and the ``retryPolicy`` transparently re-sends a call that got
UNAVAILABLE (replica died mid-call) to another replica, within the call's deadline. No
hand-written retry loops. Host names are resolved once, when the channel is created.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

__all__ = ["ChannelOptions", "make_channel", "parse_target", "replica_target", "split_targets"]

SERVICE = "ultramem.v1.GatherPool"


@dataclass(frozen=True)
class ChannelOptions:
    """Client channel settings."""

    max_message_bytes: int = 64 << 20
    """Receive/send limit; must cover the largest reply (T * E * Dv * 4 bytes)."""
    max_attempts: int = 4
    """Attempts per call (1 = no retry) on UNAVAILABLE, bounded by the deadline."""
    initial_backoff_s: float = 0.005
    max_backoff_s: float = 0.1
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    retry_buffer_bytes: int = 64 << 20
    """Requests up to this size stay replayable (gRPC's default, 256 KiB, is too small)."""

    def service_config(self) -> str:
        return json.dumps(
            {
                "loadBalancingConfig": [{"round_robin": {}}],
                "methodConfig": [
                    {
                        "name": [{"service": SERVICE}],
                        "retryPolicy": {
                            "maxAttempts": max(2, self.max_attempts),
                            "initialBackoff": f"{self.initial_backoff_s}s",
                            "maxBackoff": f"{self.max_backoff_s}s",
                            "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"],
                        },
                    }
                ],
            }
        )

    def grpc_options(self) -> list[tuple[str, object]]:
        opts: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.enable_retries", 1 if self.max_attempts > 1 else 0),
            ("grpc.per_rpc_retry_buffer_size", self.retry_buffer_bytes),
            ("grpc.retry_buffer_size", self.retry_buffer_bytes * 4),
            # One connection per channel even if another channel targets the same address.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self.max_attempts > 1:
            opts.append(("grpc.service_config", self.service_config()))
        else:
            opts.append(("grpc.lb_policy_name", "round_robin"))
        return opts


def split_targets(spec: str | Sequence[str]) -> list[str]:
    """``"h1:p1,h2:p2"`` (or a list of such strings) -> ``["h1:p1", "h2:p2"]``."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not out:
        raise ValueError("no target given; expected HOST:PORT[,HOST:PORT...]")
    return out


def parse_target(target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad target {target!r}; expected HOST:PORT")
    return host.strip("[]"), int(port)


def _resolve(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve host {host!r}: {exc}") from None
    addrs = [ipaddress.ip_address(i[4][0]) for i in infos]
    v4 = [a for a in addrs if a.version == 4]
    return (v4 or addrs)[0]


def replica_target(replicas: Sequence[str]) -> str:
    """One gRPC target naming every replica, e.g. ``ipv4:127.0.0.1:5001,127.0.0.1:5002``."""
    resolved = [(_resolve(h), p) for h, p in map(parse_target, replicas)]
    families = {a.version for a, _ in resolved}
    if len(families) != 1:
        raise ValueError(f"replicas {list(replicas)} mix IPv4 and IPv6 addresses")
    if families == {4}:
        return "ipv4:" + ",".join(f"{a}:{p}" for a, p in resolved)
    return "ipv6:" + ",".join(f"[{a}]:{p}" for a, p in resolved)


def make_channel(replicas: Sequence[str], options: ChannelOptions) -> grpc.aio.Channel:
    """An insecure ``grpc.aio`` channel load-balancing over ``replicas``."""
    return grpc.aio.insecure_channel(replica_target(replicas), options=options.grpc_options())
