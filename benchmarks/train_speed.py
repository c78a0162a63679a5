"""Training speed: tiny UltraMem, current code vs a baseline revision, dense for reference.

Usage::

    python benchmarks/train_speed.py                 # 3 interleaved repeats (~4 min, 2 cores)
    python benchmarks/train_speed.py --quick         # 1 repeat, 3 steps (smoke run, temp dir)
    python benchmarks/train_speed.py --baseline REV  # another baseline (default 07239b3)

Writes ``benchmarks/results/train_speed.json`` and ``train_speed.png`` (with ``--threads N``:
``train_speed_Nthread.{json,png}``).

The baseline is checked out into a temporary ``git worktree`` and every measurement runs in a
fresh subprocess whose ``PYTHONPATH`` points at the tree being measured. One measurement:
``preset("tiny", "ultramem")`` (or a dense model), batch 8 x 128 tokens, the trainer's own
step (:func:`~ultramem_dist.train.trainer.build_optimizer`, ``model.loss``, backward, clip,
AdamW, SVD refresh), 2 warm-up steps, then ``--steps`` timed steps; it reports tokens per
wall second and tokens per CPU second of the process (all its threads: less sensitive to other
load on a shared machine than wall time) and the 1-minute load average when it started.
Runs are interleaved (baseline, current, dense, dense at equal activated parameters, ...), so
a change of machine load hits all of them alike. ``dense_equal`` is ``quality.py``'s dense
model: its FFN widened until its activated parameters equal UltraMem's.

``--profile`` also records torch.profiler's top operators (self CPU time) of 3 UltraMem steps
for the baseline and the current code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

BATCH, SEQ = 8, 128
THREADS = 0  # --threads: torch (and native kernel) threads of the measured processes


def _model_config(kind: str):  # noqa: ANN202 (an LMConfig of the tree being measured)
    from ultramem_dist.model import preset

    if kind == "dense_equal":
        from quality import model_configs

        return model_configs()["dense"]
    return preset("tiny", kind)


def layer_worker(steps: int) -> dict:
    """Forward + backward of one tiny UltraMem layer alone on ``BATCH * SEQ`` random tokens
    (the part of the step that the memory layer adds)."""
    import torch

    from ultramem_dist.model import UltraMemLayer, preset

    load = os.getloadavg()[0]
    torch.manual_seed(0)
    layer = UltraMemLayer(256, preset("tiny", "ultramem").ultramem)
    layer.train()
    x = torch.randn(BATCH * SEQ, 256, requires_grad=True)
    sums = []

    def step() -> None:
        y = layer(x)
        y.square().mean().backward()
        sums.append(float(layer.values.grad.double().sum()))
        layer.zero_grad(set_to_none=True)

    return _timed("layer", step, steps, load, sums)


def _timed(kind: str, step: Callable[[], None], steps: int, load: float, losses: list) -> dict:
    """Two warm-up calls of ``step``, then ``steps`` timed ones (wall and process CPU time);
    ``losses`` is what the steps append to."""
    import torch

    for _ in range(2):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "kind": kind,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "load_1min": load,
        "tokens_per_s": steps * BATCH * SEQ / wall,
        "tokens_per_cpu_s": steps * BATCH * SEQ / cpu,
        "losses": losses,
    }


def worker(kind: str, steps: int, profile: bool) -> dict:
    """One measurement in this process (the tree on ``PYTHONPATH``); returns the result dict."""
    import torch

    if kind == "layer":
        return layer_worker(steps)

    from ultramem_dist.model import MemoryLM
    from ultramem_dist.train import Corpus, TrainConfig
    from ultramem_dist.train.data import BatchSampler
    from ultramem_dist.train.trainer import build_optimizer

    load = os.getloadavg()[0]
    torch.manual_seed(0)
    model = MemoryLM(_model_config(kind))
    optimizer = build_optimizer(model, TrainConfig())
    sampler = BatchSampler(Corpus.stdlib().train, BATCH, SEQ, 0)
    model.train()
    losses = []

    def step() -> None:
        lm_loss, total = model.loss(sampler.next())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.refresh_svd()
        losses.append(float(lm_loss.detach()))

    out = _timed(kind, step, steps, load, losses)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out["profile"] = [
            {
                "op": e.key,
                "self_ms_per_step": e.self_cpu_time_total / 1000 / 3,
                "share": e.self_cpu_time_total / total,
                "calls_per_step": e.count / 3,
            }
            for e in events[:15]
        ]
        out["profile_total_ms_per_step"] = total / 1000 / 3
    return out


def _run(tree: Path, kind: str, steps: int, profile: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'operators'}"}
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--steps", str(steps)]
    if profile:
        cmd.append("--profile")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement of {kind} in {tree} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    wall = [r["tokens_per_s"] for r in runs]
    cpu = [r["tokens_per_cpu_s"] for r in runs]
    return {
        "tokens_per_s_median": statistics.median(wall),
        "tokens_per_s": wall,
        "tokens_per_cpu_s_median": statistics.median(cpu),
        "tokens_per_cpu_s": cpu,
        "load_1min": [r["load_1min"] for r in runs],
    }


def _plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(payload["models"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, title in (
        (axes[0], "tokens_per_s", "tokens / wall second"),
        (axes[1], "tokens_per_cpu_s", "tokens / CPU second"),
    ):
        meds = [payload["models"][m][f"{key}_median"] for m in labels]
        lo = [meds[i] - min(payload["models"][m][key]) for i, m in enumerate(labels)]
        hi = [max(payload["models"][m][key]) - meds[i] for i, m in enumerate(labels)]
        colors = ["#999", "#1f77b4", "#bbb", "#ddd", "#999", "#1f77b4"]
        ax.bar(labels, meds, yerr=[lo, hi], capsize=4, color=colors[: len(labels)])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
        for i, v in enumerate(meds):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(
        f"tiny UltraMem training, batch {BATCH}x{SEQ}: speed-up {payload['speedup_wall']:.2f}x "
        f"wall, {payload['speedup_cpu']:.2f}x CPU vs {payload['baseline']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="07239b3", help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--profile", action="store_true", help="record top operators too")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 steps, temp dir")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.profile)))
        return 0
    from common import machine, quick_mode, write_json

    global THREADS
    THREADS = args.threads

    if args.quick:
        quick_mode()
        args.repeats, args.steps = 1, 3

    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.baseline], cwd=REPO, capture_output=True, text=True
    )
    if rev.returncode != 0:
        print(f"error: {args.baseline!r} is not a git revision of {REPO}", file=sys.stderr)
        return 2
    base_rev = rev.stdout.strip()
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="train-speed-"))
    base_tree = tmp / "baseline"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(base_tree), base_rev],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    plan = [
        ("ultramem_baseline", base_tree, "ultramem"),
        ("ultramem", REPO, "ultramem"),
        ("dense", REPO, "dense"),
        ("dense_equal", REPO, "dense_equal"),
        ("layer_baseline", base_tree, "layer"),
        ("layer", REPO, "layer"),
    ]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in plan}
    profiles = {}
    try:
        for rnd in range(args.repeats):
            for label, tree, kind in plan:
                res = _run(tree, kind, args.steps, False)
                runs[label].append(res)
                print(
                    f"round {rnd + 1} {label:18s} {res['tokens_per_s']:7.0f} tok/s "
                    f"{res['tokens_per_cpu_s']:7.0f} tok/cpu-s  load {res['load_1min']:.2f}",
                    flush=True,
                )
        if args.profile:
            for label, tree, kind in plan[:2]:
                profiles[label] = _run(tree, kind, 2, True)
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, capture_output=True
        )
    models = {label: _summary(rs) for label, rs in runs.items()}
    base, cur = models["ultramem_baseline"], models["ultramem"]
    # same seed, same batches: the losses of the two trees agree to float rounding
    loss_diff = max(
        abs(a - b)
        for ra, rb in zip(runs["ultramem_baseline"], runs["ultramem"], strict=True)
        for a, b in zip(ra["losses"], rb["losses"], strict=True)
    )
    grad_diff = max(  # the value table's gradient sum of the layer runs
        abs(a - b) / max(abs(a), 1e-30)
        for ra, rb in zip(runs["layer_baseline"], runs["layer"], strict=True)
        for a, b in zip(ra["losses"], rb["losses"], strict=True)
    )
    payload = {
        "baseline": base_rev,
        "current": head,
        "batch": [BATCH, SEQ],
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": runs["ultramem"][0]["threads"],
        "models": models,
        "speedup_wall": cur["tokens_per_s_median"] / base["tokens_per_s_median"],
        "speedup_cpu": cur["tokens_per_cpu_s_median"] / base["tokens_per_cpu_s_median"],
        "layer_speedup_wall": models["layer"]["tokens_per_s_median"]
        / models["layer_baseline"]["tokens_per_s_median"],
        "layer_speedup_cpu": models["layer"]["tokens_per_cpu_s_median"]
        / models["layer_baseline"]["tokens_per_cpu_s_median"],
        "ultramem_vs_dense_cpu": cur["tokens_per_cpu_s_median"]
        / models["dense"]["tokens_per_cpu_s_median"],
        "max_loss_diff_vs_baseline": loss_diff,
        "layer_value_grad_sum_max_rel_diff": grad_diff,
        "profiles": {k: {"total_ms_per_step": v["profile_total_ms_per_step"],
                         "top": v["profile"]} for k, v in profiles.items()},
    }  # fmt: skip
    name = "train_speed" if not THREADS else f"train_speed_{THREADS}thread"
    path = write_json(f"{name}.json", payload)
    import common

    _plot(payload, common.RESULTS / f"{name}.png")
    print(
        f"speed-up vs {base_rev}: {payload['speedup_wall']:.2f}x wall, "
        f"{payload['speedup_cpu']:.2f}x CPU (layer alone {payload['layer_speedup_wall']:.2f}x "
        f"wall, {payload['layer_speedup_cpu']:.2f}x CPU); max loss diff {loss_diff:.2e}; "
        f"wrote {path}"
    )
    print(machine())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
