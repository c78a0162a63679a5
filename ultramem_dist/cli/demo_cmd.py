"""``demo``: the README's first command, end to end on an embedded local Ray.

train (or reuse) a tiny UltraMem model → export its value tables (2 shards) → ``up`` 2 shards ×
2 replicas as Ray actors with their own gRPC servers → greedy generation with the remote tables
(lookups overlapped with the blocks in between) → compare with the local model token for token →
``status`` → tear everything down.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import typer

from ultramem_dist.cli.app import app, console, fail

DEMO_PROMPT = "def __init__(self"


def _step(n: int, total: int, text: str) -> None:
    console.rule(f"[bold cyan]{n}/{total}[/] {text}", align="left")


def ensure_model(workdir: Path, steps: int) -> Path:
    """Reuse ``workdir/model`` when it holds a finished run of ``steps``; else (re)train it."""
    from ultramem_dist.model import preset
    from ultramem_dist.train import TrainConfig, train

    ckpt = workdir / "model"
    cfg_file = ckpt / "config.json"
    if cfg_file.is_file():
        info = json.loads(cfg_file.read_text())
        if info.get("step") == steps and info.get("model", {}).get("kind") == "ultramem":
            console.print(f"reusing the trained model in {ckpt} ({steps} steps)")
            return ckpt
    console.print(
        f"training a tiny UltraMem model for {steps} steps on the Python stdlib sources "
        "(a few minutes on 2 cores; resumes if interrupted)"
    )
    tcfg = TrainConfig(steps=steps, batch_size=8, seq_len=128, eval_every=max(1, steps // 4))
    train(preset("tiny", "ultramem"), tcfg, ckpt, resume=True)
    return ckpt


@app.command()
def demo(
    workdir: Path = typer.Option(Path("artifacts"), help="Where the model and store are kept."),
    steps: int = typer.Option(400, help="Training steps for the tiny model."),
    shards: int = typer.Option(2, help="Value shards."),
    replicas: int = typer.Option(2, help="Replicas per shard."),
    max_new_tokens: int = typer.Option(96, help="Tokens to generate."),
) -> None:
    """Train/reuse a tiny UltraMem model, serve its tables on Ray, generate remotely."""
    import ray
    import torch

    from ultramem_dist.cli.cluster_cmds import status_table
    from ultramem_dist.cluster import ClusterValueStore, Deployer, PlacementOptions
    from ultramem_dist.model import load_pretrained
    from ultramem_dist.store.export import export_checkpoint
    from ultramem_dist.train import ByteTokenizer

    if min(steps, shards, replicas, max_new_tokens) < 1:
        fail("--steps, --shards, --replicas and --max-new-tokens must be >= 1")
    total = 6
    _step(1, total, "model")
    ckpt = ensure_model(workdir, steps)

    _step(2, total, f"export the value tables ({shards} shards)")
    store = workdir / "store"
    shutil.rmtree(store, ignore_errors=True)
    manifest = export_checkpoint(ckpt, store, shards=shards, by="auto")
    for t in manifest.tables:
        console.print(
            f"  {t.table_id}: {t.n_rows} rows × {t.dv} (E={t.expansion}, h_c={t.num_cores}), "
            f"{t.sharding}-sharded"
        )

    _step(3, total, f"up: {shards} shards × {replicas} replicas on an embedded local Ray")
    t0 = time.perf_counter()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        namespace="ultramem",
    )
    deployer = Deployer(PlacementOptions(drain_s=1.0), progress=lambda m: console.print(m))
    try:
        deployer.up(store, replicas=replicas)
        console.print(f"  ready in {time.perf_counter() - t0:.1f}s")

        _step(4, total, "generate with remote tables vs the local model")
        tok = ByteTokenizer()
        prompt = torch.tensor([tok.encode(DEMO_PROMPT)])
        local_model = load_pretrained(ckpt)
        t0 = time.perf_counter()
        local = local_model.generate(prompt, max_new_tokens)
        t_local = time.perf_counter() - t0
        remote_model = load_pretrained(ckpt)
        remote_model.drop_value_tables()
        with ClusterValueStore() as backend:
            remote_model.set_value_backend(backend)
            t0 = time.perf_counter()
            remote = remote_model.generate(prompt, max_new_tokens)
            t_remote = time.perf_counter() - t0
        typer.echo("\n" + tok.decode(remote[0].tolist()) + "\n")
        console.print(
            f"  local {1000 * t_local / max_new_tokens:.1f} ms/token, remote "
            f"{1000 * t_remote / max_new_tokens:.1f} ms/token"
        )
        same = torch.equal(local, remote)
        if same:
            console.print(
                f"[bold green]remote generation matches the local model token for token "
                f"({max_new_tokens} tokens)[/]"
            )
        else:
            console.print("[bold red]remote generation differs from the local model[/]")

        _step(5, total, "status")
        first = deployer.status()
        time.sleep(1.0)
        console.print(status_table(first, deployer.status(), 1.0))
    finally:
        _step(6, total, "down")
        stopped = deployer.down()
        ray.shutdown()
        console.print(f"  stopped {stopped} deployment(s) and the embedded Ray")
    if not same:
        raise typer.Exit(1)
