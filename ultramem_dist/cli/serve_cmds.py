"""``ultramem-dist serve-shard | lookup | info``: run a shard server and talk to one."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import typer

from ultramem_dist.cli.app import app, console, fail


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
        None, "--ready-file", help="Write {port, pid} JSON here once serving."
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
        )
        asyncio.run(serve(cfg, ready_file))
    except StoreError as exc:
        fail(f"refusing to serve: {exc}", 2)
    except OSError as exc:
        fail(f"cannot start the shard server: {exc}", 1)


def _client_error(exc: Exception) -> str:
    return str(exc).rstrip(".") + "."


@app.command("lookup")
def lookup_cmd(
    target: str = typer.Option(..., "--target", help="HOST:PORT[,HOST:PORT...] of the shards."),
    table: str = typer.Option(..., "--table", help="Table id, e.g. mem0."),
    random: int = typer.Option(4, "--random", min=1, help="Number of random queries (T)."),
    version: str | None = typer.Option(None, "--version", help="Expected table version."),
    timeout: float = typer.Option(5.0, "--timeout", min=0.001, help="Deadline (seconds)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random queries."),
) -> None:
    """Run a real Gather with random valid queries and print a summary of the result."""
    import torch

    from ultramem_dist.client import GatherClient
    from ultramem_dist.errors import UltraMemError

    async def run() -> dict:
        client = await GatherClient.connect(
            target, version=version, deadline_s=timeout, connect_timeout_s=timeout
        )
        async with client:
            t = client.table(table)
            g = torch.Generator().manual_seed(seed)
            per = t.heads * t.topm
            idx = torch.randint(0, t.n_rows, (random, per), generator=g)
            blk = torch.randint(0, t.expansion, (random, per), generator=g)
            w = torch.randn(random, per, t.num_cores, generator=g)
            start = time.perf_counter()
            out = await client.gather(table, idx, blk, w)
            ms = (time.perf_counter() - start) * 1e3
            return {
                "table": table,
                "version": client.version,
                "shards": client.layout.num_shards,
                "sharding": t.sharding,
                "merged": t.merged,
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
) -> None:
    """Print every target's Info (shard index, version, layout, limits) as JSON lines."""
    from google.protobuf.json_format import MessageToDict

    from ultramem_dist.client import fetch_info
    from ultramem_dist.client.channels import split_targets
    from ultramem_dist.errors import UltraMemError

    async def run() -> list[dict]:
        out = []
        for t in split_targets(target):
            reply = await fetch_info(t, timeout_s=timeout)
            out.append({"target": t, **MessageToDict(reply, preserving_proto_field_name=True)})
        return out

    try:
        infos = asyncio.run(run())
    except (UltraMemError, ValueError) as exc:
        fail(f"info failed: {_client_error(exc)}", 1)
    for info in infos:
        print(json.dumps(info))
    console.print(f"{len(infos)} endpoint(s) answered")
