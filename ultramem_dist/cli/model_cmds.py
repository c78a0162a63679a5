"""``train`` and ``generate`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ultramem_dist.cli.app import app, console, fail


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write (and resume from)."),
    model: str = typer.Option("ultramem", help="Model kind: dense | pkm | moe | ultramem."),
    config: str = typer.Option("tiny", help="Model size preset: tiny | micro."),
    steps: int = typer.Option(400, help="Optimizer steps."),
    batch_size: int = typer.Option(8, help="Sequences per step."),
    seq_len: int = typer.Option(128, help="Tokens per sequence."),
    lr: float = typer.Option(2e-3, help="Peak learning rate."),
    eval_every: int = typer.Option(100, help="Steps between validation + checkpoint."),
    value_lr: float = typer.Option(4.0, help="Value-table LR multiplier at step 0 (decays to 1)."),
    seed: int = typer.Option(0, help="Seed for init and data order."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT's last checkpoint."),
    overrides: str = typer.Option(
        "", help='JSON overrides of the model config, e.g. \'{"ultramem": {"topm": 32}}\'.'
    ),
) -> None:
    """Train a model on the Python standard library's sources (byte-level tokens)."""
    from ultramem_dist.model import LMConfig, preset
    from ultramem_dist.train import TrainConfig
    from ultramem_dist.train import train as run_train

    try:
        base = preset(config, model).to_dict()
        for key, value in (json.loads(overrides) if overrides else {}).items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key].update(value)
            else:
                base[key] = value
        model_cfg = LMConfig.from_dict(base)
        tcfg = TrainConfig(
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            lr=lr,
            eval_every=eval_every,
            value_lr_start=value_lr,
            seed=seed,
        )
        tcfg.validate(model_cfg)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        fail(f"invalid training configuration: {exc}")
    result = run_train(model_cfg, tcfg, out, resume=resume)
    console.print(
        f"[green]done[/]: {result.steps} steps, val loss {result.val_loss:.4f}, "
        f"{result.tokens_per_s:.0f} tokens/s → {out}"
    )


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Checkpoint directory."),
    store: str | None = typer.Option(
        None, "--store", help="Use remote value tables: a registry/endpoint spec (see `up`)."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate."),
) -> None:
    """Greedy decoding with a KV cache (local tables, or remote ones with --store)."""
    from ultramem_dist.model import load_pretrained
    from ultramem_dist.train import ByteTokenizer

    if checkpoint is None:
        fail("--checkpoint is required: the directory written by `ultramem-dist train`")
    try:
        model = load_pretrained(checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if store is not None:
        fail("--store needs the Ray deployment (`ultramem-dist up`), not available in this build")
    tok = ByteTokenizer()
    ids = tok.encode(prompt)
    if not ids:
        fail("--prompt is empty")
    import torch

    try:
        out = model.generate(torch.tensor([ids]), max_new_tokens)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(tok.decode(out[0].tolist()))
