"""Helpers shared by the benchmark scripts: machine description, result files, plots, and the
server processes they start."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
MAX_MSG = 64 << 20
"""Message size limit of the benchmarks' servers and channels."""
ECHO_METHOD = "/bench.Echo/Echo"
ECHO_STREAM_METHOD = "/bench.Echo/EchoStream"
ECHO_SERVER = [sys.executable, str(Path(__file__).resolve()), "--echo-server"]
"""Command of the bare gRPC echo server (:func:`echo_server`); pass it to ``ReadyProcs.spawn``."""


def quick_mode() -> Path:
    """For ``--quick`` smoke runs: send results to a temporary directory instead of
    benchmarks/results, so a smoke run never overwrites measured numbers."""
    import tempfile

    global RESULTS
    RESULTS = Path(tempfile.mkdtemp(prefix="bench-quick-"))
    return RESULTS


def machine() -> str:
    """One line describing where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, "
        f"Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.release()}"
    )


def today() -> str:
    return _dt.date.today().isoformat()


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    payload = {"date": today(), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def plot_path(name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / name


def save(payload: dict[str, Any], name: str, out: Path | None, quick: bool) -> Path:
    """``write_json`` into benchmarks/results, or the same payload into ``out`` (``--quick``
    without ``--out``: a fresh temp directory, so smoke runs never overwrite real results).
    Returns the directory written to."""
    import tempfile

    if out is None and not quick:
        return write_json(name, payload).parent
    out = out or Path(tempfile.mkdtemp(prefix="bench-quick-"))
    out.mkdir(parents=True, exist_ok=True)
    full = {"date": today(), "machine": machine(), **payload}
    (out / name).write_text(json.dumps(full, indent=2) + "\n")
    return out


class ReadyProcs:
    """Child processes that write ``{"port": ...}`` to their ``--ready-file`` once serving
    (``serve-shard``, the benchmarks' echo servers); :meth:`stop` always reaps them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.items: list[tuple[subprocess.Popen, Path]] = []

    def spawn(self, args: list[str], tag: str) -> subprocess.Popen:
        """Start ``args --ready-file <workdir>/ready-<tag>.json`` (output discarded)."""
        ready = self.workdir / f"ready-{tag}.json"
        proc = subprocess.Popen(
            [*args, "--ready-file", str(ready)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.items.append((proc, ready))
        return proc

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc, _ in self.items]

    def ports(self, timeout: float = 120.0) -> list[int]:
        """Every child's port, in spawn order, once all are serving."""
        deadline = time.monotonic() + timeout
        out = []
        for proc, ready in self.items:
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.args} did not start (exit {proc.poll()})")
                time.sleep(0.05)
            out.append(int(json.loads(ready.read_text())["port"]))
        return out

    def targets(self, timeout: float = 120.0) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports(timeout)]

    def stop(self) -> None:
        """SIGTERM every child (graceful drain), SIGKILL any still alive after 15 s."""
        for proc, _ in self.items:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.items:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> ReadyProcs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def echo_server(ready_file: Path, max_message_bytes: int = MAX_MSG) -> None:
    """The benchmarks' bare gRPC baseline: method ``/bench.Echo/Echo`` on a free loopback port,
    raw bytes, no protobuf and no work; it replies with as many zero bytes as the request's
    first 8 bytes say (cached per size). ``/bench.Echo/EchoStream`` does the same for every
    message of a bidirectional stream. Writes ``ready_file`` once serving; stops on SIGTERM."""
    import asyncio

    import grpc

    from ultramem_dist._private.readyfile import write_ready_file

    replies: dict[int, bytes] = {}

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        size = int.from_bytes(request[:8], "little")
        reply = replies.get(size)
        if reply is None:
            reply = replies[size] = bytes(size)
        return reply

    async def echo_stream(requests: Any, context: grpc.aio.ServicerContext) -> None:
        while (request := await context.read()) is not grpc.aio.EOF:
            await context.write(await echo(request, context))

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
        },
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    write_ready_file(ready_file, {"port": port, "pid": os.getpid()})
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


async def echo_latencies(
    target: str, request_bytes: int, reply_bytes: int, calls: int, gap_s: float = 0.0
) -> list[float]:
    """Seconds per echo round trip of these sizes, one in flight; ``gap_s`` of idle time
    (``asyncio.sleep``) before each call, as between the lookups of a decoding model."""
    import asyncio

    import grpc

    payload = reply_bytes.to_bytes(8, "little") + bytes(max(0, request_bytes - 8))
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(ECHO_METHOD)
        for _ in range(20):  # connection and warm-up
            await call(payload, timeout=30)
        out = []
        for _ in range(calls):
            if gap_s:
                await asyncio.sleep(gap_s)
            t0 = time.perf_counter()
            await call(payload, timeout=30)
            out.append(time.perf_counter() - t0)
    return out


if __name__ == "__main__":  # ``python benchmarks/common.py --echo-server --ready-file PATH``
    import argparse
    import asyncio

    parser = argparse.ArgumentParser(description="the benchmarks' bare gRPC echo server")
    parser.add_argument("--echo-server", action="store_true", required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    asyncio.run(echo_server(parser.parse_args().ready_file))
