"""gRPC channels to shard replicas: round-robin + retry on UNAVAILABLE via the service config.

All replicas of one shard share ONE channel whose target lists every replica address
(``ipv4:a:p1,b:p2``); the ``round_robin`` load-balancing policy spreads calls over the READY
replicas and skips failed ones, and the ``retryPolicy`` transparently re-sends a call that got
UNAVAILABLE (replica died mid-call) to another replica, within the call's deadline. No
hand-written retry loops. Host names are resolved once, when the channel is created.

Security (see docs/reliability.md): ``tls``/``tls_ca`` make the channel verify the server's
certificate (against ``tls_server_name``, default: the host name of the first replica as given);
``tls_cert``/``tls_key`` add a client certificate (mutual TLS); ``auth_token`` sends
``authorization: Bearer <token>`` with every call (as gRPC call credentials over TLS; over
plaintext only to loopback addresses).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from ultramem_dist._private.pem import read_pem

__all__ = [
    "ChannelOptions",
    "is_loopback_target",
    "make_channel",
    "make_sync_channel",
    "parse_target",
    "replica_target",
    "expand_targets",
    "split_targets",
]

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
    health_check: bool = True
    """Client-side health checking (gRFC A17): round robin sends calls only to replicas whose
    ``grpc.health.v1`` status for the GatherPool service is SERVING, so a draining replica
    (SIGTERM: NOT_SERVING first) gets no new calls before it closes its port. A server without
    the Health service counts as healthy."""
    streaming: bool = True
    """Send gathers over one long-lived ``GatherStream`` per replica (about half the per-call
    cost of unary ``Gather``) to each replica whose ``Info`` advertises ``gather_stream``. A
    call whose stream breaks is re-sent as a unary ``Gather`` (with the retries above) within
    its deadline; servers that do not advertise it (e.g. the router) get unary calls. ``False``:
    unary calls only."""
    max_reconnect_backoff_ms: int | None = 1000
    """Cap of the backoff between reconnect attempts to a failed replica (``None`` = gRPC's
    default, which grows to 120 s). A small cap puts a restarted replica back into rotation
    within about this long after it serves again."""
    tls: bool = False
    """Speak TLS; implied by any ``tls_*`` file. Without ``tls_ca`` the system roots apply."""
    tls_ca: str | Path | None = None
    """PEM CA bundle that signed the servers' certificates."""
    tls_cert: str | Path | None = None
    """PEM client certificate chain (mutual TLS); needs ``tls_key``."""
    tls_key: str | Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_server_name: str | None = None
    """Name the server certificate must carry (default: the first replica's host as given)."""
    auth_token: str | None = field(default=None, repr=False)
    """Bearer token sent with every call (``authorization: Bearer <token>``)."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth_token is empty")

    @property
    def secure(self) -> bool:
        """Whether channels speak TLS."""
        return bool(self.tls or self.tls_ca or self.tls_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials (plus the bearer token as call credentials, if any)."""
        creds = grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.tls_ca, "TLS CA") if self.tls_ca else None,
            private_key=read_pem(self.tls_key, "TLS client key") if self.tls_key else None,
            certificate_chain=read_pem(self.tls_cert, "TLS client certificate")
            if self.tls_cert
            else None,
        )
        if self.auth_token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(self.auth_token.strip())
            )
        return creds

    def service_config(self) -> str:
        config: dict[str, object] = {
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
            ]
            if self.max_attempts > 1
            else [],
        }
        if self.health_check:
            config["healthCheckConfig"] = {"serviceName": SERVICE}
        return json.dumps(config)

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
        if self.max_attempts > 1 or self.health_check:
            opts.append(("grpc.service_config", self.service_config()))
        else:
            opts.append(("grpc.lb_policy_name", "round_robin"))
        if self.max_reconnect_backoff_ms is not None:
            backoff = max(1, self.max_reconnect_backoff_ms)
            opts.append(("grpc.max_reconnect_backoff_ms", backoff))
            opts.append(("grpc.initial_reconnect_backoff_ms", min(backoff, 1000)))
            opts.append(("grpc.min_reconnect_backoff_ms", min(backoff, 1000)))
        return opts


class _BearerToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every unary call (plaintext loopback only)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token.strip()}")

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), self._header)
        return await continuation(client_call_details._replace(metadata=metadata), request)


def split_targets(spec: str | Sequence[str]) -> list[str]:
    """``"h1:p1,h2:p2"`` (or a list of such strings) -> ``["h1:p1", "h2:p2"]``."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not out:
        raise ValueError("no target given; expected HOST:PORT[,HOST:PORT...]")
    return out


def expand_targets(targets: Sequence[str]) -> list[str]:
    """Replace every ``name:port`` whose name resolves to several addresses by one target per
    address (order kept, duplicates dropped). A Kubernetes headless Service that selects every
    shard replica thus becomes the full replica list; ``Info`` then tells which shard each is.
    IP literals and single-address names pass through unchanged."""
    out: list[str] = []
    for target in targets:
        host, port = parse_target(target)
        expanded = [target]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror:
                infos = []  # reported by the connection attempt with the original name
            addrs = list(dict.fromkeys(i[4][0] for i in infos))
            if len(addrs) > 1:
                expanded = [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addrs]
        out.extend(t for t in expanded if t not in out)
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


def is_loopback_target(target: str) -> bool:
    """True if ``host:port`` resolves to a loopback address (127.0.0.0/8 or ::1)."""
    return _resolve(parse_target(target)[0]).is_loopback


def _channel_args(replicas: Sequence[str], options: ChannelOptions) -> tuple[str, list]:
    """Target and options of a channel to ``replicas``; refuses a bearer token in cleartext
    to anything but loopback."""
    target = replica_target(replicas)
    opts = options.grpc_options()
    if options.secure:
        name = options.tls_server_name or parse_target(replicas[0])[0]
        opts.append(("grpc.ssl_target_name_override", name))
    elif options.auth_token and not all(is_loopback_target(r) for r in replicas):
        raise ValueError(
            "refusing to send a bearer token in cleartext to a non-loopback address; "
            "enable TLS (tls_ca / --tls-ca)"
        )
    return target, opts


def make_channel(replicas: Sequence[str], options: ChannelOptions) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel load-balancing over ``replicas`` (TLS if ``options.secure``)."""
    target, opts = _channel_args(replicas, options)
    if options.secure:
        return grpc.aio.secure_channel(target, options.channel_credentials(), options=opts)
    interceptors = [_BearerToken(options.auth_token)] if options.auth_token else None
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


class _SyncBearerToken(grpc.UnaryUnaryClientInterceptor):
    """Sync twin of :class:`_BearerToken` (plaintext loopback only)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token.strip()}")

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        metadata = [*(client_call_details.metadata or ()), self._header]
        return continuation(client_call_details._replace(metadata=metadata), request)


def make_sync_channel(replicas: Sequence[str], options: ChannelOptions) -> grpc.Channel:
    """A blocking ``grpc`` channel with the same target, credentials and bearer token as
    :func:`make_channel` (for synchronous callers such as health checks)."""
    target, opts = _channel_args(replicas, options)
    if options.secure:
        return grpc.secure_channel(target, options.channel_credentials(), options=opts)
    channel = grpc.insecure_channel(target, options=opts)
    if not options.auth_token:
        return channel
    return grpc.intercept_channel(channel, _SyncBearerToken(options.auth_token))
