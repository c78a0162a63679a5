"""``ultramem-dist serve-router``: one GatherPool endpoint in front of a sharded table version."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import typer

from ultramem_dist.cli.app import app, fail
from ultramem_dist.cli.serve_cmds import client_channel_options


@app.command("serve-router")
def serve_router_cmd(
    targets: str = typer.Option(
        ..., "--targets", help="HOST:PORT,... of the shard replicas (any order)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind."),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Port (0 = any free port)."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="Prometheus port."),
    version: str | None = typer.Option(
        None, "--version", help="Table version to route (default: the only one served)."
    ),
    deadline: float = typer.Option(
        5.0, "--deadline", min=0.001, help="Fan-out deadline when a caller sets none (s)."
    ),
    connect_timeout: float = typer.Option(
        10.0, "--connect-timeout", min=0.001, help="Wait this long for the shards' Info (s)."
    ),
    grace: float = typer.Option(5.0, "--grace", min=0, help="Shutdown grace period (seconds)."),
    drain: float = typer.Option(0.0, "--drain", min=0, help="NOT_SERVING drain before stop (s)."),
    max_message_bytes: int = typer.Option(
        64 << 20, "--max-message-bytes", min=1, help="gRPC message size limit."
    ),
    ready_file: Path | None = typer.Option(
        None, "--ready-file", help="Write {port, pid, version} JSON here once serving."
    ),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate (TLS on)."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    tls_client_ca: Path | None = typer.Option(
        None, "--tls-client-ca", help="Require client certificates signed by this CA (mTLS)."
    ),
    auth_token_file: Path | None = typer.Option(
        None, "--auth-token-file", help="Bearer tokens callers must present (one per line)."
    ),
    shard_tls_ca: Path | None = typer.Option(
        None, "--shard-tls-ca", help="PEM CA that signed the shard certificates."
    ),
    shard_tls_cert: Path | None = typer.Option(
        None, "--shard-tls-cert", help="PEM client certificate towards the shards (mTLS)."
    ),
    shard_tls_key: Path | None = typer.Option(
        None, "--shard-tls-key", help="PEM private key of --shard-tls-cert."
    ),
    shard_tls_server_name: str | None = typer.Option(
        None, "--shard-tls-server-name", help="Name the shard certificates carry."
    ),
    shard_auth_token_file: Path | None = typer.Option(
        None, "--shard-auth-token-file", help="File holding the router's token for the shards."
    ),
) -> None:
    """Serve a whole table version as ONE GatherPool endpoint that fans out to the shards."""
    from ultramem_dist.errors import UltraMemError
    from ultramem_dist.router import RouterConfig, serve_router

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        shard_options = client_channel_options(
            shard_tls_ca,
            shard_tls_cert,
            shard_tls_key,
            shard_tls_server_name,
            shard_auth_token_file,
            max_message_bytes=max_message_bytes,
        )
        cfg = RouterConfig(
            targets=targets,  # type: ignore[arg-type]  (split by RouterConfig)
            version=version,
            host=host,
            port=port,
            metrics_port=metrics_port,
            deadline_s=deadline,
            connect_timeout_s=connect_timeout,
            max_message_bytes=max_message_bytes,
            grace_s=grace,
            drain_s=drain,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            auth_token_file=auth_token_file,
            shard_options=shard_options,
        )
    except ValueError as exc:
        fail(str(exc), 2)
    try:
        asyncio.run(serve_router(cfg, ready_file))
    except UltraMemError as exc:
        fail(f"cannot route: {exc}", 1)
    except (OSError, ValueError) as exc:
        fail(f"cannot start the router: {exc}", 1)
