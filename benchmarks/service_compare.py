"""Gather service vs the alternatives: our shard gRPC server, a Ray actor, Ray Serve, a gRPC echo.

Usage::

    python benchmarks/service_compare.py            # full run (~3 minutes on 2 cores)
    python benchmarks/service_compare.py --quick    # smaller table, short windows (smoke run)
    python benchmarks/service_compare.py --shard-args --kernel-workers 0   # server options

Writes ``benchmarks/results/service_compare.json`` and ``service_compare.png`` (``--quick``: a
temp directory unless ``--out`` is given).

The same lookup workload — batches of T queries x L = H*m = 160 random rows (E = 4 IVE blocks,
h_c = 2 MCS cores) over one ``N x 256`` fp32 value shard — goes through four paths, all on
loopback, all servers with one kernel thread:

* ``grpc_shard`` — an ``ultramem-dist serve-shard`` process answered through the product client
  (:class:`~ultramem_dist.client.GatherClient`: encode, call, check, decode; with its defaults,
  so its gathers travel on ``GatherStream`` streams);
* ``ray_actor`` — a plain (sync) Ray actor holding the same mmap'd shard; its method calls the
  same kernel (``gather_pool``) and returns the pooled tensor; driven with ``ray.get`` /
  ``ray.wait``. Tensors travel as numpy arrays (``torch.from_numpy`` views on both sides): passing
  torch tensors through Ray costs ~6 ms more per call on this machine, so the baseline gets the
  fast transport (no request validation either: the bare kernel call);
* ``ray_serve_grpc`` — a Ray Serve deployment with a ``Gather`` method (decode + validate + the
  same kernel + encode, the shard server's code) behind Ray Serve's gRPC proxy
  (``gRPCOptions(grpc_servicer_functions=[...add_GatherPoolServicer_to_server])``), called with
  our generated stub;
* ``grpc_shard_bf16`` — the same as ``grpc_shard`` over a **bfloat16** export of the same values
  (``export``'s default dtype: half the bytes per row read; the reply is fp32 either way);
* ``grpc_echo`` — a bare ``grpc.aio`` echo process that receives and returns raw bytes of the
  same sizes as a Gather request and reply (no protobuf, no work): the transport floor.

Each (path, in-flight) point is measured in interleaved rounds (every path once per round) so that
load drift on a shared machine hits all paths alike; latencies are per call, QPS is calls over the
summed window time. Only the ratios are meant to travel to other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ECHO_METHOD, ECHO_SERVER, MAX_MSG, ReadyProcs, save  # noqa: E402

from ultramem_dist.reliability.procs import cpu_seconds, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CLI = [sys.executable, "-c", "from ultramem_dist.cli import main; main()"]
GRPC_OPTS = [
    ("grpc.max_receive_message_length", MAX_MSG),
    ("grpc.max_send_message_length", MAX_MSG),
]
SERVE_APP = "ultramem_bench"
SERVICER_FN = "ultramem_dist.proto.ultramem.v1.gather_pb2_grpc.add_GatherPoolServicer_to_server"
PATHS = ("grpc_shard", "grpc_shard_bf16", "ray_actor", "ray_serve_grpc", "grpc_echo")
SPEC = {"expansion": 4, "num_cores": 2, "topm": 80, "heads": 2}
TABLE = "t"

Query = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------ workload


def make_queries(n_rows: int, batch: int, count: int, seed: int = 1) -> list[Query]:
    g = torch.Generator().manual_seed(seed)
    L = SPEC["heads"] * SPEC["topm"]
    return [
        (
            torch.randint(0, n_rows, (batch, L), generator=g),
            torch.randint(0, SPEC["expansion"], (batch, L), generator=g),
            torch.randn(batch, L, SPEC["num_cores"], generator=g),
        )
        for _ in range(count)
    ]


def build_request(version: str, q: Query) -> Any:
    """The same ``GatherRequest`` the product client sends for a one-shard table."""
    from ultramem_dist._private.codec import encode_tensor
    from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb

    req = pb.GatherRequest(table_id=TABLE, table_version=version)
    encode_tensor(q[0].to(torch.int32), req.indices)
    encode_tensor(q[1].to(torch.int32), req.blocks)
    encode_tensor(q[2], req.weights)
    return req


def reference(store: Path, q: Query) -> torch.Tensor:
    from ultramem_dist.kernels import gather_pool
    from ultramem_dist.store.reader import load_shard

    t = load_shard(store, 0).tables[TABLE]
    return gather_pool(t.values, q[0], q[1], q[2], SPEC["expansion"], segments=t.segments)


# ------------------------------------------------------------------------------ Ray paths


def _ray_classes() -> tuple[Any, Any]:
    """The Ray actor and Ray Serve deployment (defined lazily: importing Ray is slow)."""
    import ray
    from ray import serve

    @ray.remote(num_cpus=0)
    class KernelActor:
        """Plain sync actor: the shard's table and the shared kernel, nothing else."""

        def __init__(self, store: str) -> None:
            from ultramem_dist.store.reader import load_shard

            torch.set_num_threads(1)
            self.table = load_shard(store, 0).tables[TABLE]

        def gather(self, idx: Any, blk: Any, w: Any) -> Any:
            """numpy in, numpy out: Ray moves ndarrays far cheaper than torch tensors (whose
            pickling added ~6 ms per call here), so the baseline gets the fast transport."""
            from ultramem_dist.kernels import gather_pool

            t = self.table
            out = gather_pool(
                t.values,
                torch.from_numpy(idx),
                torch.from_numpy(blk),
                torch.from_numpy(w),
                t.entry.expansion,
                segments=t.segments,
            )
            return out.numpy()

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    class GatherDeployment:
        """``ultramem.v1.GatherPool/Gather`` as a Serve deployment (the shard server's code)."""

        def __init__(self, store: str) -> None:
            from ultramem_dist.serving.servicer import kernel_plan
            from ultramem_dist.serving.validate import Limits
            from ultramem_dist.store.reader import load_shard

            torch.set_num_threads(1)
            self.shard = load_shard(store, 0)
            self.limits = Limits(4096, 1024)
            self.plans = {tid: kernel_plan(t) for tid, t in self.shard.tables.items()}

        def Gather(self, request: Any) -> Any:  # noqa: N802 (gRPC method name)
            from ultramem_dist._private.codec import encode_array
            from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
            from ultramem_dist.serving.servicer import run_kernel
            from ultramem_dist.serving.validate import decode_request

            q = decode_request(request, self.shard, self.limits)
            reply = pb.GatherReply(
                table_id=request.table_id,
                table_version=self.shard.manifest.version,
                shard_index=self.shard.shard,
            )
            encode_array(run_kernel(q, self.plans[request.table_id]), reply.pooled)
            return reply

    return KernelActor, GatherDeployment


