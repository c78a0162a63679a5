"""The UltraMem paper's ablation ladder at tiny scale: PKM → UltraMem one step at a time.

Rung 0 is the UltraMem layer with every switch in its PKM position; each later rung turns one
step of the paper's Table 2 on (arXiv 2411.12364) and the last rung is today's tiny UltraMem with
the default training (see docs/ablation.md and ``ultramem_dist.train.ablation``). Every rung sees
the same batches per seed, with the TrainConfig of benchmarks/quality.py.

    python benchmarks/ablation.py [--steps 600] [--seeds 3] [--quick]

Each step's delta is paired per seed against the rung before it and summarised by a 95%
t-interval over seeds (n-1 degrees of freedom). Finished (rung, seed) runs are kept under
benchmarks/results/ablation_runs/ (named by rung, config hash, steps and seed), so an
interrupted run resumes at the next unfinished run.

Writes benchmarks/results/ablation.json and ablation.png.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import machine, plot_path, quick_mode, write_json  # noqa: E402
from quality import mean_ci95, run_one  # noqa: E402
from quality import train_config as quality_train_config  # noqa: E402

from ultramem_dist.train import Corpus, TrainConfig  # noqa: E402
from ultramem_dist.train.ablation import (  # noqa: E402
    PAPER_SOURCE,
    PAPER_TOTAL_DELTA,
    PAPER_VAL_DELTA,
    Rung,
    ablation_ladder,
)

RUNS_DIR = Path(__file__).resolve().parent / "results" / "ablation_runs"


def run_name(index: int, rung: Rung) -> str:
    """File-name key of a rung: position, slug of its name and its model config hash (so a
    changed ladder never reuses a stale run). Call before the rung's model is built."""
    slug = re.sub(r"[^a-z0-9]+", "-", rung.name.lower()).strip("-")
    return f"{index:02d}-{slug}-{rung.model.compute_hash()[:8]}"


def paper_direction(delta: float | None) -> str | None:
    """'lower' / 'higher' / 'same' validation loss in the paper for this step."""
    if delta is None:
        return None
    return "lower" if delta < 0 else "higher" if delta > 0 else "same"


def train_config(steps: int, batch_size: int, seq_len: int, seed: int, rung: Rung) -> TrainConfig:
    """benchmarks/quality.py's TrainConfig for this seed, with the rung's overrides."""
    return quality_train_config(steps, batch_size, seq_len, seed, **rung.train_overrides)


def summarise(ladder: list[Rung], losses: dict[str, list[float]]) -> list[dict]:
    """The ``steps`` entries of ablation.json: per rung its loss over seeds and the paired
    delta vs the rung before it, next to the paper's delta and direction."""
    out = []
    for i, rung in enumerate(ladder):
        xs = losses[rung.name]
        entry = {
            "name": rung.name,
            "val_loss_mean": round(statistics.fmean(xs), 4),
            "val_loss_std": round(statistics.stdev(xs), 4) if len(xs) > 1 else None,
            "delta_mean": None,
            "delta_ci95": None,
        }
        if i:
            prev = losses[ladder[i - 1].name]
            paired = mean_ci95([a - b for a, b in zip(xs, prev, strict=True)])
            entry["delta_mean"], entry["delta_ci95"] = paired["mean"], paired["ci95"]
        entry["paper_delta"] = PAPER_VAL_DELTA.get(rung.name)
        entry["paper_direction"] = paper_direction(entry["paper_delta"])
        out.append(entry)
    return out


def verdict(step: dict) -> str:
    """Whether this run's 95% interval agrees with the paper's direction for the step."""
    mean, half, paper = step["delta_mean"], step["delta_ci95"], step["paper_delta"]
    if half is None:
        return "n/a (one seed)"
    lo, hi = mean - half, mean + half
    if lo > 0 or hi < 0:
        sign = "lower" if hi < 0 else "higher"
        return "agrees" if sign == step["paper_direction"] else f"opposite ({sign})"
    if paper == 0:
        return "agrees (no change)"
    return "inconclusive (CI spans 0)"


