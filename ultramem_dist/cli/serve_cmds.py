"""``ultramem-dist serve-shard | lookup | info``: run a shard server and talk to one."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ultramem_dist.cli.app import app, console, fail
from ultramem_dist.cli.options import (
    SERVER_HEALTH_PORT_OPT,
    SERVER_TLS_CERT_OPT,
    SERVER_TLS_CLIENT_CA_OPT,
    SERVER_TLS_KEY_OPT,
    SERVER_TOKEN_OPT,
)

if TYPE_CHECKING:
    from ultramem_dist.serving import ServerConfig


@app.command("serve-shard")
def serve_shard_cmd(
    store: Path = typer.Argument(..., help="Store root directory."),
    shard: int = typer.Option(..., "--shard", min=0, help="Shard index K to serve."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind."),
    port: int = typer.Option(0, "--port", min=0, max=65535, help="Port (0 = any free port)."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="Prometheus port."),
    version: str | None = typer.Option(None, "--version", help="Store version (default LATEST)."),
    grace: float = typer.Option(5.0, "--grace", min=0, help="Shutdown grace period (seconds)."),
    drain: float = typer.Option(0.0, "--drain", min=0, help="NOT_SERVING drain before stop (s)."),
    max_batch: int = typer.Option(4096, "--max-batch", min=1, help="Max queries per request."),
    max_per_query: int = typer.Option(1024, "--max-per-query", min=1, help="Max entries/query."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Kernel torch threads."),
    kernel_workers: int = typer.Option(
        0, "--kernel-workers", min=0, help="Kernel threads off the event loop (0 = inline)."
    ),
    ready_file: Path | None = typer.Option(
        None,
        "--ready-file",
        help="Write {port, pid, ...} JSON here once serving (--respawn: + supervisor_pid).",
    ),
    max_message_bytes: int = typer.Option(
        64 << 20, "--max-message-bytes", min=1, help="Largest request/reply gRPC accepts (bytes)."
    ),
    max_concurrent_streams: int | None = typer.Option(
        None, "--max-concurrent-streams", min=1, help="Concurrent calls per client connection."
    ),
    tls_cert: Path | None = SERVER_TLS_CERT_OPT,
    tls_key: Path | None = SERVER_TLS_KEY_OPT,
    tls_client_ca: Path | None = SERVER_TLS_CLIENT_CA_OPT,
    auth_token_file: Path | None = SERVER_TOKEN_OPT,
    health_port: int | None = SERVER_HEALTH_PORT_OPT,
    verify: str = typer.Option(
        "cached",
        "--verify",
        help="Store check on load: always (sha256 every file), cached (re-hash only files this "
        "node/user has not verified unchanged; record outside the store), never (sizes only).",
    ),
    respawn: bool = typer.Option(
        False,
        "--respawn",
        help="Pre-forked, self-supervising server: verify the shard once here, serve from a "
        "forked worker and re-fork it at once if it crashes (Linux; see docs/reliability.md).",
    ),
    respawn_max_failures: int = typer.Option(
        5,
        "--respawn-max-failures",
        min=1,
        help="With --respawn: give up (exit 1) after this many early worker deaths in a row.",
    ),
    respawn_min_uptime: float = typer.Option(
        1.0,
        "--respawn-min-uptime",
        min=0,
        help="With --respawn: a worker dying sooner after it began serving died early "
        "(backoff before the next fork); later deaths are re-forked at once.",
    ),
    respawn_backoff: float = typer.Option(
        0.5,
        "--respawn-backoff",
        min=0,
        help="With --respawn: first backoff (s) after an early death; doubles per further one.",
    ),
) -> None:
    """Serve shard K of STORE over gRPC until SIGTERM (then drain gracefully)."""
    from ultramem_dist.errors import StoreError
    from ultramem_dist.serving import ServerConfig, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = ServerConfig(
            store=store,
            shard=shard,
            version=version,
            host=host,
            port=port,
            max_batch=max_batch,
            max_per_query=max_per_query,
            grace_s=grace,
            drain_s=drain,
            torch_threads=threads,
            kernel_workers=kernel_workers,
            metrics_port=metrics_port,
            max_message_bytes=max_message_bytes,
            max_concurrent_streams=max_concurrent_streams,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            auth_token_file=auth_token_file,
            health_port=health_port,
            verify=verify,
        )
        if respawn:
            status = _serve_supervised(
                cfg, ready_file, respawn_max_failures, respawn_min_uptime, respawn_backoff
            )
        else:
            asyncio.run(serve(cfg, ready_file))
    except StoreError as exc:
        fail(f"refusing to serve: {exc}", 2)
    except ValueError as exc:  # bad TLS files, token file or option combination
        fail(f"refusing to serve: {exc}", 2)
    except OSError as exc:
        fail(f"cannot start the shard server: {exc}", 1)
    if respawn:
        from ultramem_dist.serving.supervisor import exit_with_status

        if status < 0:  # the worker died of the signal the supervisor forwarded: do the same
            exit_with_status(status)
        raise typer.Exit(status)


def _serve_supervised(
    cfg: ServerConfig, ready_file: Path | None, max_failures: int, min_uptime: float, backoff: float
) -> int:
    """``serve-shard --respawn``: the supervisor's exit status (see serving/supervisor.py)."""
    from ultramem_dist.serving.supervisor import CrashLoopError, RespawnPolicy, ShardSupervisor

    policy = RespawnPolicy(
        max_fast_failures=max_failures, min_uptime_s=min_uptime, backoff_s=backoff
    )
    try:
        return ShardSupervisor(cfg, ready_file, policy).run()
    except CrashLoopError as exc:
        fail(str(exc), 1)


def _client_error(exc: Exception) -> str:
    return str(exc).rstrip(".") + "."


