"""``demo``: the README's first command — train (or reuse) a tiny UltraMem model and use it."""

from __future__ import annotations

import json
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
        "(~3-4 minutes on 2 cores; resumes if interrupted)"
    )
    tcfg = TrainConfig(steps=steps, batch_size=8, seq_len=128, eval_every=max(1, steps // 4))
    train(preset("tiny", "ultramem"), tcfg, ckpt, resume=True)
    return ckpt


@app.command()
def demo(
    workdir: Path = typer.Option(Path("artifacts"), help="Where the model and store are kept."),
    steps: int = typer.Option(400, help="Training steps for the tiny model."),
    max_new_tokens: int = typer.Option(96, help="Tokens to generate."),
) -> None:
    """Train (or reuse) a tiny UltraMem model and generate text from it."""
    import torch

    from ultramem_dist.model import load_pretrained
    from ultramem_dist.train import ByteTokenizer

    if steps < 1:
        fail("--steps must be >= 1")
    total = 2
    _step(1, total, "model")
    ckpt = ensure_model(workdir, steps)
    _step(2, total, "generate (local tables)")
    model = load_pretrained(ckpt)
    tok = ByteTokenizer()
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([tok.encode(DEMO_PROMPT)]), max_new_tokens)
    dt = time.perf_counter() - t0
    console.print(f"[dim]{max_new_tokens / dt:.0f} tokens/s[/]")
    typer.echo(tok.decode(out[0].tolist()))