def markdown_table(steps: list[dict]) -> str:
    """The README table of a run: each step's delta and interval next to the paper's."""
    lines = [
        "| step | val loss | Δ vs previous (95% CI) | paper Δ | |",
        "|---|---|---|---|---|",
    ]
    for s in steps:
        delta = "—" if s["delta_mean"] is None else f"{s['delta_mean']:+.4f}"
        if s["delta_ci95"] is not None:
            delta += f" ± {s['delta_ci95']:.4f}"
        paper = "—" if s["paper_delta"] is None else f"{s['paper_delta']:+.3f}"
        lines.append(
            f"| {s['name']} | {s['val_loss_mean']:.4f} | {delta} | {paper} | "
            f"{verdict(s) if s['delta_mean'] is not None else ''} |"
        )
    return "\n".join(lines)


def plot(steps: list[dict], title: str, preset: str) -> Path:
    """Mean delta per step with its 95% interval, the paper's delta marked beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = steps[1:]
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.errorbar(
        xs,
        [r["delta_mean"] for r in rows],
        yerr=[r["delta_ci95"] or 0.0 for r in rows],
        fmt="o",
        capsize=4,
        label=f"{preset}, mean over seeds (bars: 95% CI)",
    )
    ax.scatter(
        [x + 0.2 for x in xs],
        [r["paper_delta"] for r in rows],
        marker="x",
        color="crimson",
        label="paper (151M), Table 2",
    )
    ax.set_xticks(xs, [r["name"] for r in rows], rotation=35, ha="right")
    ax.set_ylabel("Δ validation loss vs previous rung")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = plot_path("ablation.png")
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--preset", default="tiny", help="model size of the ladder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (micro ladder); results to a temp dir"
    )
    args = parser.parse_args()
    runs_dir = RUNS_DIR
    if args.quick:
        args.steps, args.seq_len, args.seeds, args.preset = 8, 32, 2, "micro"
        print(f"--quick: results go to {quick_mode()}")
        runs_dir = Path(tempfile.mkdtemp(prefix="ablation-runs-"))
    if args.steps < 1 or args.seeds < 1:
        parser.error("--steps and --seeds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ladder = ablation_ladder(args.preset)
    except ValueError as exc:
        parser.error(str(exc))
    names = [run_name(i, r) for i, r in enumerate(ladder)]  # before any model mutates its cfg
    corpus = Corpus.stdlib()
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    losses: dict[str, list[float]] = {r.name: [] for r in ladder}
    speed: dict[str, list[float]] = {r.name: [] for r in ladder}
    total, done = len(ladder) * args.seeds, 0
    for seed in range(args.seeds):
        for rung, name in zip(ladder, names, strict=True):
            tcfg = train_config(args.steps, args.batch_size, args.seq_len, seed, rung)
            t0 = time.perf_counter()
            out = run_one(name, rung.model, tcfg, corpus, runs_dir)
            done += 1
            losses[rung.name].append(out["val_loss"])
            speed[rung.name].append(out["tokens_per_s"])
            print(
                f"[{done}/{total}] seed {seed} {rung.name}: val_loss {out['val_loss']:.4f} "
                f"({out['tokens_per_s']:.0f} tok/s, {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    steps = summarise(ladder, losses)
    base, final = losses[ladder[0].name], losses[ladder[-1].name]
    tokens = args.steps * args.batch_size * args.seq_len
    command = f"python benchmarks/ablation.py --steps {args.steps} --seeds {args.seeds}"
    path = write_json(
        "ablation.json",
        {
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "machine": machine(),
            "loadavg_start": load_start,
            "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
            "preset": args.preset,
            "train_steps": args.steps,
            "tokens": tokens,
            "seeds": args.seeds,
            "interval": "95% Student-t over seeds, n-1 degrees of freedom, paired by seed "
            "against the previous rung",
            "command": command + (" --quick" if args.quick else ""),
            "paper_source": PAPER_SOURCE,
            "paper_total_delta": PAPER_TOTAL_DELTA,
            "total": mean_ci95([a - b for a, b in zip(final, base, strict=True)]),
            "steps": steps,
            "val_loss_per_seed": {k: [round(x, 4) for x in v] for k, v in losses.items()},
            "tokens_per_s": {k: round(statistics.fmean(v), 1) for k, v in speed.items()},
        },
    )
    title = f"PKM → UltraMem ladder, {args.preset}, {tokens:,} tokens, {args.seeds} seeds"
    plot(steps, title, args.preset)
    print(markdown_table(steps))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
