"""TDQKR recall: the paper's rank-1 candidate rule vs the two-sided rule, against brute force.

Usage::

    python benchmarks/tdqkr_recall.py            # full run (~10 s on 2 cores)
    python benchmarks/tdqkr_recall.py --quick    # fewer tokens (smoke run, temp dir)

Writes ``benchmarks/results/tdqkr_recall.json``.

For every rank r in {1, 2} and side K in {16, 128} (m = K / 4 for K = 16, 16 for K = 128),
recall is the mean fraction of the exact top-m cells of the whole K x K grid
(:func:`~ultramem_dist.model.ultramem.brute_force_topm`) that
:func:`~ultramem_dist.model.ultramem.tdqkr_topm` finds, with

* ``paper``: the top m rows of ``u . S_row`` and the top m columns of ``v . S_col``;
* ``two_sided``: ceil(m/2) from the top and floor(m/2) from the bottom of each side;

both score ``m x m`` cells exactly. Two score sources: ``gaussian`` (i.i.d. N(0, 1) row and
column scores, cores U(0, 1) as at initialisation) and ``layer`` (an initialised UltraMem layer
of that K and r on random inputs: LayerNorm'd queries and keys, as in training at step 0).
Several seeds each; mean and min/max over seeds are reported.

Validation loss (``--train-steps``, default 300; 0 skips it): ``preset("micro")`` UltraMem
(K = 16, m = 4, r = 2) trained with each rule for the same steps on the same batches (batch
8 x 64, seed s fixes init and batch order), ``--train-seeds`` seeds; per-seed losses, their
means, and the paired differences two_sided - paper.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import quick_mode, write_json  # noqa: E402

from ultramem_dist.model import UltraMemConfig, UltraMemLayer, preset  # noqa: E402
from ultramem_dist.model.ultramem import (  # noqa: E402
    TDQKR_CANDIDATES,
    brute_force_topm,
    key_recall,
    refresh_core_vectors,
    tdqkr_topm,
)

CASES = [(1, 16, 4), (2, 16, 4), (1, 128, 16), (2, 128, 16)]  # (rank, K, m)


def gaussian_scores(
    tokens: int, heads: int, rank: int, k_side: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """I.i.d. normal row/col scores ``[T, H, r, K]``, U(0, 1) cores and their u, v."""
    gen = torch.Generator().manual_seed(seed)
    s_row = torch.randn(tokens, heads, rank, k_side, generator=gen)
    s_col = torch.randn(tokens, heads, rank, k_side, generator=gen)
    cores = torch.rand(heads, 2, rank, rank, generator=gen)
    u, v = torch.zeros(heads, rank), torch.zeros(heads, rank)
    refresh_core_vectors(cores, u, v)
    return s_row, s_col, cores, u, v


@torch.no_grad()
def layer_scores(tokens: int, rank: int, k_side: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Key scores of a freshly initialised UltraMem layer (K = 2 * knum, E = 4) on N(0, 1)
    inputs of width 256."""
    torch.manual_seed(seed)
    layer = UltraMemLayer(256, UltraMemConfig(knum=k_side // 2, expansion=4, rank=rank))
    s_row, s_col = layer.key_scores(torch.randn(tokens, 256))
    return s_row, s_col, layer.cores, layer.u, layer.v


def recall(scores: tuple[torch.Tensor, ...], m: int, rule: str) -> float:
    """Recall of ``rule``'s top-m against brute force over the whole grid."""
    s_row, s_col, cores, u, v = scores
    with torch.no_grad():
        virtual, _ = tdqkr_topm(s_row, s_col, cores, u, v, m, rule)
        return key_recall(virtual, brute_force_topm(s_row, s_col, cores, m))


def val_losses(steps: int, seeds: int) -> dict:
    """Final validation loss of the micro UltraMem per rule and seed (see the module doc)."""
    from ultramem_dist.train import Corpus, TrainConfig, train

    corpus = Corpus.stdlib()
    losses: dict[str, list[float]] = {rule: [] for rule in TDQKR_CANDIDATES}
    for seed in range(seeds):
        for rule in TDQKR_CANDIDATES:
            cfg = preset("micro")
            cfg.ultramem.tdqkr_candidates = rule
            tcfg = TrainConfig(
                steps=steps, batch_size=8, seq_len=64, eval_every=steps, warmup=steps // 10,
                eval_batches=8, seed=seed,
            )  # fmt: skip
            with tempfile.TemporaryDirectory() as out:
                res = train(cfg, tcfg, out, corpus=corpus, progress=False)
            losses[rule].append(res.val_loss)
            print(f"seed {seed} {rule:9s} val loss {res.val_loss:.4f}", flush=True)
    diffs = [b - a for a, b in zip(losses["paper"], losses["two_sided"], strict=True)]
    return {
        "model": "micro ultramem (K=16, m=4, r=2, h_c=2)",
        "steps": steps,
        "batch": [8, 64],
        "val_loss": {rule: {"mean": statistics.fmean(v), "seeds": v} for rule, v in losses.items()},
        "two_sided_minus_paper": {
            "mean": statistics.fmean(diffs),
            "sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "seeds": diffs,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and seeds")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--train-steps", type=int, default=300, help="0: no training runs")
    parser.add_argument("--train-seeds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        quick_mode()
        args.seeds, args.tokens, args.train_steps, args.train_seeds = 2, 64, 4, 1
    rows = []
    for rank, k_side, m in CASES:
        for source in ("gaussian", "layer"):
            per_rule: dict[str, list[float]] = {r: [] for r in TDQKR_CANDIDATES}
            for seed in range(args.seeds):
                if source == "gaussian":
                    scores = gaussian_scores(args.tokens, 2, rank, k_side, seed)
                else:
                    scores = layer_scores(args.tokens, rank, k_side, seed)
                for rule in TDQKR_CANDIDATES:
                    per_rule[rule].append(recall(scores, m, rule))
            row = {"rank": rank, "K": k_side, "m": m, "source": source}
            for rule, vals in per_rule.items():
                row[rule] = {
                    "mean": statistics.fmean(vals),
                    "min": min(vals),
                    "max": max(vals),
                    "seeds": vals,
                }
            rows.append(row)
            print(
                f"r={rank} K={k_side:3d} m={m:2d} {source:8s} "
                + "  ".join(f"{rule}={row[rule]['mean']:.3f}" for rule in TDQKR_CANDIDATES)
            )
    training = val_losses(args.train_steps, args.train_seeds) if args.train_steps else None
    path = write_json(
        "tdqkr_recall.json",
        {
            "tokens": args.tokens,
            "heads": 2,
            "seeds": args.seeds,
            "rows": rows,
            "training": training,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
