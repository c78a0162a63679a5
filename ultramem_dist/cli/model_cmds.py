"""``train``, ``generate`` and ``import-official`` commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ultramem_dist.cli.app import app, console, fail
from ultramem_dist.cli.choices import Lookup, ModelKind, Preset
from ultramem_dist.cli.serve_cmds import (
    TLS_CA_OPT,
    TLS_CERT_OPT,
    TLS_KEY_OPT,
    TLS_NAME_OPT,
    TOKEN_OPT,
    client_channel_options,
)

if TYPE_CHECKING:
    from ultramem_dist.client.channels import ChannelOptions


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write (and resume from)."),
    model: ModelKind = typer.Option(ModelKind.ultramem, help="Model kind."),
    config: Preset = typer.Option(Preset.tiny, help="Model size preset."),
    steps: int = typer.Option(400, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(8, min=1, help="Sequences per step."),
    seq_len: int = typer.Option(128, min=1, help="Tokens per sequence."),
    lr: float = typer.Option(2e-3, help="Peak learning rate."),
    eval_every: int = typer.Option(100, help="Steps between validation + checkpoint."),
    value_lr: float = typer.Option(4.0, help="Value-table LR multiplier at step 0 (decays to 1)."),
    seed: int = typer.Option(0, help="Seed for init and data order."),
    resume: bool = typer.Option(
        False, "--resume/--no-resume", help="Continue from OUT's last checkpoint."
    ),
    overrides: str = typer.Option(
        "", help='JSON overrides of the model config, e.g. \'{"ultramem": {"topm": 32}}\'.'
    ),
) -> None:
    """Train a model on the Python standard library's sources (byte-level tokens)."""
    from ultramem_dist.model import LMConfig, preset
    from ultramem_dist.train import TrainConfig
    from ultramem_dist.train import train as run_train

    try:
        base = preset(config.value, model.value).to_dict()
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


