"""Decode-time scaling: UltraMem vs MoE as the sparse parameters grow 1x -> 16x at fixed compute.

Usage::

    python benchmarks/decode_scaling.py            # full run (~3 minutes on 2 cores)
    python benchmarks/decode_scaling.py --quick    # scales 1x/16x, batches 1/16 (smoke run)

Writes ``benchmarks/results/decode_scaling.json`` and ``decode_scaling.png`` (``--quick``: a temp
directory unless ``--out`` is given).

Models (random init; only time is measured): the same 6-block decoder (D = 256, 4 attention
heads, d_ff = 1024, byte vocabulary) with

* ``ultramem`` — two UltraMem layers (skip ``0:2,3:5``; E = 4, H = 2, m = 16, Dv = 128, h_c = 2,
  r = 2, Dk = 64); sparse scale ``s`` sets ``knum = round(64 * sqrt(s))``, so the value rows grow
  ``s``-fold (N = 4,096 -> 65,536 per layer) while the rows read per token (H*m = 32) stay fixed;
* ``moe`` — the FFNs of blocks 2 and 5 are top-2 MoEs with ``2 * s`` experts of width 512 (the
  activated FFN width stays d_ff = 1024), which makes the expert parameters equal to the UltraMem
  value parameters at every scale (1.05 M * s).

Each decode step (one new token for every sequence of the batch, KV cache on) is timed after an
untimed prefill of a 4-token prompt; ``ms_per_token`` is the median over rounds of the median
step time of a round (one step = one token for the whole batch). ``local`` uses the model's own
tables; ``remote`` serves the UltraMem tables from an ``ultramem-dist serve-shard`` process
through :class:`~ultramem_dist.client.RemoteValueStore`, with the skip-layer overlap (lookup
issued at block a, collected after block b). Model and shard each use one torch thread. All
scales are built (and their shard servers started) up front and timed round-robin, every round
visiting every (scale, model, mode), so drift in the load of a
shared machine cannot masquerade as a scaling trend.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ReadyProcs, save  # noqa: E402

from ultramem_dist.model import (  # noqa: E402
    KVCache,
    LMConfig,
    MemoryLM,
    MoEConfig,
    UltraMemConfig,
    save_pretrained,
)

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from ultramem_dist.cli import main; main()"]
PROMPT = 4


def make_config(kind: str, scale: int, max_seq: int) -> LMConfig:
    knum = round(64 * math.sqrt(scale))
    return LMConfig(
        kind=kind,
        d_model=256,
        n_layers=6,
        n_heads=4,
        d_ff=1024,
        max_seq=max_seq,
        memory_spec="0:2,3:5",
        moe_blocks="2,5",
        ultramem=UltraMemConfig(knum=knum, expansion=4, dk=64, heads=2, topm=16, rank=2),
        moe=MoEConfig(n_experts=2 * scale, top_k=2, d_expert=512),
        model_id=f"{kind}-x{scale}",
    )


class ExpertCounter:
    """Mean number of distinct experts a decode step touches per MoE block (router hook)."""

    def __init__(self, model: MemoryLM) -> None:
        self.counts: list[int] = []
        self.handles = []
        for block in model.blocks:
            moe = getattr(block.ffn, "router", None)
            if moe is not None:
                k = block.ffn.cfg.top_k
                self.handles.append(
                    moe.register_forward_hook(
                        lambda _m, _i, out, k=k: self.counts.append(
                            int(out.topk(k, dim=-1).indices.unique().numel())
                        )
                    )
                )

    def take(self) -> float | None:
        mean = statistics.mean(self.counts) if self.counts else None
        self.counts = []
        return mean

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def decode_ms(model: MemoryLM, prompt: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Median ms of one decode step (prefill untimed) and the last logits."""
    cache = KVCache.empty(model.cfg, prompt.shape[0])
    logits = model(prompt, cache)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = model(nxt, cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, logits


def bench_all(
    scales: list[int],
    batches: list[int],
    steps: dict[int, int],
    rounds: int,
    remote: bool,
    tmp: Path,
) -> list[dict[str, Any]]:
    """Build every scale's models (and shard servers) first, then time them round-robin: each
    round visits every (scale, model, mode) once, so load drift hits all scales alike."""
    from ultramem_dist.client import RemoteValueStore
    from ultramem_dist.store.export import export_checkpoint

    max_seq = PROMPT + max(steps.values()) + 1
    models: dict[tuple[int, str, str], MemoryLM] = {}
    params: dict[tuple[int, str], dict[str, int]] = {}
    shards = ReadyProcs(tmp)
    stores: list[RemoteValueStore] = []
    counters: dict[int, ExpertCounter] = {}
    rows: list[dict[str, Any]] = []
    try:
        for s in scales:
            torch.manual_seed(s)
            for kind in ("ultramem", "moe"):
                m = MemoryLM(make_config(kind, s, max_seq)).eval()
                models[(s, kind, "local")] = m
                params[(s, kind)] = m.param_counts()
            counters[s] = ExpertCounter(models[(s, "moe", "local")])
            if remote:
                ckpt = save_pretrained(models[(s, "ultramem", "local")], tmp / f"ckpt-x{s}")
                export_checkpoint(ckpt, tmp / f"store-x{s}", shards=1, by="row", version="b")
                cmd = [*CLI, "serve-shard", str(tmp / f"store-x{s}"), "--shard", "0"]
                shards.spawn([*cmd, "--threads", "1"], f"store-x{s}")
        remote_scales = [s for s in scales if remote]
        for s, target in zip(remote_scales, shards.targets(), strict=True):
            store = RemoteValueStore(target, deadline_s=60)
            stores.append(store)
            rm = copy.deepcopy(models[(s, "ultramem", "local")])
            rm.drop_value_tables()
            rm.set_value_backend(store)
            models[(s, "ultramem", "remote")] = rm
        for batch in batches:
            prompt = torch.randint(
                0, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(7)
            )
            for s in remote_scales:  # the remote model must compute what the local one does
                _, want = decode_ms(models[(s, "ultramem", "local")], prompt, 2)
                _, got = decode_ms(models[(s, "ultramem", "remote")], prompt, 2)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            for m in models.values():  # warm-up
                decode_ms(m, prompt, 1)
            for c in counters.values():
                c.take()
            samples: dict[tuple[int, str, str], list[float]] = {k: [] for k in models}
            experts: dict[int, list[float]] = {s: [] for s in scales}
            keys = list(models)
            for rnd in range(rounds):
                for key in keys if rnd % 2 == 0 else keys[::-1]:
                    samples[key].append(decode_ms(models[key], prompt, steps[batch])[0])
                    if key[1] == "moe":
                        e = counters[key[0]].take()
                        if e is not None:
                            experts[key[0]].append(e)
            for (s, kind, mode), ts in samples.items():
                ms = statistics.median(ts)
                p = params[(s, kind)]
                row: dict[str, Any] = {
                    "model": kind,
                    "sparse_scale": s,
                    "batch": batch,
                    "mode": mode,
                    "ms_per_token": round(ms, 3),
                    "ms_per_seq_token": round(ms / batch, 4),
                    "rounds_ms": [round(t, 3) for t in ts],
                    "sparse_params": p["sparse"],
                    "activated_params": p["activated"],
                    "total_params": p["total"],
                }
                if kind == "moe":
                    row["n_experts"] = 2 * s
                    if experts[s]:
                        row["distinct_experts_per_moe_block"] = round(
                            statistics.mean(experts[s]), 2
                        )
                else:
                    row["value_rows_per_layer"] = make_config(kind, s, 8).ultramem.n_rows
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "rounds_ms"}), flush=True)
    finally:
        for c in counters.values():
            c.remove()
        for store in stores:
            store.close()
        shards.stop()
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["model"], r["mode"], r["sparse_scale"], r["batch"]): r["ms_per_token"] for r in rows}
    scales = sorted({r["sparse_scale"] for r in rows})
    out: dict[str, Any] = {"ultramem_vs_1x": {}, "moe_vs_1x": {}, "moe_over_ultramem": {}}
    within = True
    for model, mode in (("ultramem", "local"), ("ultramem", "remote"), ("moe", "local")):
        for batch in sorted({r["batch"] for r in rows}):
            base = by.get((model, mode, scales[0], batch))
            if base is None:
                continue
            rel = {s: round(by[(model, mode, s, batch)] / base, 3) for s in scales}
            key = "ultramem_vs_1x" if model == "ultramem" else "moe_vs_1x"
            out[key][f"{mode}_batch{batch}"] = rel
            if model == "ultramem":
                within &= all(abs(v - 1) <= 0.15 for v in rel.values())
    for batch in sorted({r["batch"] for r in rows}):
        out["moe_over_ultramem"][f"batch{batch}"] = {
            s: round(by[("moe", "local", s, batch)] / by[("ultramem", "local", s, batch)], 3)
            for s in scales
        }
    out["ultramem_within_15pct"] = within
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.8), squeeze=False)
    styles = {
        ("ultramem", "local"): ("#4c72b0", "-", "UltraMem local"),
        ("ultramem", "remote"): ("#55a868", "--", "UltraMem remote (overlapped)"),
        ("moe", "local"): ("#c44e52", "-", "MoE local"),
    }
    for ax, batch in zip(axes[0], batches, strict=True):
        for (model, mode), (color, ls, label) in styles.items():
            rs = sorted(
                (r for r in rows if (r["model"], r["mode"], r["batch"]) == (model, mode, batch)),
                key=lambda r: r["sparse_scale"],
            )
            if rs:
                ax.plot(
                    [r["sparse_scale"] for r in rs],
                    [r["ms_per_token"] for r in rs],
                    marker="o",
                    color=color,
                    ls=ls,
                    label=label,
                )
        ax.set(
            xscale="log",
            xlabel="sparse parameters (x of 1x)",
            ylabel="ms per decode step",
            title=f"batch {batch}",
        )
        scales = sorted({r["sparse_scale"] for r in rows})
        ax.set_xticks(scales, [str(s) for s in scales])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle(
        "Decode time vs sparse parameters at fixed activated compute (2-core CPU, 1 model "
        f"thread, {result['date']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="scales 1/16, batches 1/16")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--no-remote", action="store_true", help="local decoding only")
    args = parser.parse_args()
    if args.quick:
        scales, batches, rounds = [1, 16], [1, 16], 2
        steps = {1: 6, 16: 4}
    else:
        scales, batches, rounds = [1, 2, 4, 8, 16], [1, 16, 256], 5
        steps = {1: 16, 16: 8, 256: 3}
    torch.set_num_threads(1)
    t0 = time.time()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        rows = bench_all(scales, batches, steps, rounds, not args.no_remote, Path(tmp))
    result = {
        "rows": rows,
        "summary": summarize(rows),
        "config": {
            "d_model": 256,
            "n_layers": 6,
            "d_ff": 1024,
            "ultramem": "skip 0:2,3:5, knum=round(64*sqrt(s)), E=4, H=2, m=16, Dv=128, h_c=2",
            "moe": "blocks 2,5, n_experts=2*s, top_k=2, d_expert=512",
            "prompt_tokens": PROMPT,
            "decode_steps": steps,
            "rounds": rounds,
            "torch_threads": 1,
            "remote": "1 serve-shard process (1 thread), RemoteValueStore, skip-layer overlap",
            "quick": args.quick,
            "loadavg_start": [round(x, 2) for x in load],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.time() - t0, 1),
        },
    }
    out = save(result, "decode_scaling.json", args.out, args.quick)
    plot(json.loads((out / "decode_scaling.json").read_text()), out / "decode_scaling.png")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out / 'decode_scaling.json'} and decode_scaling.png in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
