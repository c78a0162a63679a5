"""How much remote lookup latency the skip-layer overlap hides during decoding.

Serves a tiny UltraMem model's tables from Ray shard actors (1 and 2 shards × 1 replica, each
with its own gRPC server) and times greedy decoding with a KV cache three ways, interleaved round
by round, for two model shapes (``--shapes``: the blocks between a memory layer's read and its
use, 2 as in the tiny preset and 3 as in the released UltraMem config):

* ``local`` — the model's own tables;
* ``remote_serial`` — remote tables, each lookup awaited right where it is issued (block a);
* ``remote_overlapped`` — remote tables, lookup issued at block a and awaited after block b.

Shape ``v2`` is the tiny UltraMemV2 (``preset("tiny", "ultramemv2")``: 6 blocks, a memory layer
beside every block's FFN, one shared table with pre-values). Its lookup carries the selection
AND ``pre_input`` (both ready after the block's attention); it is issued before the block's FFN
and awaited after it, so only that FFN can hide it (v1 hides it behind whole blocks).

Client variants (``--transports``): ``process`` (the default of ``ClusterValueStore``: the gRPC
client runs in a lookup process) and ``thread`` (the client on an asyncio thread of the decoding
process, sharing its GIL), each sending its gathers on ``GatherStream`` streams (the default);
the suffix ``-unary`` (e.g. ``process-unary``) sends unary ``Gather`` calls instead.

hidden_fraction = (serial - overlapped) / (serial - local). Writes benchmarks/results/overlap.json
and overlap.png.

    python benchmarks/overlap.py [--checkpoint artifacts/model] [--tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    ECHO_SERVER,
    ReadyProcs,
    echo_latencies,
    plot_path,
    quick_mode,
    write_json,
)

from ultramem_dist.client import ChannelOptions  # noqa: E402
from ultramem_dist.client.process_store import TRANSPORTS  # noqa: E402
from ultramem_dist.cluster import ClusterValueStore, Deployer, PlacementOptions  # noqa: E402
from ultramem_dist.model import (  # noqa: E402
    LMConfig,
    MemoryLM,
    load_pretrained,
    preset,
    save_pretrained,
)
from ultramem_dist.store.export import export_checkpoint  # noqa: E402

# Model shapes: the tiny preset's width everywhere; what changes is how many blocks run between
# a memory layer's read (block a) and its use (after block b), i.e. the compute that can hide
# the remote lookup. span2 is the tiny preset; span3 is the released UltraMem config's span
# ("2:5/6:9/10:13/14:17": 3 blocks between read and write).
UNARY = "-unary"  # client variant suffix: unary Gather calls instead of GatherStream

SHAPES: dict[str, tuple[int, str]] = {
    "span2": (6, "0:2,3:5"),
    "span3": (8, "0:3,4:7"),
    "v2": (6, "every block"),  # UltraMemV2 tiny: the lookup overlaps its own block's FFN
}


def shape_config(name: str) -> LMConfig:
    layers, spec = SHAPES[name]
    if name == "v2":
        return preset("tiny", "ultramemv2")
    return dataclasses.replace(preset("tiny"), n_layers=layers, memory_spec=spec)


def lookups_per_token(cfg: LMConfig) -> int:
    """Remote lookups one decoding step makes (one per memory layer)."""
    if cfg.kind == "ultramemv2":
        return len(cfg.ultramemv2.layer_blocks(cfg.n_layers))
    return len(cfg.memory_pairs())


def memory_layout(cfg: LMConfig) -> str:
    """Where the memory layers sit: the v1 skip spec, or UltraMemV2's blocks."""
    if cfg.kind == "ultramemv2":
        return f"v2 beside the FFN of blocks {cfg.ultramemv2.layer_blocks(cfg.n_layers)}"
    return cfg.memory_spec


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


