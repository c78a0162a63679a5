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
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import quick_mode, write_json  # noqa: E402

from ultramem_dist.model import UltraMemConfig, UltraMemLayer  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and seeds")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args(argv)
    if args.quick:
        quick_mode()
        args.seeds, args.tokens = 2, 64
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
    path = write_json(
        "tdqkr_recall.json",
        {
            "tokens": args.tokens,
            "heads": 2,
            "seeds": args.seeds,
            "rows": rows,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