class RayPaths:
    """A private local Ray instance with the actor and the Serve app; :meth:`close` tears down."""

    def __init__(self, store: Path) -> None:
        import ray
        from ray import serve
        from ray.serve.config import gRPCOptions

        ray.init(
            address="local",  # never attach to a cluster someone else started on this machine
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
        self.ray = ray
        self.serve = serve
        actor_cls, deployment = _ray_classes()
        self.actor = actor_cls.remote(str(store))
        ray.get(self.actor.__ray_ready__.remote())
        self.grpc_port = free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options=gRPCOptions(port=self.grpc_port, grpc_servicer_functions=[SERVICER_FN]),
        )
        # an app without a route prefix never enters the proxies' route table (gRPC too)
        serve.run(deployment.bind(str(store)), name=SERVE_APP, route_prefix=f"/{SERVE_APP}")
        self._wait_routable()

    def _wait_routable(self, timeout: float = 60.0) -> None:
        """Serve marks an app ready before its gRPC proxy routes to it: poll until it does."""
        from ray.serve.generated import serve_pb2, serve_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            stub = serve_pb2_grpc.RayServeAPIServiceStub(channel)
            while True:
                try:
                    apps = stub.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=5)
                    if SERVE_APP in apps.application_names:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("Ray Serve's gRPC proxy never routed to the benchmark app")
                time.sleep(0.2)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.serve.shutdown()
        self.ray.shutdown()


def ray_actor_call(actor: Any, q: Query) -> Any:
    """Submit one lookup: the query tensors go as numpy views (zero-copy on this side)."""
    return actor.gather.remote(q[0].numpy(), q[1].numpy(), q[2].numpy())


def ray_actor_window(actor: Any, queries: list[Query], inflight: int, calls: int) -> list[float]:
    """Latencies of ``calls`` actor calls with ``inflight`` outstanding (``ray.wait`` driven);
    each reply becomes a tensor (``torch.from_numpy``, no copy) like the other paths' replies."""
    import ray

    lat: list[float] = []
    if inflight == 1:
        for i in range(calls):
            t0 = time.perf_counter()
            torch.from_numpy(ray.get(ray_actor_call(actor, queries[i % len(queries)])))
            lat.append(time.perf_counter() - t0)
        return lat
    pending: dict[Any, float] = {}
    sent = 0
    while sent < min(inflight, calls):
        pending[ray_actor_call(actor, queries[sent % len(queries)])] = time.perf_counter()
        sent += 1
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            torch.from_numpy(ray.get(ref))
            lat.append(time.perf_counter() - pending.pop(ref))
            if sent < calls:
                pending[ray_actor_call(actor, queries[sent % len(queries)])] = time.perf_counter()
                sent += 1
    return lat


