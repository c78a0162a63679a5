"""Typer options shared by several command groups: the server-side security flags.

``serve-shard`` serves one shard with them; ``up`` / ``scale`` / ``roll`` hand them to every
shard replica actor (as :class:`~ultramem_dist.serving.config.ServerConfig` fields). The
client-side flags (``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--tls-server-name``,
``--auth-token-file``) and :func:`~ultramem_dist.cli.serve_cmds.client_channel_options` live in
:mod:`ultramem_dist.cli.serve_cmds`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

__all__ = [
    "SERVER_HEALTH_PORT_OPT",
    "SERVER_TLS_CERT_OPT",
    "SERVER_TLS_CLIENT_CA_OPT",
    "SERVER_TLS_KEY_OPT",
    "SERVER_TOKEN_OPT",
    "server_security_fields",
]

SERVER_TLS_CERT_OPT = typer.Option(None, "--tls-cert", help="PEM certificate (TLS on).")
SERVER_TLS_KEY_OPT = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert.")
SERVER_TLS_CLIENT_CA_OPT = typer.Option(
    None, "--tls-client-ca", help="PEM CA that signs client certificates (mutual TLS)."
)
SERVER_TOKEN_OPT = typer.Option(
    None, "--auth-token-file", help="Bearer tokens ('TOKEN [tables=ID,...]' per line)."
)
SERVER_HEALTH_PORT_OPT = typer.Option(
    None, "--health-port", min=0, max=65535, help="Plaintext grpc.health.v1-only port."
)


def server_security_fields(
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_client_ca: Path | None = None,
    auth_token_file: Path | None = None,
    health_port: int | None = None,
) -> dict[str, Any]:
    """The ServerConfig fields of the flags that were given (``{}`` if none); raises
    ``ValueError`` with a flag-level sentence for inconsistent combinations. Paths are made
    absolute against the current directory (not resolved: symlinked Secret mounts stay
    symlinks), because the servers may run with another working directory."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("--tls-cert and --tls-key must be given together")
    if tls_client_ca is not None and tls_cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    fields: dict[str, Any] = {}
    for name, path in (
        ("tls_cert", tls_cert),
        ("tls_key", tls_key),
        ("tls_client_ca", tls_client_ca),
        ("auth_token_file", auth_token_file),
    ):
        if path is not None:
            fields[name] = str(Path(path).absolute())
    if health_port is not None:
        fields["health_port"] = health_port
    return fields
