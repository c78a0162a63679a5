"""Prometheus metrics of a shard server (exported only when ``--metrics-port`` is set)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

__all__ = ["ShardMetrics"]


class ShardMetrics:
    """Request counters and latency histograms, in a private registry per server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ultramem_gather_requests",
            "Gather calls by table and gRPC status code.",
            ["table", "code"],
            registry=self.registry,
        )
        self.entries = Counter(
            "ultramem_gather_entries",
            "Lookup entries (row ids) pooled.",
            ["table"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ultramem_gather_seconds",
            "Server-side Gather latency (decode, validate, kernel, encode).",
            ["table"],
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0),
            registry=self.registry,
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Start the HTTP exporter on ``port`` (a daemon thread); :meth:`close` stops it."""
        self._http = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            server, thread = http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None
