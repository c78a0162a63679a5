"""Standard grpc.health.v1 checks of shard endpoints."""

from __future__ import annotations

import dataclasses

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ultramem_dist.client.channels import ChannelOptions, is_loopback_target, make_sync_channel


def check_health(
    endpoint: str,
    service: str = "",
    timeout_s: float = 2.0,
    options: ChannelOptions | None = None,
) -> str:
    """``SERVING`` / ``NOT_SERVING`` / ``UNREACHABLE`` for one endpoint.

    ``options`` carries the TLS / mutual-TLS settings of a secured shard (``tls_ca``,
    ``tls_cert``/``tls_key``, ``tls_server_name``); without them the check speaks plaintext, so a
    TLS-only port reads ``UNREACHABLE``. Health needs no bearer token on the server side, but a
    token in ``options`` is sent like on every other channel. Raises ``ValueError`` when the
    options cannot be used (unreadable PEM file, token over plaintext to a remote address).
    """
    if options is None:
        options = ChannelOptions()
    # One plain call: no retry policy or client-side health checking on this channel.
    options = dataclasses.replace(options, max_attempts=1, health_check=False)
    try:
        is_loopback_target(endpoint)  # a malformed or unresolvable endpoint is unreachable
    except ValueError:
        return "UNREACHABLE"
    try:
        with make_sync_channel([endpoint], options) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except grpc.RpcError:
        return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
