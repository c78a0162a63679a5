"""Seeded, resumable training loop with a value-table learning-rate multiplier.

Checkpoints (``OUT/``): ``config.json`` + ``model.safetensors`` (the model, loadable with
:func:`ultramem_dist.model.load_pretrained`), ``trainer_state.pt`` (optimizer, step, sampler RNG)
and ``metrics.jsonl`` (one line per evaluation).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ultramem_dist.model import LMConfig, MemoryLM, load_pretrained, save_pretrained
from ultramem_dist.train.data import BatchSampler, Corpus, eval_batches

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Optimisation settings; every field has a default."""

    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per sequence (must be <= the model's max_seq)."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    warmup: int = 40
    """Linear warm-up steps; cosine decay to 10% afterwards."""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices (values included)."""
    value_lr_start: float = 4.0
    """Value-table LR multiplier at step 0 (decays linearly)..."""
    value_lr_end: float = 1.0
    """...to this multiplier at the last step."""
    eval_every: int = 100
    """Steps between validation evaluations (and checkpoints)."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    seed: int = 0
    """Seed of the model init and of the batch sampler."""
    grad_clip: float = 1.0
    """Gradient norm clip."""

    def validate(self, model_cfg: LMConfig) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("steps, batch_size and eval_every must be >= 1")
        if not 1 <= self.seq_len <= model_cfg.max_seq:
            raise ValueError(
                f"seq_len={self.seq_len} must be between 1 and the model's max_seq="
                f"{model_cfg.max_seq}"
            )
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def value_lr_multiplier(step: int, cfg: TrainConfig) -> float:
    frac = step / max(1, cfg.steps - 1)
    return cfg.value_lr_start + (cfg.value_lr_end - cfg.value_lr_start) * min(1.0, frac)


def build_optimizer(model: MemoryLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    value_ids = {id(p) for p in model.value_parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in value_ids:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "dense"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": model.value_parameters(), "weight_decay": cfg.weight_decay, "name": "values"},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model: MemoryLM, batches: list[torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    losses = [float(model.loss(b)[0]) for b in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    val_loss: float
    train_loss: float
    tokens: int
    tokens_per_s: float
    history: list[dict]


def train(
    model_cfg: LMConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    corpus: Corpus | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainResult:
    """Train ``model_cfg`` on the stdlib corpus into ``out_dir`` (resuming when asked).

    ``stop_at`` ends this run after that step with a checkpoint (the schedule still spans
    ``cfg.steps``), so a later ``resume=True`` run continues exactly where it stopped.
    """
    cfg.validate(model_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus or Corpus.stdlib()
    torch.manual_seed(cfg.seed)
    model = MemoryLM(model_cfg)
    optimizer = build_optimizer(model, cfg)
    sampler = BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    start_step, history = 0, []
    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["model_hash"] != model_cfg.compute_hash():
            raise ValueError(
                f"cannot resume: {out} holds a different model config; use another --out"
            )
        model = load_pretrained(out)
        optimizer = build_optimizer(model, cfg)
        optimizer.load_state_dict(state["optimizer"])
        sampler.set_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        start_step, history = state["step"], state["history"]
    model.train()
    val_set = eval_batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        disable=not progress,
        desc=f"train {model_cfg.kind}",
        unit="step",
        dynamic_ncols=True,
    )
    t0, train_loss, val_loss, done_steps = time.perf_counter(), float("nan"), float("nan"), 0
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    for step in range(start_step, end):
        factor = lr_factor(step, cfg)
        for group in optimizer.param_groups:
            mult = value_lr_multiplier(step, cfg) if group.get("name") == "values" else 1.0
            group["lr"] = cfg.lr * factor * mult
        lm_loss, total = model.loss(sampler.next())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        model.refresh_svd()
        train_loss = float(lm_loss.detach())
        done_steps += 1
        elapsed = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(
            loss=f"{train_loss:.3f}", tok_s=f"{done_steps * tokens_per_step / elapsed:.0f}"
        )
        last = step + 1 == end
        if (step + 1) % cfg.eval_every == 0 or last:
            val_loss = evaluate(model, val_set)
            record = {
                "step": step + 1,
                "tokens": (step + 1) * tokens_per_step,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "elapsed_s": elapsed,
            }
            history.append(record)
            bar.write(f"step {step + 1}: train {train_loss:.4f}  val {val_loss:.4f}")
            _checkpoint(model, optimizer, sampler, step + 1, history, cfg, out)
    bar.close()
    elapsed = max(time.perf_counter() - t0, 1e-9)
    if history:
        val_loss = history[-1]["val_loss"]
    return TrainResult(
        out,
        cfg.steps,
        val_loss,
        train_loss,
        cfg.steps * tokens_per_step,
        done_steps * tokens_per_step / elapsed,
        history,
    )


def _checkpoint(
    model: MemoryLM,
    optimizer: torch.optim.Optimizer,
    sampler: BatchSampler,
    step: int,
    history: list[dict],
    cfg: TrainConfig,
    out: Path,
) -> None:
    save_pretrained(model, out, extra={"train": asdict(cfg), "step": step})
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
        "model_hash": model.cfg.compute_hash(),
    }
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / STATE_FILE)
    with (out / METRICS_FILE).open("a") as f:
        f.write(json.dumps(history[-1]) + "\n")