# ------------------------------------------------------------------------------ gRPC paths


async def async_window(
    call: Callable[[int], Awaitable[object]], inflight: int, calls: int
) -> list[float]:
    """Latencies of ``calls`` calls issued by ``inflight`` concurrent workers."""
    lat: list[float] = []
    counter = iter(range(calls))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(i)
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(inflight)))
    return lat


class GrpcPaths:
    """Clients of the shard server (product client), Ray Serve's proxy (stub) and the echo."""

    def __init__(
        self, shard_target: str, serve_target: str | None, echo_target: str, bf16_target: str
    ) -> None:
        self.shard_target = shard_target
        self.serve_target = serve_target
        self.echo_target = echo_target
        self.bf16_target = bf16_target

    async def open(self, queries: list[Query]) -> None:
        from ultramem_dist.client import GatherClient
        from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
        from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc

        self.client = await GatherClient.connect(self.shard_target, deadline_s=60)
        self.bf16_client = await GatherClient.connect(self.bf16_target, deadline_s=60)
        self.version = self.client.version
        self.queries = queries
        self.echo_channel = grpc.aio.insecure_channel(self.echo_target, options=GRPC_OPTS)
        self.echo = self.echo_channel.unary_unary(ECHO_METHOD)
        req = build_request(self.version, queries[0])
        t, e, w = queries[0][0].shape[0], SPEC["expansion"], 256
        reply = pb.GatherReply(table_id=TABLE, table_version=self.version, shard_index=0)
        reply.pooled.dtype = pb.DTYPE_FLOAT32
        reply.pooled.shape[:] = [t, e, w]
        reply.pooled.data = bytes(t * e * w * 4)
        self.request_bytes, self.reply_bytes = req.ByteSize(), reply.ByteSize()
        self.echo_payload = self.reply_bytes.to_bytes(8, "little") + bytes(
            max(0, self.request_bytes - 8)
        )
        self.serve_channel = None
        if self.serve_target is not None:
            self.serve_channel = grpc.aio.insecure_channel(self.serve_target, options=GRPC_OPTS)
            self.serve_stub = pb_grpc.GatherPoolStub(self.serve_channel)

    async def close(self) -> None:
        await self.client.close()
        await self.bf16_client.close()
        await self.echo_channel.close()
        if self.serve_channel is not None:
            await self.serve_channel.close()

    async def shard_call(self, i: int) -> torch.Tensor:
        return await self.client.gather(TABLE, *self.queries[i % len(self.queries)])

    async def shard_bf16_call(self, i: int) -> torch.Tensor:
        return await self.bf16_client.gather(TABLE, *self.queries[i % len(self.queries)])

    async def serve_call(self, i: int) -> torch.Tensor:
        from ultramem_dist._private.codec import decode_tensor

        req = build_request(self.version, self.queries[i % len(self.queries)])
        reply = await self.serve_stub.Gather(
            req, timeout=60, metadata=(("application", SERVE_APP),)
        )
        return decode_tensor(
            reply.pooled, name="pooled", dtypes=(torch.float32,), max_elements=1 << 30
        )

    async def echo_call(self, i: int) -> bytes:
        return await self.echo(self.echo_payload, timeout=60)


