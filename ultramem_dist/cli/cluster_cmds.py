"""``up``, ``status``, ``scale``, ``roll``, ``down``: value shards as Ray actors.

Security: ``up`` takes the server-side flags of ``serve-shard`` (``--tls-cert``/``--tls-key``,
``--tls-client-ca`` for mutual TLS, ``--auth-token-file``, ``--health-port``) and hands them to
every replica; the files are read on the Ray nodes hosting the replicas. The deployment keeps
them: ``scale`` and ``roll`` start their replicas with the active deployment's settings (the
same flags there replace individual ones, e.g. a renewed certificate) and Ray restarts killed
replicas with theirs. ``status`` takes the client-side flags of ``lookup`` for its health column.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from ultramem_dist.cli.app import app, console, fail
from ultramem_dist.cli.choices import Layout
from ultramem_dist.cli.options import (
    SERVER_HEALTH_PORT_OPT,
    SERVER_TLS_CERT_OPT,
    SERVER_TLS_CLIENT_CA_OPT,
    SERVER_TLS_KEY_OPT,
    SERVER_TOKEN_OPT,
    server_security_fields,
)
from ultramem_dist.cli.serve_cmds import (
    TLS_CA_OPT,
    TLS_CERT_OPT,
    TLS_KEY_OPT,
    TLS_NAME_OPT,
    TOKEN_OPT,
    client_channel_options,
)

ADDRESS_HELP = "Ray cluster: ray://host:port, host:port or auto. Default: the local cluster."


def _connect(address: str | None, start: bool = False) -> None:
    from ultramem_dist.cluster.local import connect

    try:
        connect(address, start_if_missing=start)
    except (ConnectionError, RuntimeError) as exc:
        fail(str(exc), code=1)


def _deployer(host: str = "127.0.0.1", **kw: object):  # noqa: ANN202
    from ultramem_dist.cluster import Deployer, PlacementOptions

    return Deployer(PlacementOptions(host=host, **kw), progress=lambda m: console.print(m))


def _server_fields(
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    auth_token_file: Path | None,
    health_port: int | None,
) -> dict[str, Any]:
    try:
        return server_security_fields(
            tls_cert, tls_key, tls_client_ca, auth_token_file, health_port
        )
    except ValueError as exc:
        fail(str(exc))


def _check_health_port(server: dict[str, Any], port: int) -> None:
    if server.get("health_port") is not None and not port:
        fail(
            "--health-port needs fixed ports (--port, one replica per node): replicas sharing a "
            "node would collide on it"
        )


def check_store(store: Path, version: str | None) -> None:
    """Exit 2 with a sentence unless ``store`` is a store directory holding ``version`` (default:
    the one LATEST names). Path checks only: answers before Ray or torch is imported."""
    if not store.is_dir():
        fail(f"store directory {store} does not exist (create it with `ultramem-dist export`)")
    held = sorted(p.parent.name for p in store.glob("*/manifest.json"))
    latest = store / "LATEST"
    if not held and not latest.is_file():
        fail(
            f"{store} is not a value store (no LATEST and no version directory with a "
            f"manifest.json); write one with `ultramem-dist export CHECKPOINT --out {store}`"
        )
    if version is None:
        if not latest.is_file():
            fail(
                f"store {store} has no LATEST pointer; pass --version (it holds: {', '.join(held)})"
            )
        version = latest.read_text().strip()
    if version not in held:
        fail(
            f"store {store} has no version {version!r} (it holds: {', '.join(held) or 'none'}; "
            "export one with `ultramem-dist export CHECKPOINT --out STORE --version V`)"
        )


def _adopt(deployer: Any, server: dict[str, Any]) -> None:
    """Start new replicas like the active deployment's, with ``server`` fields replaced."""
    placement = deployer.adopt_placement(server=server)
    _check_health_port(placement.server, placement.port)


