"""How much remote lookup latency the skip-layer overlap hides during decoding.

Serves a tiny UltraMem model's tables from Ray shard actors (2 shards × 1 replica, each with its
own gRPC server) and times greedy decoding with a KV cache three ways, interleaved round by round:

* ``local`` — the model's own tables;
* ``remote_serial`` — remote tables, each lookup awaited right where it is issued (block a);
* ``remote_overlapped`` — remote tables, lookup issued at block a and awaited after block b.

hidden_fraction = (serial - overlapped) / (serial - local). Writes benchmarks/results/overlap.json
and overlap.png.

    python benchmarks/overlap.py [--checkpoint artifacts/model] [--tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402
import torch  # noqa: E402
from common import plot_path, quick_mode, write_json  # noqa: E402

from ultramem_dist.cluster import ClusterValueStore, Deployer, PlacementOptions  # noqa: E402
from ultramem_dist.model import MemoryLM, load_pretrained, preset, save_pretrained  # noqa: E402
from ultramem_dist.store.export import export_checkpoint  # noqa: E402


class SerialBackend:
    """Waits for every lookup where it is issued: no overlap."""

    def __init__(self, inner: ClusterValueStore) -> None:
        self.inner = inner

    def submit(self, table_id: str, sel: object) -> Future:
        fut = self.inner.submit(table_id, sel)
        fut.result()
        return fut


def time_decode(model: MemoryLM, prompt: torch.Tensor, tokens: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = model.generate(prompt, tokens)
    return 1000 * (time.perf_counter() - t0) / tokens, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="trained checkpoint (default: a random-init tiny model)",
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run; results to a temp dir")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.rounds = 12, 1
        print(f"--quick: results go to {quick_mode()}")
    torch.set_num_threads(1)  # the model thread; shards get the other core
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            torch.manual_seed(0)
            ckpt = save_pretrained(MemoryLM(preset("tiny")), Path(tmp) / "ckpt")
        export_checkpoint(ckpt, Path(tmp) / "store", shards=2, by="row", version="bench")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            namespace="ultramem",
        )
        deployer = Deployer(PlacementOptions(drain_s=0.5))
        try:
            deployer.up(Path(tmp) / "store", replicas=1)
            local = load_pretrained(ckpt)
            remote = load_pretrained(ckpt)
            remote.drop_value_tables()
            backend = ClusterValueStore()
            prompt = torch.randint(
                0, 256, (args.batch, 8), generator=torch.Generator().manual_seed(0)
            )
            times: dict[str, list[float]] = {
                "local": [],
                "remote_serial": [],
                "remote_overlapped": [],
            }
            # warm up every path once
            remote.set_value_backend(backend)
            _, ref = time_decode(local, prompt, args.tokens)
            _, out = time_decode(remote, prompt, args.tokens)
            assert torch.equal(ref, out), "remote decoding differs from local"
            for _ in range(args.rounds):
                times["local"].append(time_decode(local, prompt, args.tokens)[0])
                remote.set_value_backend(SerialBackend(backend))
                times["remote_serial"].append(time_decode(remote, prompt, args.tokens)[0])
                remote.set_value_backend(backend)
                times["remote_overlapped"].append(time_decode(remote, prompt, args.tokens)[0])
            backend.close()
        finally:
            deployer.down()
            ray.shutdown()
    ms = {k: round(statistics.median(v), 3) for k, v in times.items()}
    extra = ms["remote_serial"] - ms["local"]
    hidden = (ms["remote_serial"] - ms["remote_overlapped"]) / extra if extra > 0 else 1.0
    path = write_json(
        "overlap.json",
        {
            "ms_per_token": ms,
            "hidden_fraction": round(hidden, 3),
            "batch": args.batch,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "samples_ms": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "setup": "tiny UltraMem (D=256, 6 blocks, skip 0:2,3:5), 2 row shards x 1 replica as "
            "Ray actors with their own grpc.aio servers, loopback, model thread 1 torch "
            "thread",
        },
    )
    print(ms, "hidden_fraction", round(hidden, 3), "->", path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(ms)
    ax.bar(names, [ms[n] for n in names], color=["#4c72b0", "#dd8452", "#55a868"])
    ax.set_ylabel("ms per decoded token (median)")
    ax.set_title(f"Skip-layer overlap hides {100 * hidden:.0f}% of remote lookup time")
    for i, n in enumerate(names):
        ax.text(i, ms[n], f"{ms[n]:.2f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(plot_path("overlap.png"), dpi=120)


if __name__ == "__main__":
    main()