def open_value_store(  # noqa: ANN201
    store: str,
    deadline_s: float = 5.0,
    options: ChannelOptions | None = None,
    transport: str = "process",
):
    """A remote value backend from ``--store``: ``ray`` / ``auto`` / ``ray://host:port`` (the
    registry of a Ray deployment) or ``host:port[,host:port...]`` (shard servers directly).
    ``options`` (:class:`~ultramem_dist.client.channels.ChannelOptions`) carry TLS and token;
    ``transport`` runs the gRPC client in a lookup ``process`` or on a ``thread``."""
    if store == "ray" or store == "auto" or store.startswith("ray://"):
        from ultramem_dist.cluster import ClusterValueStore
        from ultramem_dist.cluster.local import connect

        connect(None if store == "ray" else store)
        return ClusterValueStore(deadline_s=deadline_s, options=options, transport=transport)
    from ultramem_dist.client.process_store import open_remote_store

    return open_remote_store(store, transport=transport, deadline_s=deadline_s, options=options)


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="Checkpoint directory (written by `ultramem-dist train`)."
    ),
    store: str | None = typer.Option(
        None,
        "--store",
        help="Remote value tables: 'ray' (local Ray deployment), ray://host:port, or "
        "host:port[,host:port...] of shard servers.",
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate."),
    compare_local: bool = typer.Option(
        False,
        "--compare-local/--no-compare-local",
        help="Also decode with the local tables and compare tokens.",
    ),
    lookup: Lookup = typer.Option(
        Lookup.process,
        "--lookup",
        help="Where the gRPC client of remote lookups runs: 'process' (a lookup process, off "
        "the model's GIL: lookups overlap the blocks) or 'thread' (a thread of this process).",
    ),
    tls_ca: Path | None = TLS_CA_OPT,
    tls_cert: Path | None = TLS_CERT_OPT,
    tls_key: Path | None = TLS_KEY_OPT,
    tls_server_name: str | None = TLS_NAME_OPT,
    auth_token_file: Path | None = TOKEN_OPT,
) -> None:
    """Greedy decoding with a KV cache (local tables, or remote ones with --store; the
    --tls-*/--auth-token-file flags secure the connections to the shards)."""
    import torch

    from ultramem_dist.errors import UltraMemError
    from ultramem_dist.model import load_pretrained
    from ultramem_dist.train import ByteTokenizer

    secured = any(x is not None for x in (tls_ca, tls_cert, tls_key, tls_server_name))
    if store is None and (secured or auth_token_file is not None):
        fail("--tls-*/--auth-token-file apply to remote tables only: add --store")
    try:
        options = client_channel_options(
            tls_ca, tls_cert, tls_key, tls_server_name, auth_token_file
        )
    except ValueError as exc:
        fail(str(exc))
    try:
        model = load_pretrained(checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    tok = ByteTokenizer()
    ids = tok.encode(prompt)
    if not ids:
        fail("--prompt is empty")
    if len(ids) + max_new_tokens > model.cfg.max_seq:
        fail(
            f"prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds the "
            f"model's max_seq={model.cfg.max_seq}"
        )
    prompt_t = torch.tensor([ids])
    local = model.generate(prompt_t, max_new_tokens) if (compare_local or not store) else None
    if store is None:
        typer.echo(tok.decode(local[0].tolist()))
        return
    try:
        backend = open_value_store(store, options=options, transport=lookup.value)
    except (UltraMemError, ConnectionError, LookupError, ValueError) as exc:
        fail(f"cannot reach the value store {store!r}: {exc}", code=1)
    try:
        model.drop_value_tables()
        model.set_value_backend(backend)
        remote = model.generate(prompt_t, max_new_tokens)
    except UltraMemError as exc:
        fail(f"remote lookup failed: {exc}", code=1)
    finally:
        backend.close()
    typer.echo(tok.decode(remote[0].tolist()))
    if local is not None:
        same = torch.equal(local, remote)
        console.print(
            "[green]remote tokens are identical to the local model's[/]"
            if same
            else "[red]remote tokens differ from the local model's[/]"
        )
        if not same:
            raise typer.Exit(1)


@app.command("import-official")
def import_official_cmd(
    checkpoint: Path = typer.Argument(
        ..., help="torch.save'd state dict in the official UltraMem (v1) or UltraMemV2 layout."
    ),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write (must be new)."),
    topm: int = typer.Option(
        ..., "--topm", min=1, help="Rows per head (the official knn; not in the state dict)."
    ),
    share_ratio: float = typer.Option(
        1.0, "--share-ratio", help="v2: the official share_ratio the layers were built with."
    ),
    pre_gelu: bool = typer.Option(
        True, "--pre-gelu/--no-pre-gelu", help="v2: GELU on the pre-value score (mem_use_glu_act)."
    ),
    every: int = typer.Option(1, "--every", min=1, help="v2: a memory layer every k-th block."),
    memory_only: bool = typer.Option(
        False,
        "--memory-only/--with-backbone",
        help="Import only the memory layers; the backbone is a random init that only `export` "
        "accepts (for state dicts without this project's backbone names).",
    ),
    drop_other_keys: bool = typer.Option(
        False,
        "--drop-other-keys",
        help="With --memory-only: discard every key that is not an official memory name (e.g. "
        "the official OLMo backbone) instead of refusing it.",
    ),
    n_layers: int | None = typer.Option(
        None, "--n-layers", min=1, help="Blocks (default: from the backbone keys, else derived)."
    ),
    n_heads: int = typer.Option(4, "--n-heads", min=1, help="Attention heads of the backbone."),
    d_ff: int | None = typer.Option(None, "--d-ff", min=1, help="FFN width (default: 4*D)."),
    memory_spec: str | None = typer.Option(
        None, "--memory-spec", help="v1 skip-layer wiring 'a:b,...' (default: 0:1,2:3,...)."
    ),
    model_id: str = typer.Option("official-import", "--model-id", help="Model id to record."),
    seed: int = typer.Option(0, help="Seed of the random backbone (memory-only imports)."),
) -> None:
    """Convert an official-layout state dict into a checkpoint that `export` serves."""
    from ultramem_dist.errors import ImportCheckpointError
    from ultramem_dist.model.official_import import Backbone, import_official, load_state_file

    if (out / "config.json").exists():
        fail(f"{out} already holds a checkpoint; choose a new --out")
    try:
        state = load_state_file(checkpoint)
        model = import_official(
            state,
            out,
            topm=topm,
            share_ratio=share_ratio,
            pre_gelu=pre_gelu,
            every=every,
            memory_only=memory_only,
            drop_other_keys=drop_other_keys,
            backbone=Backbone(
                n_layers=n_layers, n_heads=n_heads, d_ff=d_ff, memory_spec=memory_spec
            ),
            model_id=model_id,
            seed=seed,
            source=str(checkpoint),
        )
    except ImportCheckpointError as exc:
        fail(f"cannot import {checkpoint}: {exc}")
    mem = len(model.v2_layers) or len(model.memory_layers)
    console.print(
        f"imported {mem} official {model.cfg.kind} memory layer(s) "
        f"({'memory only' if memory_only else 'with backbone'}) → {out}"
    )
