"""Quality at equal tokens: dense vs MoE vs PKM vs UltraMem on the stdlib corpus.

Models share the tiny LM (D=256, 6 blocks). The dense model's FFN is widened so its activated
parameters match UltraMem's; PKM and MoE are sized so their sparse parameters are close to
UltraMem's. Every model sees the same batches (same seed) for the same number of tokens.

    python benchmarks/quality.py [--steps 600] [--seeds 3] [--models dense,pkm,moe,ultramem]

Each seed fixes both the initialisation and the batch order, so for one seed every model sees
identical batches; differences between models are paired per seed and summarised by a 95%
t-interval over seeds (n-1 degrees of freedom). Every finished (model, seed) run is kept under
benchmarks/results/quality_runs/, so an interrupted run resumes where it stopped.

Writes benchmarks/results/quality.json and quality.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import plot_path, quick_mode, write_json  # noqa: E402

from ultramem_dist.model import MemoryLM, MoEConfig, PKMConfig, preset  # noqa: E402
from ultramem_dist.train import Corpus, TrainConfig, train  # noqa: E402


def model_configs() -> dict:
    ultra = preset("tiny", "ultramem")
    u_counts = MemoryLM(ultra).param_counts()
    # dense: widen the FFN until activated params match UltraMem's
    dense = preset("tiny", "dense")
    per_ffn_unit = 2 * dense.d_model * dense.n_layers
    dense.d_ff += round(
        (u_counts["activated"] - MemoryLM(dense).param_counts()["activated"]) / per_ffn_unit
    )
    # PKM: table rows of width D; rows chosen to match UltraMem's sparse params; reads the same
    # number of value bytes per token (H*k*D = H*m*Dv)
    pkm = preset("tiny", "pkm")
    rows = u_counts["sparse"] // (pkm.d_model * len(pkm.memory_pairs()))
    n_keys = int(rows**0.5)
    pkm.pkm = PKMConfig(n_keys=n_keys, dk=64, heads=2, topk=ultra.ultramem.topm // 2)
    # MoE: experts in the two blocks where UltraMem writes, activated FFN width = dense d_ff;
    # expert count chosen so expert params ~= replaced FFNs + UltraMem's value params
    moe = preset("tiny", "moe")
    moe.moe_blocks = "2,5"
    expert = 2 * moe.d_model * (moe.d_ff // 2)
    replaced = 2 * 2 * moe.d_model * moe.d_ff
    n_exp = max(2, round((replaced + u_counts["sparse"]) / (2 * expert)))
    moe.moe = MoEConfig(n_experts=n_exp, top_k=2)
    for cfg in (dense, pkm, moe):
        cfg.validate()
    registry = {"dense": dense, "pkm": pkm, "moe": moe, "ultramem": ultra}
    registry["ultramem_two_sided"] = type(ultra).from_dict(
        {
            **ultra.to_dict(),
            "ultramem": {**ultra.to_dict()["ultramem"], "tdqkr_candidates": "two_sided"},
        }
    )
    try:  # UltraMemV2 plugs in once its preset exists
        registry["ultramemv2"] = preset("tiny", "ultramemv2")
    except (ValueError, KeyError):
        pass
    return registry


# two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
}


def mean_ci95(xs: list[float]) -> dict:
    """Mean and half-width of the 95% t-interval (n-1 dof); ci95 is None for one sample."""
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": round(mean, 4), "ci95": None, "n": len(xs)}
    t = _T975.get(len(xs) - 1, 1.96)
    half = t * statistics.stdev(xs) / len(xs) ** 0.5
    return {"mean": round(mean, 4), "ci95": round(half, 4), "n": len(xs)}


RUNS_DIR = Path(__file__).resolve().parent / "results" / "quality_runs"


def train_config(steps: int, batch_size: int, seq_len: int, seed: int, **overrides) -> TrainConfig:
    """The TrainConfig of every quality (and ablation) run: seed fixes init and batch order."""
    return TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        eval_every=max(1, steps // 6),
        eval_batches=16,
        warmup=30,
        seed=seed,
        **overrides,
    )


def run_one(name: str, cfg, tcfg: TrainConfig, corpus, runs_dir: Path) -> dict:
    """Train one (model, seed), or load its finished result."""
    path = runs_dir / f"{name}_steps{tcfg.steps}_seed{tcfg.seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    counts = MemoryLM(cfg).param_counts()
    with tempfile.TemporaryDirectory() as tmp:
        res = train(cfg, tcfg, Path(tmp) / name, corpus=corpus)
    out = {
        "val_loss": res.val_loss,
        "activated_params": counts["activated"],
        "total_params": counts["total"],
        "sparse_params": counts["sparse"],
        "tokens_per_s": res.tokens_per_s,
        "curve": [(h["tokens"], h["val_loss"]) for h in res.history],
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    runs_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--models", default="dense,pkm,moe,ultramem")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="smoke run; results to a temp dir")
    args = parser.parse_args()
    runs_dir = RUNS_DIR
    if args.quick:
        args.steps, args.seq_len, args.seeds = 12, 64, 2
        print(f"--quick: results go to {quick_mode()}")
        runs_dir = Path(tempfile.mkdtemp(prefix="quality-runs-"))
    if args.steps < 1 or args.seeds < 1:
        parser.error("--steps and --seeds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = Corpus.stdlib()
    configs = model_configs()
    names = args.models.split(",")
    unknown = [n for n in names if n not in configs]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {sorted(configs)}")
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for seed in range(args.seeds):
        tcfg = train_config(args.steps, args.batch_size, args.seq_len, seed)
        for name in names:
            out = run_one(name, configs[name], tcfg, corpus, runs_dir)
            runs[name].append(out)
            print(
                f"seed {seed} {name}: val_loss {out['val_loss']:.4f} "
                f"({out['tokens_per_s']:.0f} tok/s)",
                flush=True,
            )
    results, curves = {}, {}
    for name, rs in runs.items():
        losses = [r["val_loss"] for r in rs]
        results[name] = {
            "val_loss": round(statistics.fmean(losses), 4),
            "val_loss_std": round(statistics.stdev(losses), 4) if len(losses) > 1 else None,
            "val_loss_per_seed": [round(x, 4) for x in losses],
            "activated_params": rs[0]["activated_params"],
            "total_params": rs[0]["total_params"],
            "sparse_params": rs[0]["sparse_params"],
            "tokens_per_s": round(statistics.fmean(r["tokens_per_s"] for r in rs), 1),
        }
        curves[name] = (
            rs[0]["curve"]
            if len(rs) == 1
            else [
                (
                    pts[0][0],
                    statistics.fmean(p[1] for p in pts),
                    statistics.stdev(p[1] for p in pts),
                )
                for pts in zip(*[r["curve"] for r in rs], strict=True)
            ]
        )
    paired = {}
    for ref in ("pkm", "dense", "ultramem"):  # ultramem: its variants (ultramem_two_sided)
        if ref not in runs:
            continue
        for name in names:
            if name == ref or (ref == "ultramem" and not name.startswith("ultramem_")):
                continue
            diffs = [
                a["val_loss"] - b["val_loss"] for a, b in zip(runs[name], runs[ref], strict=True)
            ]
            paired[f"{name}_minus_{ref}"] = mean_ci95(diffs)
    tokens = args.steps * args.batch_size * args.seq_len
    path = write_json(
        "quality.json",
        {
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "loadavg_start": load_start,
            "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
            "tokens": tokens,
            "steps": args.steps,
            "seeds": args.seeds,
            "interval": "95% Student-t over seeds, n-1 degrees of freedom, paired by seed",
            "command": f"python benchmarks/quality.py --steps {args.steps} --seeds {args.seeds}",
            "models": results,
            "paired": paired,
            "curves": curves,
        },
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        if pts and len(pts[0]) == 3:
            sd = [p[2] for p in pts]
            ax.fill_between(
                xs,
                [y - e for y, e in zip(ys, sd, strict=True)],
                [y + e for y, e in zip(ys, sd, strict=True)],
                color=line.get_color(),
                alpha=0.2,
            )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"Equal-token quality, {args.seeds} seeds (band: ±1 std)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_path("quality.png"), dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
