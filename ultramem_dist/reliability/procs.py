"""A supervised fleet of ``ultramem-dist serve-shard`` processes on loopback (chaos, load tests).

Each replica keeps its port across restarts (like a StatefulSet pod or a restarted Ray actor), so
clients' channels reconnect to it without any reconfiguration. Children get ``SIGTERM`` if the
harness dies (Linux ``PR_SET_PDEATHSIG``, set by a tiny launcher that then ``exec``s the CLI —
not by ``preexec_fn``, which is unsafe in a process with gRPC threads) and
:meth:`ShardFleet.stop` always reaps them: no stray processes.

With ``respawn=True`` every replica runs ``serve-shard --respawn``: the process the fleet starts
is a supervisor that serves from a forked worker and re-forks it when it crashes
(:mod:`ultramem_dist.serving.supervisor`). :meth:`ShardFleet.signal` then hits the whole replica
(the supervisor; its worker dies with it, like a deleted pod: a cold restart) and
:meth:`ShardFleet.signal_worker` only the serving worker (a crash the supervisor repairs).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Replica",
    "ShardFleet",
    "cpu_seconds",
    "free_port",
    "serve_shard_command",
    "served_ok_requests",
]

_SIGKILL = signal.SIGKILL  # (inside ShardFleet, ``signal`` names its method)

# Runs in the child: ask for SIGTERM when the harness dies, make sure it has not died already,
# then become the real command.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_shard_command() -> list[str]:
    """How to run the CLI with this interpreter (the console script when installed)."""
    script = Path(sys.executable).parent / "ultramem-dist"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from ultramem_dist.cli import main; main()"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a Linux process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served_ok_requests(metrics_port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> float:
    """Successful Gather calls a replica has served, from its Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "ultramem_gather_requests":
            continue
        for s in family.samples:
            if s.name.endswith("_total") and s.labels.get("code") == "OK":
                total += s.value
    return total


@dataclass
class Replica:
    """One serve-shard process (restartable on the same port)."""

    shard: int
    index: int
    workdir: Path
    port: int = 0
    metrics_port: int | None = None
    proc: subprocess.Popen | None = None
    starts: int = 0
    info: dict = field(default_factory=dict)
    supervised: bool = False
    """Runs ``serve-shard --respawn`` (``proc`` is the supervisor, ``info["pid"]`` its worker)."""

    @property
    def name(self) -> str:
        return f"s{self.shard}r{self.index}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ready_file(self) -> Path:
        return self.workdir / f"ready-{self.name}.json"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process the fleet started (the supervisor of a supervised replica)."""
        return self.proc.pid if self.proc is not None else None

    def read_ready(self) -> dict | None:
        """The ready file's JSON now (``None`` while there is none: starting or re-forking)."""
        try:
            return json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            return None

    @property
    def worker_pid(self) -> int | None:
        """The pid serving gRPC now: the replica's own process, or the supervisor's current
        worker (``None`` while a supervised replica has no serving worker)."""
        if not self.supervised:
            return self.pid
        info = self.read_ready()
        if info is None or info.get("supervisor_pid") != self.pid:
            return None
        return int(info["pid"])