class LoopThread:
    """An asyncio loop on a background thread (the gRPC clients live there)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# ------------------------------------------------------------------------------ driver


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from ultramem_dist.store import TableSpec, export_tables

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    values = torch.randn(args.rows, 256, generator=g) * 0.02
    store = workdir / "store"
    spec = TableSpec(values=values, d_model=512, **SPEC)
    export_tables({TABLE: spec}, store, shards=1, by="row", version="bench")
    store_bf16 = workdir / "store-bf16"
    export_tables({TABLE: spec}, store_bf16, shards=1, by="row", version="bench", dtype="bfloat16")
    del values, spec
    procs = ReadyProcs(workdir)
    loop = LoopThread()
    ray_paths: RayPaths | None = None
    samples: dict[tuple[str, int, int], list[float]] = {}
    window_s: dict[tuple[str, int, int], float] = {}
    server_cpu: dict[tuple[str, int, int], float] = {}
    sizes: dict[int, dict[str, int]] = {}
    try:
        shard_cmd = [*CLI, "serve-shard", str(store), "--shard", "0", "--threads", "1"]
        procs.spawn([*shard_cmd, *args.shard_args], "shard")
        procs.spawn(ECHO_SERVER, "echo")
        bf16_cmd = [*CLI, "serve-shard", str(store_bf16), "--shard", "0", "--threads", "1"]
        procs.spawn([*bf16_cmd, *args.shard_args], "shard-bf16")
        paths = list(args.paths)
        if {"ray_actor", "ray_serve_grpc"} & set(paths):  # while the two servers boot
            ray_paths = RayPaths(store)
        shard_port, echo_port, bf16_port = procs.ports()
        server_pid = dict(
            zip(("grpc_shard", "grpc_echo", "grpc_shard_bf16"), procs.pids, strict=True)
        )
        serve_target = f"127.0.0.1:{ray_paths.grpc_port}" if ray_paths else None
        clients = GrpcPaths(
            f"127.0.0.1:{shard_port}", serve_target, f"127.0.0.1:{echo_port}",
            f"127.0.0.1:{bf16_port}",
        )  # fmt: skip
        for batch in args.batches:
            queries = make_queries(args.rows, batch, 8)
            loop.run(clients.open(queries))
            sizes[batch] = {"request": clients.request_bytes, "reply": clients.reply_bytes}
            # every path must give the kernel's answer (echo excepted)
            want = reference(store, queries[0])
            got = {"grpc_shard": loop.run(clients.shard_call(0))}
            if ray_paths is not None and "ray_actor" in paths:
                got["ray_actor"] = torch.from_numpy(
                    ray_paths.ray.get(ray_actor_call(ray_paths.actor, queries[0]))
                )
            if ray_paths is not None and "ray_serve_grpc" in paths:
                got["ray_serve_grpc"] = loop.run(clients.serve_call(0))
            for name, out in got.items():
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6, msg=name)
            if "grpc_shard_bf16" in paths:  # against the kernel on the bf16 store's own rows
                torch.testing.assert_close(
                    loop.run(clients.shard_bf16_call(0)), reference(store_bf16, queries[0]),
                    rtol=1e-5, atol=1e-6, msg="grpc_shard_bf16",
                )  # fmt: skip
            calls_for = {
                "grpc_shard": clients.shard_call,
                "grpc_shard_bf16": clients.shard_bf16_call,
                "ray_serve_grpc": clients.serve_call,
                "grpc_echo": clients.echo_call,
            }
            for inflight in args.inflight:  # warm-up: connections, allocator, page cache
                for p in paths:
                    _measure(p, calls_for, ray_paths, queries, loop, inflight, 2 * inflight + 8)
            for rnd in range(args.rounds):
                for inflight in args.inflight:
                    order = paths if rnd % 2 == 0 else paths[::-1]
                    for p in order:
                        n = max(args.calls, 8 * inflight)
                        pid = server_pid.get(p)
                        c0 = cpu_seconds(pid) if pid else 0.0
                        t0 = time.perf_counter()
                        lat = _measure(p, calls_for, ray_paths, queries, loop, inflight, n)
                        key = (p, batch, inflight)
                        window_s[key] = window_s.get(key, 0.0) + time.perf_counter() - t0
                        if pid:
                            server_cpu[key] = server_cpu.get(key, 0.0) + cpu_seconds(pid) - c0
                        samples.setdefault(key, []).extend(lat)
                print(f"batch {batch}: round {rnd + 1}/{args.rounds} done", flush=True)
            loop.run(clients.close())
    finally:
        with contextlib.suppress(Exception):
            loop.close()
        if ray_paths is not None:
            ray_paths.close()
        procs.stop()
    rows = []
    for (p, batch, inflight), lat in samples.items():
        rows.append(
            {
                "path": p,
                "batch": batch,
                "inflight": inflight,
                "p50_ms": round(_pct(lat, 0.5) * 1e3, 3),
                "p99_ms": round(_pct(lat, 0.99) * 1e3, 3),
                "qps": round(len(lat) / window_s[(p, batch, inflight)], 1),
                "calls": len(lat),
            }
        )
        if (p, batch, inflight) in server_cpu:  # load-independent cost of one call
            rows[-1]["server_cpu_ms_per_call"] = round(
                1e3 * server_cpu[(p, batch, inflight)] / len(lat), 3
            )
    rows.sort(key=lambda r: (r["batch"], r["inflight"], PATHS.index(r["path"])))
    return {"rows": rows, "sizes": sizes}


def _measure(
    path: str,
    calls_for: dict[str, Callable[[int], Awaitable[object]]],
    ray_paths: RayPaths | None,
    queries: list[Query],
    loop: LoopThread,
    inflight: int,
    calls: int,
) -> list[float]:
    if path == "ray_actor":
        assert ray_paths is not None
        return ray_actor_window(ray_paths.actor, queries, inflight, calls)
    return loop.run(async_window(calls_for[path], inflight, calls))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios behind the targets, per (batch, in-flight)."""
    by = {(r["path"], r["batch"], r["inflight"]): r for r in rows}
    out: dict[str, Any] = {}
    for batch, inflight in sorted({(r["batch"], r["inflight"]) for r in rows}):
        ours = by.get(("grpc_shard", batch, inflight))
        if ours is None:
            continue
        entry: dict[str, float] = {}
        for other, name in (
            ("grpc_shard_bf16", "bf16_shard"),
            ("grpc_echo", "echo"),
            ("ray_actor", "ray_actor"),
            ("ray_serve_grpc", "ray_serve"),
        ):
            o = by.get((other, batch, inflight))
            if o is not None:
                entry[f"p50_vs_{name}"] = round(ours["p50_ms"] / o["p50_ms"], 3)
                entry[f"qps_vs_{name}"] = round(ours["qps"] / o["qps"], 3)
        out[f"batch{batch}_inflight{inflight}"] = entry
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 3.8 * len(batches)), squeeze=False)
    colors = {
        "grpc_shard": "#4c72b0",
        "grpc_shard_bf16": "#55a868",
        "ray_actor": "#dd8452",
        "ray_serve_grpc": "#c44e52",
        "grpc_echo": "#8c8c8c",
    }
    for i, batch in enumerate(batches):
        ax1, ax2 = axes[i]
        for p in PATHS:
            rs = sorted(
                (r for r in rows if r["path"] == p and r["batch"] == batch),
                key=lambda r: r["inflight"],
            )
            if not rs:
                continue
            x = [r["inflight"] for r in rs]
            ax1.plot(x, [r["p50_ms"] for r in rs], marker="o", color=colors[p], label=f"{p} p50")
            ax1.plot(x, [r["p99_ms"] for r in rs], ls=":", color=colors[p])
            ax2.plot(x, [r["qps"] for r in rs], marker="o", color=colors[p], label=p)
        ax1.set(
            xscale="log",
            yscale="log",
            xlabel="calls in flight",
            ylabel="latency ms (p99 dotted)",
            title=f"T={batch} queries x 160 rows per call",
        )
        ax2.set(
            xscale="log",
            xlabel="calls in flight",
            ylabel="calls / s",
            title=f"throughput, T={batch}",
        )
        ticks = sorted({r["inflight"] for r in rows})
        for ax in (ax1, ax2):
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=7)
    fig.suptitle(f"Gather paths on loopback, 2-core CPU ({result['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small table, short windows")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument(
        "--shard-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra serve-shard options (last on the line), e.g. --shard-args --kernel-workers 0",
    )
    args = parser.parse_args()
    if args.quick:
        args.rows, args.batches, args.inflight, args.rounds, args.calls = (
            65_536,
            [16],
            [1, 8],
            1,
            40,
        )
    else:
        args.rows, args.batches, args.inflight, args.rounds, args.calls = (
            262_144,
            [1, 16],
            [1, 8, 32],
            3,
            200,
        )
    t0 = time.time()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="svc-bench-") as tmp:
        res = run(args, Path(tmp))
    result = {
        "rows": res["rows"],
        "ratios": summarize(res["rows"]),
        "payload_bytes": res["sizes"],
        "config": {
            "table": [args.rows, 256],
            "dtype": "float32 (grpc_shard_bf16: bfloat16)",
            **SPEC,
            "rows_per_query": SPEC["heads"] * SPEC["topm"],
            "batches": args.batches,
            "inflight": args.inflight,
            "rounds": args.rounds,
            "calls_per_window": args.calls,
            "server_threads": 1,
            "shard_args": args.shard_args,
            "quick": args.quick,
            "loadavg_start": [round(x, 2) for x in load],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.time() - t0, 1),
        },
    }
    out = save(result, "service_compare.json", args.out, args.quick)
    result = json.loads((out / "service_compare.json").read_text())
    plot(result, out / "service_compare.png")
    for r in result["rows"]:
        print(json.dumps(r))
    print(json.dumps(result["ratios"], indent=1))
    print(
        f"wrote {out / 'service_compare.json'} and service_compare.png in {time.time() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()