def echo_at_cadence(cfg: LMConfig, batch: int, local_ms_per_token: float, workdir: Path) -> dict:
    """A bare gRPC echo with a lookup's request/reply sizes, timed back to back and with the idle
    time a decoding model leaves between its lookups (local ms per token / memory layers): the
    transport's own share of a lookup at decoding cadence, with no ultramem code involved."""
    import asyncio

    v2 = cfg.kind == "ultramemv2"
    mem = cfg.ultramemv2 if v2 else cfg.ultramem
    entries = batch * mem.heads * mem.topm
    request_bytes = 60 + entries * (4 + 4 + 4 * mem.num_cores)  # ids, blocks, weights + headers
    expansion = 1 if v2 else mem.expansion  # V2 sums its IVE blocks: one pooled block
    if v2:
        request_bytes += 8 + batch * mem.pre_vdim * 4  # pre_input float32 [T, pre_vdim]
    reply_bytes = batch * expansion * (mem.dv or cfg.d_model // 2) * 4
    gap_ms = local_ms_per_token / max(1, lookups_per_token(cfg))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, ReadyProcs(Path(tmp)) as procs:
        procs.spawn(ECHO_SERVER, "echo")
        target = procs.targets()[0]
        out = {
            "gap_ms": round(gap_ms, 3),
            "request_bytes": request_bytes,
            "reply_bytes": reply_bytes,
        }
        for name, gap in (("back_to_back_ms", 0.0), ("at_cadence_ms", gap_ms / 1e3)):
            lat = asyncio.run(echo_latencies(target, request_bytes, reply_bytes, 300, gap))
            out[name] = round(statistics.median(lat) * 1e3, 3)
    return out


def measure(
    ckpt: Path,
    store: Path,
    transports: list[str],
    args: argparse.Namespace,
    placement: PlacementOptions | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Deploy ``store`` (1 replica per shard) and time local decoding and, per client
    transport, the two remote modes, all interleaved round by round. ``placement``: where the
    replicas go (default: this machine's loopback; benchmarks/multihost.py passes its hosts)."""
    deployer = Deployer(placement or PlacementOptions(drain_s=0.5))
    deployer.up(store, replicas=1)
    local = load_pretrained(ckpt)
    remote = load_pretrained(ckpt)
    remote.drop_value_tables()
    prompt = torch.randint(0, 256, (args.batch, 8), generator=torch.Generator().manual_seed(0))
    times = {t: {"local": [], "remote_serial": [], "remote_overlapped": []} for t in transports}
    with contextlib.ExitStack() as stack:
        backends = {
            t: stack.enter_context(
                ClusterValueStore(
                    transport=t.removesuffix(UNARY),
                    options=ChannelOptions(streaming=not t.endswith(UNARY)),
                )
            )
            for t in transports
        }
        _, ref = time_decode(local, prompt, args.tokens)
        for backend in backends.values():  # warm up every path once, check equality
            remote.set_value_backend(backend)
            _, out = time_decode(remote, prompt, args.tokens)
            assert torch.equal(ref, out), "remote decoding differs from local"
        for _ in range(args.rounds):
            ms_local = time_decode(local, prompt, args.tokens)[0]
            for t, backend in backends.items():
                times[t]["local"].append(ms_local)
                remote.set_value_backend(SerialBackend(backend))
                times[t]["remote_serial"].append(time_decode(remote, prompt, args.tokens)[0])
                remote.set_value_backend(backend)
                times[t]["remote_overlapped"].append(time_decode(remote, prompt, args.tokens)[0])
    return times


def hidden_fraction(times: dict[str, list[float]]) -> tuple[dict[str, float], float]:
    """Median ms/token of each mode and the hidden fraction (serial - overlapped) /
    (serial - local) of one :func:`measure` transport (1.0 when remote costs nothing extra)."""
    ms = {k: round(statistics.median(v), 3) for k, v in times.items()}
    extra = ms["remote_serial"] - ms["local"]
    saved = ms["remote_serial"] - ms["remote_overlapped"]
    return ms, (saved / extra if extra > 0 else 1.0)


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
    parser.add_argument(
        "--shards", default="1,2", help="comma-separated shard counts; the first is the headline"
    )
    parser.add_argument("--by", default="row", choices=["row", "dim"])
    parser.add_argument(
        "--transports",
        default="process,process-unary,thread",
        help="comma-separated client variants (process, thread; suffix -unary: no streams); "
        "the first is the headline",
    )
    parser.add_argument(
        "--shapes",
        default="span2,span3,v2",
        help=f"comma-separated model shapes ({', '.join(SHAPES)}; v2: UltraMemV2 tiny); the "
        "first is the headline",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=0.0,
        help="sys.setswitchinterval for the worker (0: Python default 5 ms)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run; results to a temp dir")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.rounds = 12, 1
        print(f"--quick: results go to {quick_mode()}")
    torch.set_num_threads(1)  # the model thread; shards get the other core
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    configs = [int(x) for x in args.shards.split(",")]
    transports = [x.strip() for x in args.transports.split(",")]
    if unknown := [x for x in transports if x.removesuffix(UNARY) not in TRANSPORTS]:
        parser.error(f"unknown transport(s) {unknown}; choose from {list(TRANSPORTS)} (+{UNARY})")
    shapes = [x.strip() for x in args.shapes.split(",")]
    if unknown := [x for x in shapes if x not in SHAPES]:
        parser.error(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    if args.checkpoint is not None:
        shapes = ["checkpoint"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpts: dict[str, Path] = {}
        for shape in shapes:
            if shape == "checkpoint":
                ckpts[shape] = args.checkpoint
                continue
            torch.manual_seed(0)
            ckpts[shape] = save_pretrained(MemoryLM(shape_config(shape)), Path(tmp) / shape)
        ray.init(
            address="local",  # never attach to a cluster someone else started
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            namespace="ultramem",
        )
        try:
            for shape, shards in [(sh, n) for sh in shapes for n in configs]:
                ckpt = ckpts[shape]
                store = Path(tmp) / f"store-{shape}-{shards}"
                export_checkpoint(ckpt, store, shards=shards, by=args.by, version="bench")
                by_transport = measure(ckpt, store, transports, args)
                cfg = load_pretrained(ckpt).cfg
                lookups = lookups_per_token(cfg)
                ms_local = statistics.median(by_transport[transports[0]]["local"])
                echo = echo_at_cadence(cfg, args.batch, ms_local, Path(tmp))
                for transport, times in by_transport.items():
                    ms, hidden = hidden_fraction(times)
                    extra = ms["remote_serial"] - ms["local"]
                    results.append(
                        {
                            "shape": shape,
                            "layers": cfg.n_layers,
                            "kind": cfg.kind,
                            "memory_spec": memory_layout(cfg),
                            "shards": shards,
                            "sharding": args.by,
                            "transport": transport,
                            "ms_per_token": ms,
                            "hidden_fraction": round(hidden, 3),
                            # one lookup's extra time in serial decoding, and a bare echo's
                            "lookup_ms_serial": round(extra / lookups, 3),
                            "echo": echo,
                            "samples_ms": {k: [round(x, 3) for x in v] for k, v in times.items()},
                        }
                    )
                    print(shape, shards, "shard(s),", transport, ms, "hidden", round(hidden, 3))
                print("echo", echo, flush=True)
        finally:
            Deployer().down()
            ray.shutdown()
    head = results[0]
    path = write_json(
        "overlap.json",
        {
            "ms_per_token": head["ms_per_token"],
            "hidden_fraction": head["hidden_fraction"],
            "headline_config": f"{head['shape']} ({head['layers']} blocks, skip "
            f"{head['memory_spec']}), {head['shards']} {args.by} shard(s) x 1 replica, "
            f"{head['transport']} transport",
            "batch": args.batch,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "configs": results,
            "setup": "random-init UltraMem of the tiny preset's width (D=256) decoding with a KV "
            "cache; shapes differ in the blocks between a memory layer's read and use (span2: 6 "
            "blocks, skip 0:2,3:5 = the tiny preset; span3: 8 blocks, skip 0:3,4:7 = the released "
            "config's span; v2: the tiny UltraMemV2, 6 blocks with a memory layer each, one "
            "shared table with pre-values, every lookup carrying pre_input and overlapping only "
            "its own block's FFN); value shards as Ray actors with their own grpc.aio servers on "
            "loopback; model thread uses 1 torch thread; client transport 'process' = gRPC client "
            "in a lookup process (ClusterValueStore's default), 'thread' = asyncio client on a "
            "thread of the decoding process, both on GatherStream streams ('-unary': unary "
            "Gather calls); local/serial/overlapped interleaved round by round",
        },
    )
    print("->", path)
    plot(results, args.batch, plot_path("overlap.png"))


def plot(results: list[dict], batch: int, path: Path) -> None:
    """Bars of ms per token for every configuration: one colour per (shape, shards), one hatch
    per client variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    modes = ["local", "remote_serial", "remote_overlapped"]
    width = 0.8 / len(results)
    groups = list(dict.fromkeys((r["shape"], r["shards"]) for r in results))
    variants = list(dict.fromkeys(r["transport"] for r in results))
    colors = plt.get_cmap("tab10").colors
    hatches = ["", "//", "..", "xx", "\\\\"]
    for j, r in enumerate(results):
        xs = [i + (j - (len(results) - 1) / 2) * width for i in range(len(modes))]
        vals = [r["ms_per_token"][m] for m in modes]
        ax.bar(
            xs,
            vals,
            width,
            color=colors[groups.index((r["shape"], r["shards"])) % len(colors)],
            hatch=hatches[variants.index(r["transport"]) % len(hatches)],
            edgecolor="white",
            label=f"{r['shape']}, {r['shards']} shard(s), {r['transport']}: "
            f"{100 * r['hidden_fraction']:.0f}% hidden",
        )
        for x, v in zip(xs, vals, strict=True):
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("ms per decoded token (median)")
    ax.set_title(f"Skip-layer overlap, batch {batch} (2-core CPU)")
    top = max(r["ms_per_token"][m] for r in results for m in modes)
    ax.set_ylim(0, top * 1.5)  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