class ShardFleet:
    """``shards`` x ``replicas`` serve-shard processes of one store on 127.0.0.1 (``replicas``
    may also list a count per shard)."""

    def __init__(
        self,
        store: str | Path,
        workdir: str | Path,
        *,
        shards: int | Sequence[int] = 1,
        replicas: int | Sequence[int] = 1,
        metrics: bool = False,
        grace_s: float = 2.0,
        drain_s: float = 0.0,
        threads: int = 1,
        extra_args: Sequence[str] = (),
        ready_timeout_s: float = 120.0,
        respawn: bool = False,
    ) -> None:
        self.store = Path(store)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        ids = list(range(shards) if isinstance(shards, int) else shards)
        counts = [replicas] * len(ids) if isinstance(replicas, int) else list(replicas)
        if len(counts) != len(ids) or min(counts, default=1) < 1:
            raise ValueError(f"replicas {replicas!r} does not give >= 1 replica per shard {ids}")
        self.replicas = [
            Replica(
                k,
                r,
                self.workdir,
                metrics_port=free_port() if metrics else None,
                supervised=respawn,
            )
            for k, n in zip(ids, counts, strict=True)
            for r in range(n)
        ]
        self.grace_s, self.drain_s, self.threads = grace_s, drain_s, threads
        self.extra_args = list(extra_args)
        self.ready_timeout_s = ready_timeout_s

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self, rep: Replica) -> None:
        rep.ready_file.unlink(missing_ok=True)
        cmd = [
            *(
                [sys.executable, "-c", _LAUNCHER, str(os.getpid())]
                if sys.platform == "linux"
                else []
            ),
            *serve_shard_command(),
            "serve-shard",
            str(self.store),
            "--shard", str(rep.shard),
            "--host", "127.0.0.1",
            "--port", str(rep.port),
            "--grace", str(self.grace_s),
            "--drain", str(self.drain_s),
            "--threads", str(self.threads),
            "--ready-file", str(rep.ready_file),
            *(["--metrics-port", str(rep.metrics_port)] if rep.metrics_port else []),
            *(["--respawn"] if rep.supervised else []),
            *self.extra_args,
        ]  # fmt: skip
        with open(rep.log, "ab") as logf:
            logf.write(f"=== start {rep.starts + 1} of {rep.name} ===\n".encode())
            logf.flush()
            rep.proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        rep.starts += 1

    def wait_ready(self, rep: Replica, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        while not rep.ready_file.exists():
            if rep.proc is None or rep.proc.poll() is not None:
                code = None if rep.proc is None else rep.proc.returncode
                raise RuntimeError(f"replica {rep.name} exited ({code}): {self.tail(rep)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {rep.name} is not ready: {self.tail(rep)}")
            time.sleep(0.02)
        rep.info = json.loads(rep.ready_file.read_text())
        rep.port = int(rep.info["port"])

    def start(self) -> ShardFleet:
        """Start every replica (in parallel) and wait until all serve."""
        try:
            for rep in self.replicas:
                self._spawn(rep)
            for rep in self.replicas:
                self.wait_ready(rep)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, rep: Replica, wait: bool = True) -> None:
        """Start a dead replica again on its previous port."""
        if rep.alive:
            raise RuntimeError(f"replica {rep.name} is still running")
        self._spawn(rep)
        if wait:
            self.wait_ready(rep)

    def signal(self, rep: Replica, sig: int = signal.SIGKILL) -> None:
        """Signal the replica's process (a supervised replica's supervisor: the whole replica)."""
        if rep.alive:
            assert rep.proc is not None
            rep.proc.send_signal(sig)

    def signal_worker(self, rep: Replica, sig: int = _SIGKILL) -> int:
        """Signal only the serving worker of a supervised replica (a crash of the serving
        process: its supervisor re-forks it on the same port). Returns the worker's pid."""
        if not rep.supervised:
            raise ValueError(f"replica {rep.name} is not supervised (start the fleet with respawn)")
        pid = rep.worker_pid if rep.alive else None
        if pid is None:
            raise RuntimeError(f"replica {rep.name} has no serving worker: {self.tail(rep)}")
        os.kill(pid, sig)
        return pid

    def wait_worker(self, rep: Replica, old_pid: int, timeout_s: float | None = None) -> int:
        """Wait until a supervised replica serves from a worker other than ``old_pid``; returns
        the new worker's pid (``rep.info``/``rep.port`` are refreshed)."""
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        while (pid := rep.worker_pid) in (None, old_pid):
            if not rep.alive:
                code = None if rep.proc is None else rep.proc.returncode
                raise RuntimeError(f"replica {rep.name} exited ({code}): {self.tail(rep)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {rep.name} did not re-fork: {self.tail(rep)}")
            time.sleep(0.01)
        self.wait_ready(rep, 5)
        return pid

    def wait_exit(self, rep: Replica, timeout_s: float = 30.0) -> int | None:
        if rep.proc is None:
            return None
        try:
            return rep.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rep.proc.kill()
            return rep.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM every replica, wait (in parallel), SIGKILL leftovers; always reaps."""
        for rep in self.replicas:
            self.signal(rep, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + self.drain_s + 10
        for rep in self.replicas:
            if rep.proc is None:
                continue
            try:
                rep.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rep.proc.kill()
                rep.proc.wait(10)

    def __enter__(self) -> ShardFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries
    def of_shard(self, shard: int) -> list[Replica]:
        return [r for r in self.replicas if r.shard == shard]

    def targets(self) -> list[str]:
        return [r.target for r in self.replicas]

    def served(self, rep: Replica) -> float | None:
        """Successful Gather calls ``rep`` served (``None`` if not measurable now)."""
        if rep.metrics_port is None or not rep.alive:
            return None
        try:
            return served_ok_requests(rep.metrics_port)
        except OSError:
            return None

    @staticmethod
    def tail(rep: Replica, n: int = 2000) -> str:
        """The end of the replica's log since its latest start."""
        try:
            text = rep.log.read_text(errors="replace")
        except OSError:
            return ""
        return text[text.rfind("=== start ") :][-n:]
