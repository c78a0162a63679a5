"""Shared test fixtures: synthetic value tables, shard server processes and in-process servers.

Other test packages may append fixtures below; keep each fixture self-contained.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "ultramem-dist"
# The installed console script when present, else the same entry point through this interpreter.
CLI = (
    [str(_SCRIPT)]
    if _SCRIPT.exists()
    else [sys.executable, "-c", "from ultramem_dist.cli import main; main()"]
)


# ------------------------------------------------------------------------------ tables


def make_table_spec(
    n_rows: int = 600,
    dv: int = 32,
    expansion: int = 4,
    num_cores: int = 2,
    d_model: int = 24,
    topm: int = 4,
    heads: int = 2,
    seed: int = 0,
):
    """A random UltraMem-like table (model-like init scales) as a ``TableSpec``."""
    from ultramem_dist.reliability.synthetic import synthetic_spec

    return synthetic_spec(
        n_rows, dv, expansion=expansion, num_cores=num_cores, d_model=d_model, topm=topm,
        heads=heads, seed=seed,
    )


def micro_v2_model(seed: int):
    """A random-init micro UltraMemV2 ``MemoryLM`` (eval mode) with its pre-values re-drawn at
    std 1, so the GELU pre-value activation is far from linear and matters in every test."""
    from ultramem_dist.model import MemoryLM, preset

    torch.manual_seed(seed)
    model = MemoryLM(preset("micro", "ultramemv2")).eval()
    with torch.no_grad():
        model.shared_table.pre_values.normal_()
    return model


def random_queries(spec, num_tokens: int, seed: int = 1):
    """Random valid (indices, blocks, weights) for ``spec``: ``[T, H*m]`` each (+ ``h_c``)."""
    g = torch.Generator().manual_seed(seed)
    per = spec.heads * spec.topm
    n = spec.values.shape[0]
    idx = torch.randint(0, n, (num_tokens, per), generator=g)
    blk = torch.randint(0, spec.expansion, (num_tokens, per), generator=g)
    w = torch.randn(num_tokens, per, spec.num_cores, generator=g)
    return idx, blk, w


@pytest.fixture
def table_spec():
    return make_table_spec()


# ------------------------------------------------------------------------------ ports


def init_local_ray() -> None:
    """``ray.init`` of a private 2-CPU local Ray in the registry's namespace, quiet (the
    fixtures that call it ``ray.shutdown()`` when done)."""
    import ray

    from ultramem_dist.cluster.registry import NAMESPACE

    ray.init(
        address="local",  # a private instance, never a cluster started elsewhere
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace=NAMESPACE,
        logging_level="ERROR",
    )


@contextlib.contextmanager
def running_router(targets: Sequence[str]) -> Iterator[str]:
    """A router in front of the shard ``targets`` on its own event loop thread; yields its
    target and stops it after."""
    from ultramem_dist.router import RouterConfig, build_router

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server, port = await build_router(RouterConfig(targets=list(targets)))
        await server.start()
        return server, port

    router, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(router.stop(0.5), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def shard_and_router(store: Path, in_process_shard) -> Iterator[dict[str, str]]:
    """Serve shard 0 of ``store`` in-process and a router in front of it (on its own event
    loop thread); yields ``{"shard": target, "router": target}`` and stops both after."""
    from ultramem_dist.serving import ServerConfig

    shard = in_process_shard(ServerConfig(store=store, shard=0))
    with running_router([shard.target]) as router:
        yield {"shard": shard.target, "router": router}


def free_port() -> int:
    """A TCP port that was free a moment ago (prefer binding port 0 where possible)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ shard processes


@dataclass
class ShardProcess:
    """A ``ultramem-dist serve-shard`` subprocess."""

    proc: subprocess.Popen
    port: int
    shard: int
    log: Path
    extra: dict = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def _start_shards(
    store: Path, shards: Sequence[int], workdir: Path, extra_args: Sequence[str] = ()
) -> list[ShardProcess]:
    procs = []
    for k in shards:
        tag = f"{store.name}-{k}-{time.monotonic_ns()}"
        ready = workdir / f"ready-{tag}.json"
        log = workdir / f"shard-{tag}.log"
        with open(log, "wb") as logf:
            p = subprocess.Popen(
                [
                    *CLI,
                    "serve-shard",
                    str(store),
                    "--shard",
                    str(k),
                    "--port",
                    "0",
                    "--grace",
                    "2",
                    "--threads",
                    "1",
                    "--ready-file",
                    str(ready),
                    *extra_args,
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        procs.append((p, ready, log, k))
    started = []
    deadline = time.monotonic() + 90
    try:
        for p, ready, log, k in procs:
            while not ready.exists():
                if p.poll() is not None:
                    tail = log.read_text()[-2000:]
                    raise RuntimeError(f"shard {k} exited {p.returncode}: {tail}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"shard {k} did not become ready: {log.read_text()[-2000:]}")
                time.sleep(0.05)
            info = json.loads(ready.read_text())
            started.append(ShardProcess(p, int(info["port"]), k, log, info))
    except BaseException:
        for p, *_ in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
        raise
    return started


@pytest.fixture(scope="module")
def spawn_shards(tmp_path_factory) -> Iterator[Callable[..., list[ShardProcess]]]:
    """``spawn(store, shards=[0, 1], extra_args=())`` starts shard servers (module lifetime)."""
    workdir = tmp_path_factory.mktemp("shards")
    alive: list[ShardProcess] = []

    def spawn(store: Path, shards: Sequence[int], extra_args: Sequence[str] = ()):
        procs = _start_shards(Path(store), shards, workdir, extra_args)
        alive.extend(procs)
        return procs

    yield spawn
    for sp in alive:  # signal all first, then wait: they drain in parallel
        if sp.proc.poll() is None:
            sp.proc.send_signal(signal.SIGTERM)
    for sp in alive:
        sp.stop()


# ------------------------------------------------------------------------------ in-process server


class InProcessShard:
    """A shard server running on its own event loop in a background thread (fast for tests)."""

    def __init__(self, cfg) -> None:
        from ultramem_dist.serving import build_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            server, port = build_server(cfg)
            await server.start()
            return server, port

        self.server, self.port = self.run(start())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0.5) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class HeldKernel:
    """Replaces a shard servicer's kernel step: each call waits (up to 10 s) for ``release``;
    ``started`` is set by the first call, ``calls`` counts them."""

    def __init__(self, servicer) -> None:
        self.original = servicer._gather_sync
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        servicer._gather_sync = self

    def __call__(self, request, reply) -> None:
        self.calls += 1
        self.started.set()
        self.release.wait(10)
        self.original(request, reply)


@pytest.fixture(scope="module")
def in_process_shard() -> Iterator[Callable[..., InProcessShard]]:
    """``start(ServerConfig)`` -> a running in-process shard server (stopped at module end)."""
    servers: list[InProcessShard] = []

    def start(cfg) -> InProcessShard:
        s = InProcessShard(cfg)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
