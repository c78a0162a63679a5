"""``serve-shard --respawn``: a supervisor preloads the shard once and serves from forked workers.

Real processes on loopback: a supervised shard answers Gather; kill -9 of its worker is repaired
by a re-forked worker on the same port (and the same metrics port) that answers correctly again,
several times, and SIGTERM to the supervisor then drains the worker and exits 0 with no worker
left; kill -9 of the supervisor takes the worker with it; a worker that cannot start makes the
supervisor give up with a clear message (crash loop) or refuse at once (configuration error).
Every process is reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI, REPO, free_port, make_table_spec, random_queries

from ultramem_dist.client import GatherClient
from ultramem_dist.kernels import gather_pool
from ultramem_dist.reliability.procs import served_ok_requests
from ultramem_dist.serving.supervisor import RespawnPolicy, describe_status
from ultramem_dist.store import export_tables

pytestmark = pytest.mark.integration
SPEC = make_table_spec()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    export_tables({"row": SPEC}, root, shards=1, by="row", version="v1")
    return root


def _alive(pid: int) -> bool:
    """True while any thread of process ``pid`` runs (a zombie waiting for its reaper is dead;
    the main thread of a dying process can be a zombie before its other threads are gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] not in "ZX":
            return True
    return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for(predicate, timeout_s: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


class Supervised:
    """A ``serve-shard --respawn`` process; :meth:`close` reaps it and every worker it had."""

    def __init__(self, store: Path, workdir: Path, *extra: str) -> None:
        self.ready = workdir / f"ready-{time.monotonic_ns()}.json"
        self.log = self.ready.with_suffix(".log")
        self.workers: set[int] = set()
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [*CLI, "serve-shard", str(store), "--shard", "0", "--port", "0", "--threads",
                 "1", "--grace", "1", "--ready-file", str(self.ready), "--respawn", *extra],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

    def info(self) -> dict | None:
        try:
            info = json.loads(self.ready.read_text())
        except (OSError, ValueError):
            return None
        self.workers.add(int(info["pid"]))
        return info

    def wait_worker(self, not_pid: int | None = None, timeout_s: float = 90.0) -> dict:
        def serving():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            info = self.info()
            return info if info is not None and info["pid"] != not_pid else None

        return _wait_for(serving, timeout_s, "a serving worker", self.log)

    def logged_workers(self) -> set[int]:
        return {int(p) for p in re.findall(r"worker pid (\d+)", self.log.read_text())}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        stray = [p for p in self.workers | self.logged_workers() if _alive(p)]
        for pid in stray:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not stray, f"workers left behind: {stray}\n{self.log.read_text()[-3000:]}"


@pytest.fixture
def supervised(store, tmp_path):
    started: list[Supervised] = []

    def start(*extra: str) -> Supervised:
        sv = Supervised(store, tmp_path, *extra)
        started.append(sv)
        return sv

    yield start
    for sv in started:
        sv.close()


async def _gather_checked(target: str, seed: int) -> None:
    idx, blk, w = random_queries(SPEC, 5, seed=seed)
    async with await GatherClient.connect(target, deadline_s=10, connect_timeout_s=10) as client:
        out = await client.gather("row", idx, blk, w)
    torch.testing.assert_close(
        out, gather_pool(SPEC.values, idx, blk, w, SPEC.expansion), atol=1e-6, rtol=1e-5
    )


def test_kill_9_of_the_worker_is_reforked_then_sigterm_drains_and_exits_0(supervised):
    metrics_port = free_port()
    sv = supervised("--metrics-port", str(metrics_port), "--respawn-min-uptime", "0")
    info = sv.wait_worker()
    port, worker = info["port"], info["pid"]
    assert info["supervisor_pid"] == sv.proc.pid != worker and info["respawns"] == 0
    assert info["shard"] == 0 and info["version"] == "v1"
    target = f"127.0.0.1:{port}"
    asyncio.run(_gather_checked(target, seed=1))
    for round_ in range(1, 4):
        os.kill(worker, signal.SIGKILL)
        info = sv.wait_worker(not_pid=worker, timeout_s=10)
        assert info["port"] == port and info["supervisor_pid"] == sv.proc.pid
        assert info["respawns"] == round_ and sv.proc.poll() is None
        # re-forked within wait_worker's bound; how fast is benchmarks/chaos.py's business
        _wait_for(lambda w=worker: not _alive(w), 5, "the killed worker to be reaped")
        worker = info["pid"]
        asyncio.run(_gather_checked(target, seed=10 + round_))
        # the new worker serves the same metrics port, with a fresh counter
        assert served_ok_requests(metrics_port) >= 1
    # SIGTERM to the supervisor: forwarded to the (re-forked) worker, which drains; exit 0
    sv.proc.send_signal(signal.SIGTERM)
    assert sv.proc.wait(15) == 0
    log = sv.log.read_text()
    assert not any(_alive(p) for p in sv.workers | sv.logged_workers()), log[-3000:]
    assert log.count("killed by SIGKILL") == 3 and log.count("re-forked worker pid") == 3
    assert "draining" in log and f"SIGTERM forwarded to worker pid {worker}" in log, log[-3000:]
    assert sv.logged_workers() >= sv.workers


def test_kill_9_of_the_supervisor_takes_the_worker_with_it(supervised):
    sv = supervised()
    info = sv.wait_worker()
    sv.proc.kill()
    sv.proc.wait(10)
    _wait_for(lambda: not _alive(info["pid"]), 10, "the orphaned worker to die")
    # nothing serves the port any more
    _wait_for(lambda: _port_free(info["port"]), 10, f"port {info['port']} to be free")


def test_a_worker_crash_loop_gives_up_with_a_clear_message(supervised):
    with socket.socket() as blocker:  # every worker fails to bind this port
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        sv = supervised("--port", str(port), "--respawn-max-failures", "3",
                        "--respawn-backoff", "0.05")  # fmt: skip
        code = sv.proc.wait(60)
    log = sv.log.read_text()
    assert code == 1, log[-3000:]
    assert "crash loop: 3 workers in a row died" in log and "giving up" in log, log[-3000:]
    assert log.count("cannot start the shard server") == 3
    assert len(sv.logged_workers()) == 3


def test_a_worker_that_refuses_its_configuration_is_not_reforked(supervised, tmp_path):
    missing = tmp_path / "missing.pem"
    sv = supervised("--tls-cert", str(missing), "--tls-key", str(missing))
    code = sv.proc.wait(60)
    log = sv.log.read_text()
    assert code == 2, log[-3000:]
    assert "refusing to serve: cannot read the TLS certificate file" in log
    assert "not re-forking" in log and len(sv.logged_workers()) == 1


def test_respawn_policy_backoff_and_status_words():
    policy = RespawnPolicy(backoff_s=0.5, backoff_max_s=3)
    assert [policy.backoff(n) for n in range(5)] == [0.0, 0.5, 1.0, 2.0, 3.0]
    assert describe_status(0) == "exited with code 0"
    assert describe_status(-9) == "was killed by SIGKILL"
    with pytest.raises(ValueError, match="max_fast_failures"):
        RespawnPolicy(max_fast_failures=0)
