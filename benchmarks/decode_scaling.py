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
untimed prefill of a 4-token prompt; ``ms_per_token`` is the median time of one step (for the
whole batch). ``local`` uses the model's own tables; ``remote`` serves the UltraMem tables from
an ``ultramem-dist serve-shard`` process through :class:`~ultramem_dist.client.RemoteValueStore`,
with the skip-layer overlap (lookup issued at block a, collected after block b). Model and shard
each use one torch thread. Every (model, mode) is timed in interleaved rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, today, write_json  # noqa: E402

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


class ShardProcess:
    """One ``serve-shard`` process over a store; always stopped by :meth:`stop`."""

    def __init__(self, store: Path, workdir: Path) -> None:
        self.ready = workdir / f"ready-{store.name}.json"
        self.proc = subprocess.Popen(
            [*CLI, "serve-shard", str(store), "--shard", "0", "--threads", "1"]
            + ["--ready-file", str(self.ready)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def target(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve-shard did not start (exit {self.proc.poll()})")
            time.sleep(0.05)
        return f"127.0.0.1:{json.loads(self.ready.read_text())['port']}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bench_scale(
    scale: int, batches: list[int], steps: dict[int, int], rounds: int, remote: bool, tmp: Path
) -> list[dict[str, Any]]:
    from ultramem_dist.client import RemoteValueStore
    from ultramem_dist.store.export import export_checkpoint

    max_seq = PROMPT + max(steps.values()) + 1
    torch.manual_seed(scale)
    models: dict[tuple[str, str], MemoryLM] = {}
    params: dict[str, dict[str, int]] = {}
    for kind in ("ultramem", "moe"):
        m = MemoryLM(make_config(kind, scale, max_seq)).eval()
        models[(kind, "local")] = m
        params[kind] = m.param_counts()
    shard: ShardProcess | None = None
    store: RemoteValueStore | None = None
    rows: list[dict[str, Any]] = []
    try:
        if remote:
            um = models[("ultramem", "local")]
            ckpt = save_pretrained(um, tmp / f"ckpt-x{scale}")
            export_checkpoint(ckpt, tmp / f"store-x{scale}", shards=1, by="row", version="b")
            shard = ShardProcess(tmp / f"store-x{scale}", tmp)
            store = RemoteValueStore(shard.target(), deadline_s=60)
            rm = copy.deepcopy(um)
            rm.drop_value_tables()
            rm.set_value_backend(store)
            models[("ultramem", "remote")] = rm
        counter = ExpertCounter(models[("moe", "local")])
        for batch in batches:
            prompt = torch.randint(
                0, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(7)
            )
            n = steps[batch]
            if remote:  # the remote model must compute what the local one does
                _, want = decode_ms(models[("ultramem", "local")], prompt, 2)
                _, got = decode_ms(models[("ultramem", "remote")], prompt, 2)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            samples: dict[tuple[str, str], list[float]] = {k: [] for k in models}
            for m in models.values():  # warm-up
                decode_ms(m, prompt, 2)
            counter.take()
            experts: list[float] = []
            for _ in range(rounds):
                for key, m in models.items():
                    samples[key].append(decode_ms(m, prompt, n)[0])
                    if key[0] == "moe":
                        e = counter.take()
                        if e is not None:
                            experts.append(e)
            for (kind, mode), ts in samples.items():
                row: dict[str, Any] = {
                    "model": kind,
                    "sparse_scale": scale,
                    "batch": batch,
                    "mode": mode,
                    "ms_per_token": round(statistics.median(ts), 3),
                    "ms_per_seq_token": round(statistics.median(ts) / batch, 4),
                    "sparse_params": params[kind]["sparse"],
                    "activated_params": params[kind]["activated"],
                    "total_params": params[kind]["total"],
                }
                if kind == "moe":
                    row["n_experts"] = 2 * scale
                    if experts:
                        row["distinct_experts_per_moe_block"] = round(statistics.mean(experts), 2)
                else:
                    row["value_rows_per_layer"] = make_config(kind, scale, 8).ultramem.n_rows
                rows.append(row)
                print(json.dumps(row), flush=True)
        counter.remove()
    finally:
        if store is not None:
            store.close()
        if shard is not None:
            shard.stop()
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
        ax.set_xticks([r for r in sorted({r["sparse_scale"] for r in rows})])
        ax.set_xticklabels([str(s) for s in sorted({r["sparse_scale"] for r in rows})])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle(
        "Decode time vs sparse parameters at fixed activated compute (2-core CPU, 1 model "
        f"thread, {result['date']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save(payload: dict[str, Any], name: str, out: Path | None, quick: bool) -> Path:
    """``write_json`` into benchmarks/results, or the same payload into ``out`` (``--quick``
    without ``--out``: a fresh temp directory, so smoke runs never overwrite real results)."""
    if out is None and not quick:
        return write_json(name, payload).parent
    out = out or Path(tempfile.mkdtemp(prefix="bench-quick-"))
    out.mkdir(parents=True, exist_ok=True)
    full = {"date": today(), "machine": machine(), **payload}
    (out / name).write_text(json.dumps(full, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="scales 1/16, batches 1/16")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--no-remote", action="store_true", help="local decoding only")
    args = parser.parse_args()
    if args.quick:
        scales, batches, rounds = [1, 16], [1, 16], 1
        steps = {1: 8, 16: 6}
    else:
        scales, batches, rounds = [1, 2, 4, 8, 16], [1, 16, 256], 3
        steps = {1: 24, 16: 12, 256: 4}
    torch.set_num_threads(1)
    t0 = time.time()
    load = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        for s in scales:
            rows += bench_scale(s, batches, steps, rounds, not args.no_remote, Path(tmp))
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
