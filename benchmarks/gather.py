"""Gather-pool benchmark: kernel bandwidth vs memcpy, remote Gather latency vs a bare gRPC echo.

Usage::

    python benchmarks/gather.py            # full run (~3 minutes on 2 cores, V2 rows included)
    python benchmarks/gather.py --quick    # smaller table and fewer calls (smoke run)

Writes ``benchmarks/results/gather.json`` and ``benchmarks/results/gather.png``.

Kernel: ``gather_pool`` on a table much larger than the last-level cache (1M x 256 fp32 =
1 GiB), a batch of T queries x L = H*m random rows; GB/s counts the value-row bytes the kernel
reads (T * L * Dv * 4). Baseline: ``Tensor.copy_`` of a buffer of the same size, same torch
threads (GB/s of bytes copied). The bare ``F.embedding_bag`` on the same rows is reported too,
and so is ``gather_pool``'s torch path (``backend="torch"``: what autograd and GPUs use) beside
the native CPU path that ``backend="auto"`` picks.

RPC: real ``ultramem-dist serve-shard`` processes (the machine's cores split between the
shards of a configuration: ``--threads`` = cores / S) answering the product
client (``GatherClient``: split, encode, fan out, decode, sum/concat), one call in flight, sent
on its ``GatherStream`` streams (the default, ``p50_ms``) and as unary ``Gather`` calls
(``unary_p50_ms``); baseline: a bare grpc.aio echo server process (raw bytes, no protobuf, no
work) that gets requests of the same serialized size and answers replies of the same size,
fanned out to the same number of echo processes, as unary calls (``echo_p50_ms``, the baseline
of ``ratio_to_echo``) and as messages on one open stream per process (``echo_stream_p50_ms``,
``ratio_to_echo_stream``). The four series are interleaved call by call.

UltraMemV2 (``rpc_v2`` rows): the same shards also serve a shared table with pre-values
(``--pre-vdim`` wide, E = 1) as ``v2`` (1 shard), ``v2row`` and ``v2dim`` (2 shards); every
lookup carries ``pre_input`` float32 ``[T, pre_vdim]`` (whole to every shard called), and the
echo payloads have the same serialized sizes (pre_input included). Their DRAM floor counts the
value rows AND the pre-value rows read: ``batch * H*m * (Dv + pre_vdim) * 4`` bytes under row
sharding, the pre-value part once per shard under dim sharding (every dim shard holds the
pre-values whole and computes the activation itself).

Store dtype (``--dtypes``, default ``float32,bfloat16``): the RPC rows are measured for a store
exported in each dtype (every row has ``dtype``); bf16 rows read half the value bytes, so their
DRAM floor counts ``Dv * 2`` bytes per row (pre-values likewise).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ECHO_METHOD,
    ECHO_SERVER,
    ECHO_STREAM_METHOD,
    MAX_MSG,
    ReadyProcs,
    machine,
    today,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CLI = [sys.executable, "-c", "from ultramem_dist.cli import main; main()"]


# ------------------------------------------------------------------------------ kernel


def _interleaved_times(fns: dict, reps: int) -> dict[str, list[float]]:
    """Run every function ``reps`` times, interleaved, so load drift hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def _kernel_profile(fn, reps: int = 3) -> list[dict]:
    """Self-CPU share of the top aten ops inside one kernel call (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 3)} for e in top]


def bench_kernel(n_rows: int, dv: int, tokens: int, reps: int) -> dict:
    """GB/s of value rows read by ``gather_pool`` vs ``copy_`` of a buffer of the same size.

    On a shared machine the best (minimum) time of interleaved repetitions is the estimate of the
    uncontended speed; medians are reported alongside.
    """
    from ultramem_dist.kernels import gather_pool, native

    E, hc, L = 4, 2, 160  # released config: H=2, m=80, E=4, h_c=2
    g = torch.Generator().manual_seed(0)
    table = torch.empty(n_rows, dv)
    table.normal_(generator=g)
    idx = torch.randint(0, n_rows, (tokens, L), generator=g)
    blk = torch.randint(0, E, (tokens, L), generator=g)
    w = torch.randn(tokens, L, hc, generator=g)
    nbytes = tokens * L * dv * 4
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    flat = idx.reshape(-1)
    offsets = torch.arange(0, tokens * L, L)
    psw = w[..., 0].reshape(-1).contiguous()
    fns = {
        "gather": lambda: gather_pool(table, idx, blk, w, E),
        "torch_path": lambda: gather_pool(table, idx, blk, w, E, backend="torch"),
        "copy": lambda: dst.copy_(src),
        "bag": lambda: F.embedding_bag(flat, table, offsets, mode="sum", per_sample_weights=psw),
    }
    times = _interleaved_times(fns, reps)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "gather_gbps": round(nbytes / best["gather"] / 1e9, 3),
        "memcpy_gbps": round(nbytes / best["copy"] / 1e9, 3),
        "ratio": round(best["copy"] / best["gather"], 3),
        "embedding_bag_gbps": round(nbytes / best["bag"] / 1e9, 3),
        "backend": "native" if native.library() is not None else "torch",
        "torch_path_gbps": round(nbytes / best["torch_path"] / 1e9, 3),
        "median": {
            "gather_gbps": round(nbytes / med["gather"] / 1e9, 3),
            "memcpy_gbps": round(nbytes / med["copy"] / 1e9, 3),
            "embedding_bag_gbps": round(nbytes / med["bag"] / 1e9, 3),
        },
        "gather_ms": round(best["gather"] * 1e3, 3),
        "torch_path_profile": _kernel_profile(fns["torch_path"]),
        "table": [n_rows, dv],
        "tokens": tokens,
        "rows_per_token": L,
        "bytes_read": nbytes,
        "threads": torch.get_num_threads(),
        "estimator": f"best of {reps} interleaved runs",
    }


# ------------------------------------------------------------------------------ rpc bench


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _bench_config(
    targets: list[str],
    echo_targets: list[str],
    table: str,
    batches: list[int],
    calls: int,
    spec: dict,
) -> list[dict]:
    from ultramem_dist.client import ChannelOptions, GatherClient
    from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb

    client = await GatherClient.connect(",".join(targets), deadline_s=30)  # streams (default)
    unary = await GatherClient.connect(
        ",".join(targets), deadline_s=30, options=ChannelOptions(streaming=False)
    )
    t = client.table(table)
    echo_channels = [
        grpc.aio.insecure_channel(
            e,
            options=[
                ("grpc.max_receive_message_length", MAX_MSG),
                ("grpc.max_send_message_length", MAX_MSG),
            ],
        )
        for e in echo_targets
    ]
    echo_calls = [ch.unary_unary(ECHO_METHOD) for ch in echo_channels]
    echo_streams = [ch.stream_stream(ECHO_STREAM_METHOD)() for ch in echo_channels]
    rows = []
    g = torch.Generator().manual_seed(1)
    L = spec["heads"] * spec["topm"]
    for batch in batches:
        queries = []
        for _ in range(4):
            idx = torch.randint(0, t.n_rows, (batch, L), generator=g)
            blk = torch.randint(0, t.expansion, (batch, L), generator=g)
            w = torch.randn(batch, L, t.num_cores, generator=g)
            # UltraMemV2 tables: each token's pre-value input travels with the lookup
            pre = torch.randn(batch, t.pre_vdim, generator=g) if t.pre_vdim else None
            queries.append((idx, blk, w, pre))
        # Echo payloads with the serialized sizes of the real per-shard requests and replies.
        _, shard_reqs = client.prepare(table, *queries[0])  # the requests the client sends
        echo_payloads = []
        for k, req in shard_reqs:
            width = t.cols[k][1] - t.cols[k][0]
            reply = pb.GatherReply(table_id=table, table_version=client.version, shard_index=k)
            reply.pooled.dtype = pb.DTYPE_FLOAT32
            reply.pooled.shape[:] = [batch, t.expansion, width]
            reply.pooled.data = bytes(batch * t.expansion * width * 4)
            size = req.gather.ByteSize()  # what a unary Gather carries
            payload = reply.ByteSize().to_bytes(8, "little") + bytes(max(0, size - 8))
            echo_payloads.append(payload)

        async def one_gather(i: int, queries=queries, c=client) -> float:
            q = queries[i % len(queries)]
            t0 = time.perf_counter()
            await c.gather(table, *q[:3], pre_input=q[3])
            return time.perf_counter() - t0

        async def one_echo(i: int, payloads=echo_payloads) -> float:
            t0 = time.perf_counter()
            await asyncio.gather(*(echo_calls[k](p, timeout=30) for k, p in enumerate(payloads)))
            return time.perf_counter() - t0

        async def one_echo_stream(i: int, payloads=echo_payloads) -> float:
            async def round_trip(k: int, p: bytes) -> None:
                await echo_streams[k].write(p)
                await echo_streams[k].read()

            t0 = time.perf_counter()
            await asyncio.gather(*(round_trip(k, p) for k, p in enumerate(payloads)))
            return time.perf_counter() - t0

        series = {
            "stream": one_gather,
            "unary": functools.partial(one_gather, c=unary),
            "echo": one_echo,
            "echo_stream": one_echo_stream,
        }
        for i in range(10):  # warm-up (connections, page cache, allocator)
            for fn in series.values():
                await fn(i)
        times: dict[str, list[float]] = {name: [] for name in series}
        for i in range(calls):  # interleave so drift hits every series equally
            for name, fn in series.items():
                times[name].append(await fn(i))
        gather_t, echo_t = times["stream"], times["echo"]
        p50, p99, e50 = _pct(gather_t, 0.5), _pct(gather_t, 0.99), _pct(echo_t, 0.5)
        u50, es50 = _pct(times["unary"], 0.5), _pct(times["echo_stream"], 0.5)
        v2 = {"kind": "ultramemv2", "pre_vdim": t.pre_vdim} if t.pre_vdim else {}
        rows.append(
            {
                "batch": batch,
                "shards": len(targets),
                "sharding": t.sharding,
                **v2,
                "p50_ms": round(p50 * 1e3, 3),
                "p99_ms": round(p99 * 1e3, 3),
                "echo_p50_ms": round(e50 * 1e3, 3),
                "echo_p99_ms": round(_pct(echo_t, 0.99) * 1e3, 3),
                "ratio_to_echo": round(p50 / e50, 3),
                "unary_p50_ms": round(u50 * 1e3, 3),
                "unary_ratio_to_echo": round(u50 / e50, 3),
                "echo_stream_p50_ms": round(es50 * 1e3, 3),
                "ratio_to_echo_stream": round(p50 / es50, 3),
                "request_bytes": sum(r.gather.ByteSize() for _, r in shard_reqs),
                "reply_bytes": batch * t.expansion * t.out_width * 4,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    await client.close()
    await unary.close()
    for call in echo_streams:
        call.cancel()
    for ch in echo_channels:
        await ch.close()
    return rows


def bench_rpc(
    n_rows: int,
    dv: int,
    batches: list[int],
    calls: int,
    workdir: Path,
    pre_vdim: int = 64,
    dtype: str = "float32",
) -> list[dict]:
    """Rows of every configuration: v1 tables (``t``; ``row``, ``dim``), then the UltraMemV2
    shared table with ``pre_vdim``-wide pre-values (``v2``; ``v2row``, ``v2dim``), from a
    store exported in ``dtype``; every row is tagged with it."""
    from ultramem_dist.store import TableSpec, export_tables

    spec = {"expansion": 4, "num_cores": 2, "topm": 80, "heads": 2, "d_model": 2 * dv}
    g = torch.Generator().manual_seed(0)
    values = torch.randn(n_rows, dv, generator=g) * 0.02
    table = TableSpec(values=values, **spec)
    pre = torch.randn(n_rows, pre_vdim, generator=g) * 0.02
    shared = TableSpec(values=values, pre_values=pre, **{**spec, "expansion": 1})
    s1, s2 = workdir / "s1", workdir / "s2"
    export_tables({"t": table, "v2": shared}, s1, shards=1, by="row", version="b1", dtype=dtype)
    export_tables(
        {"row": table, "dim": table, "v2row": shared, "v2dim": shared},
        s2,
        shards=2,
        by={"row": "row", "dim": "dim", "v2row": "row", "v2dim": "dim"},
        version="b2",
        dtype=dtype,
    )
    del values, table, pre, shared
    with ReadyProcs(workdir) as procs:
        # kernel threads: the machine's cores split between the shards of a configuration
        cores = os.cpu_count() or 1
        for store, k, threads in ((s1, 0, cores), (s2, 0, cores // 2), (s2, 1, cores // 2)):
            args = [*CLI, "serve-shard", str(store), "--shard", str(k)]
            args += ["--threads", str(max(1, threads))]
            procs.spawn(args, f"{store.name}-{k}")
        for k in range(2):
            procs.spawn(ECHO_SERVER, f"echo-{k}")
        tgt = procs.targets()
        rows = []
        rows += asyncio.run(_bench_config([tgt[0]], [tgt[3]], "t", batches, calls, spec))
        rows += asyncio.run(_bench_config(tgt[1:3], tgt[3:5], "row", batches, calls, spec))
        rows += asyncio.run(_bench_config(tgt[1:3], tgt[3:5], "dim", batches, calls, spec))
        rows += asyncio.run(_bench_config([tgt[0]], [tgt[3]], "v2", batches, calls, spec))
        rows += asyncio.run(_bench_config(tgt[1:3], tgt[3:5], "v2row", batches, calls, spec))
        rows += asyncio.run(_bench_config(tgt[1:3], tgt[3:5], "v2dim", batches, calls, spec))
        for r in rows:
            r["dtype"] = dtype
        return rows


def add_bandwidth_floor(
    rows: list[dict], copy_gbps: float, rows_per_token: int, dv: int, pre_vdim: int = 0
) -> None:
    """Add what no implementation can beat on this machine: the echo's transport time plus
    reading the batch's value rows (``batch * H*m * Dv * b`` bytes, ``b`` = 4 for a float32
    row, 2 for a bfloat16/float16 one (its ``dtype``), from a table far larger than
    the caches, over all shards) at the ``copy_`` bandwidth measured above. With ``pre_vdim``
    (UltraMemV2 rows) the pre-value rows read count too: ``batch * H*m * pre_vdim * 4`` bytes,
    times the shard count under dim sharding (each dim shard reads every selected row's
    pre-values)."""
    for r in rows:
        item = 2 if r.get("dtype") in ("bfloat16", "float16") else 4
        nbytes = r["batch"] * rows_per_token * dv * item
        if pre_vdim:
            copies = r["shards"] if r["sharding"] == "dim" else 1
            r["pre_values_read_bytes"] = r["batch"] * rows_per_token * pre_vdim * item * copies
            nbytes += r["pre_values_read_bytes"]
        floor_ms = r["echo_p50_ms"] + nbytes / (copy_gbps * 1e9) * 1e3
        r["rows_read_bytes"] = nbytes
        r["floor_ms"] = round(floor_ms, 3)
        r["floor_ratio_to_echo"] = round(floor_ms / r["echo_p50_ms"], 3)
        r["ratio_to_floor"] = round(r["p50_ms"] / floor_ms, 3)


# ------------------------------------------------------------------------------ plot


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.2))
    key = lambda r: (r["shards"], r["sharding"], r.get("dtype", "float32"))  # noqa: E731
    configs = sorted({key(r) for r in result["rpc"]})
    for shards, sharding, dtype in configs:
        rs = [r for r in result["rpc"] if key(r) == (shards, sharding, dtype)]
        sharding = f"{sharding} {dtype}"
        b = [r["batch"] for r in rs]
        (line,) = ax1.plot(
            b, [r["p50_ms"] for r in rs], marker="o", label=f"stream S={shards} {sharding} p50"
        )
        c = line.get_color()
        if "unary_p50_ms" in rs[0]:
            ax1.plot(b, [r["unary_p50_ms"] for r in rs], marker="x", lw=0.8, color=c,
                     label=f"unary S={shards} {sharding} p50")  # fmt: skip
            ax1.plot(b, [r["echo_stream_p50_ms"] for r in rs], ls=":", color=c,
                     label=f"stream echo S={shards} p50")  # fmt: skip
        ax1.plot(b, [r["echo_p50_ms"] for r in rs], ls="--", color=c,
                 label=f"echo S={shards} p50")  # fmt: skip
        ax2.plot(b, [r["ratio_to_echo"] for r in rs], marker="o", color=c,
                 label=f"S={shards} {sharding} (stream)")  # fmt: skip
        if "unary_ratio_to_echo" in rs[0]:
            ax2.plot(b, [r["unary_ratio_to_echo"] for r in rs], marker="x", lw=0.8, color=c,
                     label=f"S={shards} {sharding} (unary)")  # fmt: skip
        if "floor_ratio_to_echo" in rs[0]:
            ax2.plot(
                b,
                [r["floor_ratio_to_echo"] for r in rs],
                ls=":",
                color=line.get_color(),
                label=f"floor S={shards} {sharding} (echo + rows read at copy_ GB/s)",
            )
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="batch (queries, L=160 rows each)",
        ylabel="latency (ms)",
        title="Remote gather (stream / unary) vs bare gRPC echo (unary / stream)",
    )
    ax1.legend(fontsize=6, ncol=2)
    ax2.axhline(1.5, color="grey", ls=":", label="target 1.5x")
    ax2.set(
        xscale="log",
        xlabel="batch",
        ylabel="gather p50 / unary echo p50",
        title="Overhead over transport floor",
    )
    ax2.legend(fontsize=6)
    k = result["kernel"]
    fig.suptitle(
        f"kernel: gather_pool {k['gather_gbps']} GB/s vs copy_ {k['memcpy_gbps']} GB/s "
        f"(ratio {k['ratio']}); bare embedding_bag {k['embedding_bag_gbps']} GB/s",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default: benchmarks/results; --quick: a temp dir)",
    )
    parser.add_argument("--calls", type=int, help="calls per point (default 400; quick 30)")
    parser.add_argument(
        "--batches", help="comma-separated batch sizes (default 1,4,16,64,256; quick 1,16,64)"
    )
    parser.add_argument(
        "--pre-vdim", type=int, default=64, help="UltraMemV2 pre-value width of the rpc_v2 rows"
    )
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help="store dtypes of the RPC rows (comma list)"
    )
    args = parser.parse_args()
    t0 = time.time()
    load_before = os.getloadavg()[0]
    if args.quick:
        kernel = bench_kernel(200_000, 256, 64, 3)
        batches, calls, rpc_rows = [1, 16, 64], 30, 65_536
    else:
        kernel = bench_kernel(1_000_000, 256, 512, 15)
        batches, calls, rpc_rows = [1, 4, 16, 64, 256], 400, 262_144
    calls = args.calls or calls
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    print(json.dumps({"kernel": kernel}), flush=True)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad or not dtypes:
        parser.error(f"--dtypes: {bad or dtypes}; expected float32, bfloat16 and/or float16")
    rows = []
    for dtype in dtypes:
        with tempfile.TemporaryDirectory(prefix="gather-bench-") as tmp:
            rows += bench_rpc(rpc_rows, 256, batches, calls, Path(tmp), args.pre_vdim, dtype)
    rpc = [r for r in rows if "pre_vdim" not in r]
    rpc_v2 = [r for r in rows if "pre_vdim" in r]
    add_bandwidth_floor(rpc, kernel["memcpy_gbps"], rows_per_token=2 * 80, dv=256)
    add_bandwidth_floor(
        rpc_v2, kernel["memcpy_gbps"], rows_per_token=2 * 80, dv=256, pre_vdim=args.pre_vdim
    )
    result = {
        "date": today(),
        "machine": machine(),
        "kernel": kernel,
        "rpc": rpc,
        "rpc_v2": rpc_v2,
        "config": {
            "rpc_table": [rpc_rows, 256],
            "rpc_v2_table": [rpc_rows, 256, args.pre_vdim],  # rows, Dv, pre_vdim (E = 1)
            "E": 4,
            "h_c": 2,
            "H": 2,
            "m": 80,
            "calls_per_point": calls,
            "quick": args.quick,
            "wall_s": round(time.time() - t0, 1),
            # 1-minute load average: other jobs on a shared machine inflate every number
            "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
    }
    out = args.out or (Path(tempfile.mkdtemp(prefix="gather-quick-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gather.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "gather.png")
    print(f"wrote {out / 'gather.json'} and gather.png in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
