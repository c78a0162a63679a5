"""``ultramem-dist loadtest | chaos | fuzz``: bounded reliability tools (loopback by default).

Every command stops by itself (duration / case caps) and exits 0 only when the run met its
contract: no failed call, no wrong or partial answer, no undefined status, no dead server.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from enum import StrEnum
from pathlib import Path

import typer

from ultramem_dist.cli.app import app, console, fail
from ultramem_dist.cli.serve_cmds import (
    TLS_CA_OPT,
    TLS_CERT_OPT,
    TLS_KEY_OPT,
    TLS_NAME_OPT,
    TOKEN_OPT,
    client_channel_options,
)

ALLOW_REMOTE_HELP = (
    "Allow non-loopback targets. Only ever point these tools at machines you own: they send "
    "sustained or hostile traffic."
)


def _write(out: Path | None, payload: dict) -> None:
    text = json.dumps(payload, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


@app.command("loadtest")
def loadtest_cmd(
    target: str | None = typer.Option(
        None, "--target", help="HOST:PORT[,HOST:PORT...] of every shard replica."
    ),
    concurrency: int = typer.Option(32, "--concurrency", min=1, max=4096, help="Callers."),
    duration: float = typer.Option(60.0, "--duration", min=0.1, max=3600, help="Seconds."),
    table: str | None = typer.Option(None, "--table", help="Table id (default: first)."),
    batch: int = typer.Option(8, "--batch", min=1, help="Queries per Gather call."),
    store: Path | None = typer.Option(
        None, "--store", help="Store root of the served version (verifies every answer)."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="Only count errors."),
    max_requests: int | None = typer.Option(None, "--max-requests", min=1, help="Call cap."),
    deadline: float = typer.Option(5.0, "--deadline", min=0.001, help="Per-call deadline (s)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the query batches."),
    spawn: int | None = typer.Option(
        None,
        "--spawn",
        min=1,
        max=16,
        help="Instead of --target: export a seeded synthetic store with this many shards and "
        "serve it with local serve-shard processes for the run.",
    ),
    replicas: int = typer.Option(2, "--replicas", min=1, max=8, help="With --spawn."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help=ALLOW_REMOTE_HELP),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the JSON here."),
    tls_ca: Path | None = TLS_CA_OPT,
    tls_cert: Path | None = TLS_CERT_OPT,
    tls_key: Path | None = TLS_KEY_OPT,
    tls_server_name: str | None = TLS_NAME_OPT,
    auth_token_file: Path | None = TOKEN_OPT,
) -> None:
    """Bounded load with every answer verified against the store; prints p50/p95/p99, QPS and
    errors by status. Exit 1 if any call failed or any answer was wrong or partial."""
    from ultramem_dist.reliability.loadtest import LoadTestConfig, run_loadtest

    if (target is None) == (spawn is None):
        fail("give exactly one of --target HOST:PORT[,...] and --spawn SHARDS", 2)
    if spawn is not None and any((tls_ca, tls_cert, tls_key, tls_server_name, auth_token_file)):
        fail("--spawn serves plaintext without tokens; drop the --tls-*/--auth-token-file flags", 2)
    try:
        options = client_channel_options(
            tls_ca, tls_cert, tls_key, tls_server_name, auth_token_file
        )
    except ValueError as exc:
        fail(str(exc), 2)

    def run(targets: list[str], store_root: Path | None) -> dict:
        cfg = LoadTestConfig(
            targets=targets,
            concurrency=concurrency,
            duration_s=duration,
            table=table,
            batch=batch,
            store=store_root,
            verify=not no_verify,
            max_requests=max_requests,
            deadline_s=deadline,
            seed=seed,
            allow_remote=allow_remote,
            options=options,
        )
        res = asyncio.run(run_loadtest(cfg))
        return {**res.to_json(), "passed": res.passed}

    try:
        if spawn is not None:
            from ultramem_dist.reliability.procs import ShardFleet
            from ultramem_dist.reliability.synthetic import make_synthetic_store

            with tempfile.TemporaryDirectory(prefix="ultramem-loadtest-") as tmp:
                root = make_synthetic_store(Path(tmp) / "store", shards=spawn, seed=seed)
                console.print(f"starting {spawn} shard(s) x {replicas} replica(s) on loopback")
                with ShardFleet(root, Path(tmp) / "run", shards=spawn, replicas=replicas) as fl:
                    summary = run(fl.targets(), root)
        else:
            assert target is not None
            summary = run([target], store)
    except ValueError as exc:
        fail(str(exc), 2)
    except Exception as exc:  # connection failures etc.: one clear line
        fail(f"loadtest failed: {exc}", 1)
    _write(json_out, summary)
    if not summary["passed"]:
        raise typer.Exit(1)


class Fault(StrEnum):
    kill = "kill"
    term = "term"
    kill_worker = "kill-worker"
    both = "both"
    all = "all"


_FAULT_RUNS = {
    Fault.both: ["kill", "term"],
    Fault.all: ["kill", "term", "kill-worker"],
}


@app.command("chaos")
def chaos_cmd(
    store: Path | None = typer.Argument(
        None, help="Store root to serve (default: a seeded synthetic store)."
    ),
    fault: Fault = typer.Option(
        Fault.both,
        "--fault",
        help="kill (-9), term (drain), kill-worker (-9 of a supervised replica's serving worker: "
        "re-forked by serve-shard --respawn), both (kill + term) or all three.",
    ),
    shards: int = typer.Option(2, "--shards", min=1, max=8, help="Synthetic store shards."),
    replicas: int = typer.Option(2, "--replicas", min=2, max=8, help="Replicas per shard."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, max=256, help="Callers."),
    table: str | None = typer.Option(None, "--table", help="Table id (default: first)."),
    fault_at: float = typer.Option(2.0, "--fault-at", min=0.1, help="Seconds of load first."),
    no_restart: bool = typer.Option(False, "--no-restart", help="Leave the victim down."),
    respawn: bool = typer.Option(
        False,
        "--respawn",
        help="Run every replica as serve-shard --respawn (then kill/term hit the supervisor, "
        "i.e. the whole replica; kill-worker always does this).",
    ),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the JSON here."),
) -> None:
    """Kill (-9) and/or SIGTERM a shard replica (R >= 2) of local serve-shard processes, or
    kill -9 the serving worker of a supervised one, under verified load; report errors,
    wrong/partial answers and failover/recovery times."""
    from ultramem_dist.reliability.chaos import WORKER_FAULTS, ChaosConfig, run_chaos
    from ultramem_dist.reliability.synthetic import make_synthetic_store

    faults = _FAULT_RUNS.get(fault, [fault.value])
    if no_restart and WORKER_FAULTS.intersection(faults):
        fail("--no-restart does not apply to kill-worker (the replica's supervisor re-forks it)", 2)
    results = []
    with tempfile.TemporaryDirectory(prefix="ultramem-chaos-") as tmp:
        root = store or make_synthetic_store(Path(tmp) / "store", shards=shards)
        from ultramem_dist.store import open_manifest

        num_shards = open_manifest(root)[1].num_shards
        for f in faults:
            cfg = ChaosConfig(
                store=root,
                workdir=Path(tmp) / f"run-{f}",
                fault=f,
                shards=num_shards,
                replicas=replicas,
                concurrency=concurrency,
                table=table,
                fault_at_s=fault_at,
                restart=not no_restart,
                respawn=respawn,
            )
            kind = " supervised" if cfg.supervised else ""
            console.print(f"scenario: {f} shard 0 replica 0 ({num_shards}x{replicas}{kind})")
            results.append(asyncio.run(run_chaos(cfg)).to_json())
    summary = _chaos_summary(results)
    _write(json_out, summary)
    if not summary["passed"]:
        raise typer.Exit(1)


def _chaos_summary(results: list[dict]) -> dict:
    recov = [r["recovery_s"] for r in results if r["recovery_s"] is not None]
    total = {k: sum(r[k] for r in results) for k in ("requests", "errors", "wrong", "partial")}
    return {
        **total,
        "recovery_s": max(recov) if recov else None,
        "passed": total["errors"] == 0 and total["wrong"] == 0 and total["partial"] == 0,
        "scenarios": results,
    }


@app.command("fuzz")
def fuzz_cmd(
    target: str = typer.Option(..., "--target", help="HOST:PORT of one shard server."),
    cases: int = typer.Option(2000, "--cases", min=1, max=1_000_000, help="Requests to send."),
    seed: int = typer.Option(0, "--seed", help="Seed of the case stream."),
    table: str | None = typer.Option(None, "--table", help="Table id (default: first)."),
    time_budget: float = typer.Option(120.0, "--time-budget", min=1, help="Stop after (s)."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help=ALLOW_REMOTE_HELP),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the JSON here."),
) -> None:
    """Send hostile Gather requests (random bytes, truncated/bit-flipped messages, huge shapes,
    bad dtypes/ids, NaN/inf, oversize) to a plaintext server; check every status is defined
    and the server still answers. Exit 1 otherwise."""
    from ultramem_dist.client import fetch_info
    from ultramem_dist.reliability.fuzz import case_stream, fuzz_endpoint, valid_request
    from ultramem_dist.reliability.loadtest import check_targets
    from ultramem_dist.serving.validate import Limits

    try:
        (addr,) = check_targets(target, allow_remote)
        info = asyncio.run(fetch_info(addr, timeout_s=10))
    except ValueError as exc:
        fail(str(exc), 2)
    except Exception as exc:
        fail(f"cannot reach {target}: {exc}", 1)
    t = next((x for x in info.tables if x.table_id == table), None) if table else info.tables[0]
    if t is None:
        fail(f"table {table!r} is not served by {target}", 2)
    base = valid_request(
        t.table_id, info.table_version, t.row_hi, t.expansion, t.num_cores, row_lo=t.row_lo
    )
    limits = Limits(info.max_batch, info.max_per_query)
    stream = case_stream(base, limits, seed=seed, oversize_bytes=int(info.max_message_bytes))
    stats = fuzz_endpoint(addr, stream, cases, time_budget_s=time_budget)
    try:
        after = asyncio.run(fetch_info(addr, timeout_s=10))
        alive = after.table_version == info.table_version
    except Exception:
        alive = False
    summary = {**stats.to_json(), "server_alive": alive}
    summary["passed"] = alive and stats.undefined_count == 0
    _write(json_out, summary)
    if not summary["passed"]:
        raise typer.Exit(1)
