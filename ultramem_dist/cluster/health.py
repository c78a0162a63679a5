"""Standard grpc.health.v1 checks of shard endpoints."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check_health(endpoint: str, service: str = "", timeout_s: float = 2.0) -> str:
    """``SERVING`` / ``NOT_SERVING`` / ``UNREACHABLE`` for one endpoint."""
    try:
        with grpc.insecure_channel(endpoint) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except grpc.RpcError:
        return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