def read_client_token(path: Path) -> str:
    """The bearer token of a client token file: the first word of its first non-comment line
    (a one-line server token file works as is)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the auth token file {path}: {exc}") from None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            return words[0]
    raise ValueError(f"the auth token file {path} holds no token")


def client_channel_options(
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_server_name: str | None = None,
    auth_token_file: Path | None = None,
    **extra: object,
):  # -> ChannelOptions (imported lazily to keep the CLI start fast)
    """ChannelOptions from the client-side security flags shared by several commands."""
    from ultramem_dist.client import ChannelOptions

    token = read_client_token(auth_token_file) if auth_token_file is not None else None
    return ChannelOptions(
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_server_name=tls_server_name,
        auth_token=token,
        **extra,  # type: ignore[arg-type]
    )


TLS_CA_OPT = typer.Option(None, "--tls-ca", help="PEM CA that signed the shard certificates.")
TLS_CERT_OPT = typer.Option(None, "--tls-cert", help="PEM client certificate (mutual TLS).")
TLS_KEY_OPT = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert.")
TLS_NAME_OPT = typer.Option(
    None, "--tls-server-name", help="Name the shard certificates carry (default: target host)."
)
TOKEN_OPT = typer.Option(None, "--auth-token-file", help="File holding the bearer token.")


@app.command("lookup")
def lookup_cmd(
    target: str = typer.Option(..., "--target", help="HOST:PORT[,HOST:PORT...] of the shards."),
    table: str = typer.Option(..., "--table", help="Table id, e.g. mem0."),
    random: int = typer.Option(4, "--random", min=1, help="Number of random queries (T)."),
    version: str | None = typer.Option(None, "--version", help="Expected table version."),
    timeout: float = typer.Option(5.0, "--timeout", min=0.001, help="Deadline (seconds)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random queries."),
    tls_ca: Path | None = TLS_CA_OPT,
    tls_cert: Path | None = TLS_CERT_OPT,
    tls_key: Path | None = TLS_KEY_OPT,
    tls_server_name: str | None = TLS_NAME_OPT,
    auth_token_file: Path | None = TOKEN_OPT,
) -> None:
    """Run a real Gather with random valid queries and print a summary of the result."""
    import torch

    from ultramem_dist.client import GatherClient
    from ultramem_dist.errors import UltraMemError

    try:
        options = client_channel_options(
            tls_ca, tls_cert, tls_key, tls_server_name, auth_token_file
        )
    except ValueError as exc:
        fail(str(exc), 2)

    async def run() -> dict:
        client = await GatherClient.connect(
            target,
            version=version,
            deadline_s=timeout,
            connect_timeout_s=timeout,
            options=options,
        )
        async with client:
            t = client.table(table)
            g = torch.Generator().manual_seed(seed)
            per = t.heads * t.topm
            idx = torch.randint(0, t.n_rows, (random, per), generator=g)
            blk = torch.randint(0, t.expansion, (random, per), generator=g)
            w = torch.randn(random, per, t.num_cores, generator=g)
            # UltraMemV2 tables with pre-values: a random pre_input too (drawn last, so the
            # queries of v1 tables are what they always were)
            pre = torch.randn(random, t.pre_vdim, generator=g) if t.pre_vdim else None
            start = time.perf_counter()
            out = await client.gather(table, idx, blk, w, pre_input=pre)
            ms = (time.perf_counter() - start) * 1e3
            v2 = {"pre_vdim": t.pre_vdim} if t.pre_vdim else {}
            return {
                "table": table,
                "version": client.version,
                "shards": client.layout.num_shards,
                "sharding": t.sharding,
                "merged": t.merged,
                **v2,
                "shape": list(out.shape),
                "dtype": str(out.dtype).removeprefix("torch."),
                "abs_mean": float(out.abs().mean()),
                "abs_max": float(out.abs().max()),
                "finite": bool(torch.isfinite(out).all()),
                "latency_ms": round(ms, 3),
            }

    try:
        summary = asyncio.run(run())
    except (UltraMemError, ValueError) as exc:
        fail(f"lookup failed: {_client_error(exc)}", 1)
    print(json.dumps(summary))


@app.command("info")
def info_cmd(
    target: str = typer.Option(..., "--target", help="HOST:PORT[,HOST:PORT...] of the shards."),
    timeout: float = typer.Option(5.0, "--timeout", min=0.001, help="Deadline (seconds)."),
    tls_ca: Path | None = TLS_CA_OPT,
    tls_cert: Path | None = TLS_CERT_OPT,
    tls_key: Path | None = TLS_KEY_OPT,
    tls_server_name: str | None = TLS_NAME_OPT,
    auth_token_file: Path | None = TOKEN_OPT,
) -> None:
    """Print every target's Info (shard index, version, layout, limits) as JSON lines."""
    from google.protobuf.json_format import MessageToDict

    from ultramem_dist.client import fetch_info
    from ultramem_dist.client.channels import split_targets
    from ultramem_dist.errors import UltraMemError

    try:
        options = client_channel_options(
            tls_ca, tls_cert, tls_key, tls_server_name, auth_token_file
        )
    except ValueError as exc:
        fail(str(exc), 2)

    async def run() -> list[dict]:
        out = []
        for t in split_targets(target):
            reply = await fetch_info(t, timeout_s=timeout, options=options)
            out.append({"target": t, **MessageToDict(reply, preserving_proto_field_name=True)})
        return out

    try:
        infos = asyncio.run(run())
    except (UltraMemError, ValueError) as exc:
        fail(f"info failed: {_client_error(exc)}", 1)
    for info in infos:
        print(json.dumps(info))
    console.print(f"{len(infos)} endpoint(s) answered")