@app.command()
def up(
    store: Path = typer.Argument(..., help="Store directory written by `ultramem-dist export`."),
    shards: int | None = typer.Option(
        None, min=1, help="Shards (default: the store's own layout)."
    ),
    replicas: int = typer.Option(2, min=1, help="Replicas per shard."),
    version: str | None = typer.Option(None, help="Store version (default: LATEST)."),
    by: Layout = typer.Option(Layout.auto, help="Layout when re-splitting."),
    address: str | None = typer.Option(None, help=ADDRESS_HELP),
    host: str = typer.Option(
        "127.0.0.1", help='Interface shard servers bind; "node" = each Ray node\'s IP.'
    ),
    port: int = typer.Option(
        0,
        min=0,
        max=65535,
        help="Fixed gRPC port of every replica (one replica per node/pod); 0 = free ports.",
    ),
    num_cpus: float = typer.Option(0.0, min=0.0, help="CPUs reserved per replica."),
    num_gpus: float = typer.Option(0.0, min=0.0, help="GPUs per replica (kernel runs on CUDA)."),
    resource: list[str] = typer.Option([], help="Custom resource NAME=AMOUNT (repeatable)."),
    label: list[str] = typer.Option([], help="Node label KEY=VALUE replicas must match."),
    tls_cert: Path | None = SERVER_TLS_CERT_OPT,
    tls_key: Path | None = SERVER_TLS_KEY_OPT,
    tls_client_ca: Path | None = SERVER_TLS_CLIENT_CA_OPT,
    auth_token_file: Path | None = SERVER_TOKEN_OPT,
    health_port: int | None = SERVER_HEALTH_PORT_OPT,
) -> None:
    """Start value-shard replicas as Ray actors (an embedded local Ray if no --address).

    --tls-*/--auth-token-file/--health-port work as for serve-shard; their files are read on
    every Ray node that hosts a replica (same path on each), and scale/roll reuse them."""
    try:
        resources = {k: float(v) for k, v in (r.split("=", 1) for r in resource)}
        labels = dict(lbl.split("=", 1) for lbl in label)
    except ValueError:
        fail("--resource takes NAME=AMOUNT and --label takes KEY=VALUE")
    server = _server_fields(tls_cert, tls_key, tls_client_ca, auth_token_file, health_port)
    _check_health_port(server, port)
    check_store(store, version)
    _connect(address, start=True)
    deployer = _deployer(
        host,
        port=port,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources,
        label_selector=labels,
        server=server,
    )
    from ultramem_dist.cluster.deploy import ReplicaStartError
    from ultramem_dist.errors import UltraMemError

    t0 = time.perf_counter()
    try:
        dep = deployer.up(store, shards=shards, replicas=replicas, version=version, by=by.value)
    except (UltraMemError, ValueError, TimeoutError, ReplicaStartError) as exc:
        fail(str(exc), code=1)
    console.print(f"[green]deployment {dep} is active[/] ({time.perf_counter() - t0:.1f}s)")


@app.command()
def status(
    address: str | None = typer.Option(None, help=ADDRESS_HELP),
    window: float = typer.Option(1.0, min=0.1, help="Seconds over which QPS is measured."),
    as_json: bool = typer.Option(False, "--json", help="Print the registry snapshot as JSON."),
    tls_ca: Path | None = TLS_CA_OPT,
    tls_cert: Path | None = TLS_CERT_OPT,
    tls_key: Path | None = TLS_KEY_OPT,
    tls_server_name: str | None = TLS_NAME_OPT,
    auth_token_file: Path | None = TOKEN_OPT,
) -> None:
    """Shards, replicas, endpoints, health and QPS of every deployment.

    The health column calls grpc.health.v1 on every replica: for TLS deployments pass --tls-ca
    (plus --tls-cert/--tls-key with mutual TLS, --tls-server-name unless the certificate names
    the replicas' addresses)."""
    try:
        options = client_channel_options(
            tls_ca, tls_cert, tls_key, tls_server_name, auth_token_file
        )
    except ValueError as exc:
        fail(str(exc))
    _connect(address)
    deployer = _deployer()
    try:
        first = deployer.status()
    except LookupError as exc:
        fail(str(exc), code=1)
    if as_json:
        import json

        active = first["deployments"].get(first["active"] or "", {})
        first["active_endpoints"] = sorted(
            rec["endpoint"] for reps in active.get("replicas", {}).values() for rec in reps.values()
        )
        typer.echo(json.dumps(first, indent=2, sort_keys=True, default=str))
        return
    time.sleep(window)
    second = deployer.status()
    try:
        table = status_table(first, second, window, options=options)
    except ValueError as exc:  # unreadable PEM file, token towards a plaintext remote, ...
        fail(f"cannot check the replicas' health: {exc}", code=1)
    console.print(table)
    if _serves_tls(second) and not options.secure:
        console.print(
            "the replicas serve TLS: pass --tls-ca (and --tls-cert/--tls-key for mutual TLS) "
            "to check their health"
        )


