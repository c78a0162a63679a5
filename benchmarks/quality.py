"""Quality at equal tokens: dense vs MoE vs PKM vs UltraMem on the stdlib corpus.

Models share the tiny LM (D=256, 6 blocks). The dense model's FFN is widened so its activated
parameters match UltraMem's; PKM and MoE are sized so their sparse parameters are close to
UltraMem's. Every model sees the same batches (same seed) for the same number of tokens.

    python benchmarks/quality.py [--steps 300] [--models dense,pkm,moe,ultramem]

Writes benchmarks/results/quality.json and quality.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
    return {"dense": dense, "pkm": pkm, "moe": moe, "ultramem": ultra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--models", default="dense,pkm,moe,ultramem")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="smoke run; results to a temp dir")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seq_len = 12, 64
        print(f"--quick: results go to {quick_mode()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = Corpus.stdlib()
    configs = model_configs()
    tcfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_every=max(1, args.steps // 6),
        eval_batches=16,
        warmup=30,
    )
    results, curves = {}, {}
    for name in args.models.split(","):
        cfg = configs[name]
        counts = MemoryLM(cfg).param_counts()
        with tempfile.TemporaryDirectory() as tmp:
            res = train(cfg, tcfg, Path(tmp) / name, corpus=corpus)
        results[name] = {
            "val_loss": round(res.val_loss, 4),
            "activated_params": counts["activated"],
            "total_params": counts["total"],
            "sparse_params": counts["sparse"],
            "tokens_per_s": round(res.tokens_per_s, 1),
        }
        curves[name] = [(h["tokens"], h["val_loss"]) for h in res.history]
        print(name, results[name], flush=True)
    tokens = tcfg.steps * tcfg.batch_size * tcfg.seq_len
    path = write_json(
        "quality.json",
        {
            "tokens": tokens,
            "command": f"python benchmarks/quality.py --steps {args.steps}",
            "models": results,
            "curves": curves,
        },
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Equal-token quality on the Python stdlib corpus")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_path("quality.png"), dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
