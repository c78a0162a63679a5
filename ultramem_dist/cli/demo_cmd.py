"""``demo``: the README's first command, end to end on an embedded local Ray.

train (or reuse) a tiny UltraMem model → export its value tables into a scratch store of this
run → ``up`` the shards as Ray actors with their own gRPC servers → greedy generation with the
remote tables (lookups overlapped with the blocks in between) → compare with the local model
token for token → ``status`` → tear everything down.

The demo never deletes data it did not create in that run: the store it serves is a fresh
``WORKDIR/.demo-store-*`` directory removed at the end (``WORKDIR/store``, where the README
exports to, is never touched), and ``WORKDIR/model`` is only reused when it holds the demo's
own finished run, resumed when it holds the demo's interrupted run (a ``.ultramem-demo`` marker)
and otherwise left alone with an error.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import typer

from ultramem_dist.cli.app import app, console, fail

# The tiny byte-level model's greedy continuations fall into repeating " the" or blanks after
# a line on most prompts; this one gets a whole line right and ends it.
SERVING_DTYPE = "bfloat16"  # the serving default of `export`
DEMO_PROMPT = "    def get(self, key"
DEMO_ROUNDS = 3  # timed generations per side (after a warm-up), the median is reported
DEMO_MARKER = ".ultramem-demo"  # written into WORKDIR/model by the demo's own training run


def _step(n: int, total: int, text: str) -> None:
    console.rule(f"[bold cyan]{n}/{total}[/] {text}", align="left")


def ensure_model(workdir: Path, steps: int) -> Path:
    """Reuse ``workdir/model`` when it holds a finished run of ``steps``; else (re)train it."""
    from ultramem_dist.model import preset
    from ultramem_dist.train import TrainConfig, train

    ckpt = workdir / "model"
    cfg_file = ckpt / "config.json"
    if cfg_file.is_file():
        try:
            info = json.loads(cfg_file.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("step") == steps and info.get("model", {}).get("kind") == "ultramem":
            console.print(f"reusing the trained model in {ckpt} ({steps} steps)")
            return ckpt
    if ckpt.exists() and any(ckpt.iterdir()) and not (ckpt / DEMO_MARKER).exists():
        fail(
            f"{ckpt} holds something the demo did not train (not a finished {steps}-step tiny "
            "UltraMem run); the demo leaves it alone: pass another --workdir"
        )
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / DEMO_MARKER).write_text("trained by `ultramem-dist demo`; safe for it to resume\n")
    console.print(
        f"training a tiny UltraMem model for {steps} steps on the Python stdlib sources "
        "(a few minutes on 2 cores; resumes if interrupted)"
    )
    tcfg = TrainConfig(steps=steps, batch_size=8, seq_len=128, eval_every=max(1, steps // 4))
    train(preset("tiny", "ultramem"), tcfg, ckpt, resume=True)
    return ckpt


@app.command()
def demo(
    workdir: Path = typer.Option(
        Path("artifacts"), help="Where the model is kept (WORKDIR/model; the store is scratch)."
    ),
    steps: int = typer.Option(400, min=1, help="Training steps for the tiny model."),
    shards: int = typer.Option(1, min=1, help="Value shards."),
    replicas: int = typer.Option(1, min=1, help="Replicas per shard."),
    max_new_tokens: int = typer.Option(96, min=1, help="Tokens to generate."),
    prompt_text: str = typer.Option(DEMO_PROMPT, "--prompt", help="Text to continue."),
) -> None:
    """Train/reuse a tiny UltraMem model, serve its tables on Ray, generate remotely.

    The default layout (1 shard x 1 replica) is the one whose overlap the README reports; more
    shards or replicas on a 2-core machine share the cores with the decoding model."""
    if not prompt_text:
        fail("--prompt must not be empty")
    total = 6
    _step(1, total, "model")
    ckpt = ensure_model(workdir, steps)

    _step(2, total, f"export the value tables ({shards} shard(s))")
    # a scratch store of this run only: never a directory the user may have exported into
    store = Path(tempfile.mkdtemp(prefix=".demo-store-", dir=workdir))
    try:
        _serve_and_generate(ckpt, store, shards, replicas, max_new_tokens, prompt_text)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def _tidy(text: str) -> str:
    """Generated text as printed: no trailing blanks on any line, no blank tail."""
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip()


def _serve_and_generate(
    ckpt: Path, store: Path, shards: int, replicas: int, max_new_tokens: int, prompt_text: str
) -> None:
    import ray
    import torch

    from ultramem_dist.cli.cluster_cmds import status_table
    from ultramem_dist.cluster import ClusterValueStore, Deployer, PlacementOptions
    from ultramem_dist.model import load_pretrained
    from ultramem_dist.store.export import export_checkpoint
    from ultramem_dist.train import ByteTokenizer

    total = 6
    manifest = export_checkpoint(
        ckpt, store, shards=shards, by="auto", version="demo", dtype=SERVING_DTYPE
    )
    for t in manifest.tables:
        console.print(
            f"  {t.table_id}: {t.n_rows} rows × {t.dv} (E={t.expansion}, h_c={t.num_cores}), "
            f"{t.sharding}-sharded, {manifest.dtype}"
        )

    _step(3, total, f"up: {shards} shards × {replicas} replicas on an embedded local Ray")
    t0 = time.perf_counter()
    ray.init(
        address="local",  # always a new embedded cluster, never someone else's running one
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
        prompt = torch.tensor([tok.encode(prompt_text)])
        # as in benchmarks/overlap.py: the model decodes on one thread, the shards get the rest
        torch.set_num_threads(1)
        local_model = load_pretrained(ckpt)
        local_model.round_value_tables(getattr(torch, SERVING_DTYPE))  # as the store holds them
        remote_model = load_pretrained(ckpt)
        remote_model.drop_value_tables()
        with ClusterValueStore() as backend:
            remote_model.set_value_backend(backend)
            # warm both up (lookup process, streams, caches), then time them interleaved
            local_model.generate(prompt, 4)
            remote_model.generate(prompt, 4)
            t_local, t_remote = [], []
            for _ in range(DEMO_ROUNDS):
                t0 = time.perf_counter()
                local = local_model.generate(prompt, max_new_tokens)
                t_local.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                remote = remote_model.generate(prompt, max_new_tokens)
                t_remote.append(time.perf_counter() - t0)
        typer.echo("\n" + _tidy(tok.decode(remote[0].tolist())) + "\n")
        ms_local = 1000 * statistics.median(t_local) / max_new_tokens
        ms_remote = 1000 * statistics.median(t_remote) / max_new_tokens
        console.print(
            f"  median of {DEMO_ROUNDS} runs: local {ms_local:.1f} ms/token, remote "
            f"{ms_remote:.1f} ms/token = {ms_remote / ms_local:.2f}x local"
        )
        for line in _speed_note(shards, replicas):
            console.print(line)
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


def _speed_note(shards: int, replicas: int) -> list[str]:
    """Which setup gives which remote/local speed (lines under 80 columns)."""
    if shards == 1 and replicas == 1:
        return [
            "  1 shard x 1 replica: the setup of the README's overlap numbers",
            "  (benchmarks/overlap.py: remote decoding at 0.98-1.17x local on 2 cores)",
        ]
    return [
        f"  {shards} shards x {replicas} replicas: {shards * replicas} shard processes share "
        "the cores",
        "  with the decoding model: 1.8x local on 2 cores (2026-12-02; 1 x 1: 1.10x)",
    ]