def _serves_tls(snapshot: dict) -> bool:
    """Whether a live replica in ``snapshot`` was started with a TLS certificate."""
    return any(
        (rec.get("info") or {}).get("server", {}).get("tls_cert")
        for dep in snapshot["deployments"].values()
        for reps in dep["replicas"].values()
        for rec in reps.values()
    )


def status_table(first: dict, second: dict, window: float, options: Any = None):  # noqa: ANN201
    """Two registry snapshots taken ``window`` seconds apart, as rich renderables: one table per
    deployment, headed by its id, table version and state (so that long version ids never
    squeeze the columns: every row fits 80 columns), with QPS and median Gather latency
    (``p50ms``) over the window from each replica's server metrics. ``options``
    (:class:`~ultramem_dist.client.channels.ChannelOptions`) secure the health checks."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from ultramem_dist.cluster.health import check_health

    headers = {"shard": "shd", "replica": "rep", "restarts": "rst", "requests": "reqs"}
    parts: list[Any] = []
    for dep_id, dep in second["deployments"].items():
        marker = " (active)" if dep_id == second["active"] else ""
        parts.append(Text(f"{dep_id}{marker}: version {dep['version']}, {dep['state']}"))
        table = Table(
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            padding=(0, 1, 0, 0),
            show_edge=False,
        )
        for col in (
            "shard",
            "replica",
            "node",
            "endpoint",
            "health",
            "restarts",
            "requests",
            "QPS",
            "p50ms",
        ):
            table.add_column(
                headers.get(col, col),
                no_wrap=True,
                overflow="fold",
                justify="right" if col in ("requests", "QPS", "p50ms") else "left",
            )
        for shard, reps in sorted(dep["replicas"].items()):
            for r, rec in sorted(reps.items()):
                info = rec.get("info", {})
                before = (
                    first["deployments"]
                    .get(dep_id, {})
                    .get("replicas", {})
                    .get(shard, {})
                    .get(r, {})
                    .get("info", {})
                )
                qps = (info.get("requests", 0.0) - before.get("requests", 0.0)) / window
                health = (
                    check_health(rec["endpoint"], options=options) if rec.get("alive") else "DEAD"
                )
                table.add_row(
                    str(shard),
                    str(r),
                    str(rec.get("node", "?")) + ("" if rec.get("node_alive", True) else " (down)"),
                    rec["endpoint"],
                    health,
                    str(info.get("restarts", rec.get("restarts", 0))),
                    f"{info.get('requests', 0):.0f}",
                    f"{qps:.1f}",
                    _window_p50_ms(before, info),
                )
        parts.append(table)
    if not parts:
        parts.append(Text("no deployment"))
    parts.append(
        Text(
            f"reqs: Gather calls since the replica started; QPS, p50ms: over the last "
            f"{window:g} s (- = no call in that window)"
        )
    )
    return Group(*parts)


def _window_p50_ms(before: dict, after: dict) -> str:
    """Median latency (ms) of the Gather calls between two ``ShardActor.info()`` snapshots;
    ``-`` when no call succeeded in between (or the replica restarted: counters went down)."""
    from ultramem_dist.serving.metrics import histogram_quantile

    now = after.get("latency_buckets")
    if not now:
        return "-"
    prev = {le: c for le, c in before.get("latency_buckets") or []}
    delta = [[le, c - prev.get(le, 0.0)] for le, c in now]
    if any(c < 0 for _, c in delta):
        delta = now
    p50 = histogram_quantile(delta, 0.5)
    return "-" if p50 is None else f"{p50 * 1e3:.2f}"


@app.command()
def scale(
    shard: int | None = typer.Option(None, min=0, help="Shard whose replica count changes."),
    replicas: int | None = typer.Option(None, min=1, help="New replica count of --shard."),
    shards: int | None = typer.Option(
        None, min=1, help="Reshard the active deployment to S shards."
    ),
    by: Layout = typer.Option(Layout.auto, help="Layout for --shards."),
    address: str | None = typer.Option(None, help=ADDRESS_HELP),
    tls_cert: Path | None = SERVER_TLS_CERT_OPT,
    tls_key: Path | None = SERVER_TLS_KEY_OPT,
    tls_client_ca: Path | None = SERVER_TLS_CLIENT_CA_OPT,
    auth_token_file: Path | None = SERVER_TOKEN_OPT,
    health_port: int | None = SERVER_HEALTH_PORT_OPT,
) -> None:
    """Scale one shard's replicas, or reshard (new layout up, atomic switch, old drained).

    New replicas are placed like the active deployment's (port, resources, TLS and token files);
    --tls-*/--auth-token-file/--health-port replace those settings for them."""
    if (shards is None) == (shard is None or replicas is None) or (
        shards is not None and (shard is not None or replicas is not None)
    ):
        fail("use either --shard K --replicas R, or --shards S")
    server = _server_fields(tls_cert, tls_key, tls_client_ca, auth_token_file, health_port)
    _connect(address)
    from ultramem_dist.cluster.deploy import ReplicaStartError
    from ultramem_dist.errors import UltraMemError

    deployer = _deployer()
    try:
        _adopt(deployer, server)
        if shards is not None:
            dep = deployer.reshard(shards, by=by.value)
            console.print(f"[green]resharded: {dep} is active[/]")
        else:
            deployer.scale_replicas(shard, replicas)  # type: ignore[arg-type]
            console.print(f"[green]shard {shard} now has {replicas} replicas[/]")
    except ValueError as exc:  # the deployer's argument checks: no such shard, ...
        fail(str(exc), code=2)
    except (UltraMemError, LookupError, TimeoutError, ReplicaStartError) as exc:
        fail(str(exc), code=1)


@app.command()
def roll(
    store: Path = typer.Argument(..., help="Store directory holding the new table version."),
    version: str | None = typer.Option(None, help="Version to roll to (default: LATEST)."),
    address: str | None = typer.Option(None, help=ADDRESS_HELP),
    tls_cert: Path | None = SERVER_TLS_CERT_OPT,
    tls_key: Path | None = SERVER_TLS_KEY_OPT,
    tls_client_ca: Path | None = SERVER_TLS_CLIENT_CA_OPT,
    auth_token_file: Path | None = SERVER_TOKEN_OPT,
    health_port: int | None = SERVER_HEALTH_PORT_OPT,
) -> None:
    """Blue/green roll to another table version: new set up, atomic switch, old one drained.

    The new replicas are placed like the active deployment's (port, resources, TLS and token
    files); --tls-*/--auth-token-file/--health-port replace those settings (e.g. renewed
    certificates)."""
    server = _server_fields(tls_cert, tls_key, tls_client_ca, auth_token_file, health_port)
    check_store(store, version)
    _connect(address)
    from ultramem_dist.cluster.deploy import ReplicaStartError
    from ultramem_dist.errors import UltraMemError

    try:
        deployer = _deployer()
        _adopt(deployer, server)
        dep = deployer.roll(store, version)
    except ValueError as exc:  # the deployer's argument checks: version already active, ...
        fail(str(exc), code=2)
    except (UltraMemError, LookupError, TimeoutError, ReplicaStartError) as exc:
        fail(str(exc), code=1)
    console.print(f"[green]rolled: {dep} is active[/]")


@app.command()
def down(address: str | None = typer.Option(None, help=ADDRESS_HELP)) -> None:
    """Stop every deployment and the registry (and the local Ray cluster `up` started)."""
    from ultramem_dist.cluster.local import local_cluster_started, stop_local_cluster

    if address is None and not local_cluster_started():
        console.print("nothing is running")
        return
    _connect(address)
    n = _deployer().down()
    import ray

    ray.shutdown()
    stopped = stop_local_cluster() if address is None else False
    console.print(f"stopped {n} deployment(s)" + (" and the local Ray cluster" if stopped else ""))
