"""A pre-forked, self-supervising shard server (``ultramem-dist serve-shard --respawn``).

Starting a shard process is slow (interpreter, ``import torch``, gRPC modules, sha256 of the
shard's files: seconds, more on a loaded machine). With ``--respawn`` that work is done once, by
a small supervisor in the process you started, and the gRPC server runs in a ``fork()``-ed
worker. When the worker dies abnormally (a signal the supervisor did not forward, or a non-zero
exit), the supervisor forks a new one, which only has to build and bind the ``grpc.aio`` server:
it serves again on the same port in a fraction of a second (like gunicorn's ``preload`` master).

Fork safety. The supervisor never starts gRPC: importing ``grpc`` (and ``grpc.aio``, health,
reflection) does not initialise gRPC core — that happens when the first server or channel is
created, which only workers do — so each worker starts gRPC from scratch. It runs no torch
operation either (the OpenMP / intra-op thread pool starts on the first parallel op; workers
call ``torch.set_num_threads`` themselves) and never touches CUDA. What the supervisor does
before forking: the imports, verifying the shard (size + sha256 of every file) and
memory-mapping it; workers inherit the verified mapping instead of hashing the files again.

Lifecycle:

* ``SIGTERM``/``SIGINT`` to the supervisor are forwarded to the worker (its usual graceful
  drain); the supervisor waits for it and exits with the worker's status.
* A worker that exits 0 on its own ends the supervisor too (exit 0): it stopped on purpose.
* A worker that exits 2 before it ever served (a configuration error: "refusing to serve") is
  not re-forked; the supervisor exits 2.
* Otherwise the worker is re-forked: at once if it had been serving for at least
  ``min_uptime_s``; after an exponential backoff when workers keep dying early (before serving
  or within ``min_uptime_s`` of it); after ``max_fast_failures`` such deaths in a row the
  supervisor gives up (:class:`CrashLoopError`, exit 1 from the CLI).
* Workers ask the kernel for ``SIGKILL`` when the supervisor dies (``PR_SET_PDEATHSIG``): a
  supervisor killed with ``SIGKILL`` takes its worker with it, like a deleted pod, and never
  leaves an orphan holding the port.

The ready file (``--ready-file``) is written by the supervisor once a worker serves: the
worker's usual JSON (``port`` and ``pid`` = the serving worker, ``shard``, ``version``, ...)
plus ``supervisor_pid`` and ``respawns`` (workers re-forked so far). It is removed when a worker
dies and rewritten, with the new ``pid``, when its replacement serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ultramem_dist._private.readyfile import write_ready_file
from ultramem_dist.serving.config import ServerConfig

__all__ = [
    "CrashLoopError",
    "RespawnPolicy",
    "ShardSupervisor",
    "describe_status",
    "exit_with_status",
]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_POLL_S = 0.005  # readiness poll of a starting worker (the supervisor is otherwise idle)


class CrashLoopError(RuntimeError):
    """Workers keep dying right after they start; the supervisor gave up."""


@dataclass(frozen=True)
class RespawnPolicy:
    """When the supervisor re-forks a dead worker, and when it gives up."""

    max_fast_failures: int = 5
    """Give up after this many early deaths in a row (see ``min_uptime_s``)."""
    min_uptime_s: float = 1.0
    """A worker that dies before serving, or less than this long after it began serving, died
    early: the next fork waits ``backoff_s * 2**(n-1)`` (n = early deaths in a row). A worker
    that served longer is replaced at once and resets the count."""
    backoff_s: float = 0.5
    """First backoff after an early death (doubles per further early death)."""
    backoff_max_s: float = 30.0
    """Cap of the backoff."""
    ready_timeout_s: float = 120.0
    """A worker that has not served after this long is killed (and counts as an early death)."""

    def __post_init__(self) -> None:
        if self.max_fast_failures < 1:
            raise ValueError("max_fast_failures must be >= 1")
        for name in ("min_uptime_s", "backoff_s", "backoff_max_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.ready_timeout_s <= 0:
            raise ValueError("ready_timeout_s must be > 0")

    def backoff(self, early_deaths: int) -> float:
        """Seconds to wait before the next fork after ``early_deaths`` early deaths in a row."""
        if early_deaths <= 0:
            return 0.0
        return min(self.backoff_max_s, self.backoff_s * 2 ** (early_deaths - 1))


def describe_status(status: int) -> str:
    """``os.waitstatus_to_exitcode`` result in words: "exited with code 1", "was killed by
    SIGKILL"."""
    if status >= 0:
        return f"exited with code {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    return f"was killed by {name}"


def exit_with_status(status: int) -> NoReturn:
    """Leave this process the way the worker left: ``exit(status)``, or die of the same signal
    (``status < 0``), so whoever started the supervisor sees what it would have seen without it."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status < 0:
        sig = -status
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            os.kill(os.getpid(), sig)
            time.sleep(1.0)  # the signal is delivered before this returns
        os._exit(128 + sig)
    raise SystemExit(status)


@dataclass
class _Worker:
    pid: int
    generation: int
    forked_at: float
    private_ready: Path
    ready_at: float | None = None


class ShardSupervisor:
    """Preload a shard once, then keep a forked worker serving it (see the module docstring).

    ``run()`` blocks until the supervisor stops and returns the exit status to leave with
    (``os.waitstatus_to_exitcode`` convention: negative = killed by that signal); pass it to
    :func:`exit_with_status`. Linux only (``fork`` + ``PR_SET_PDEATHSIG``).
    """

    def __init__(
        self,
        cfg: ServerConfig,
        ready_file: Path | None = None,
        policy: RespawnPolicy | None = None,
    ) -> None:
        self.cfg = dataclasses.replace(cfg)
        self.ready_file = None if ready_file is None else Path(ready_file)
        self.policy = policy or RespawnPolicy()
        self.respawns = 0
        """Workers forked after the first one."""
        self._shard: Any = None  # the verified ShardSlice (mmap'd), inherited by every worker
        self._supervisor_pid = os.getpid()
        self._worker_pid: int | None = None
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ supervisor side
    def preload(self) -> None:
        """The slow part, once: imports and the verified, memory-mapped shard.

        Raises ``StoreError`` if the shard's files are missing, corrupt or inconsistent."""
        if not sys.platform.startswith("linux"):
            raise OSError("--respawn needs Linux (fork + PR_SET_PDEATHSIG)")
        t0 = time.perf_counter()
        import ultramem_dist.serving.app  # noqa: F401  (torch, grpc modules: import only)
        from ultramem_dist.store.reader import load_shard

        self._shard = load_shard(
            self.cfg.store, self.cfg.shard, self.cfg.version, verify=self.cfg.verify
        )
        # re-forked workers serve exactly the version verified here, even if LATEST moves
        self.cfg.version = self._shard.manifest.version
        gc.collect()
        gc.freeze()  # keep the preloaded heap out of the workers' GC passes (fewer COW copies)
        log.info(
            "supervisor pid %d: shard %d of %s verified and mapped in %.2fs; forking workers",
            os.getpid(), self.cfg.shard, self.cfg.version, time.perf_counter() - t0,
        )  # fmt: skip

    def run(self) -> int:
        """Preload (unless done), then fork and supervise workers until stopped.

        Returns the status to exit with. Raises :class:`CrashLoopError` when workers keep
        dying early, ``StoreError`` from :meth:`preload`."""
        if self._shard is None:
            self.preload()
        self._supervisor_pid = os.getpid()
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in _STOP_SIGNALS}
        try:
            return self._supervise()
        finally:
            self._reap_leftover()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum
        pid = self._worker_pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _supervise(self) -> int:
        early = 0  # early deaths in a row
        generation = 0
        while True:
            if self._stop_signal is not None:  # stopped between two workers: nothing to drain
                log.info("supervisor: %s received; exiting", signal.Signals(self._stop_signal).name)
                return 0
            worker = self._fork(generation)
            status = self._wait(worker)
            now = time.monotonic()
            reason = describe_status(status)
            if self._stop_signal is not None:
                log.info(
                    "supervisor: %s forwarded to worker pid %d, which %s",
                    signal.Signals(self._stop_signal).name, worker.pid, reason,
                )  # fmt: skip
                return status
            if status == 0:
                log.info("supervisor: worker pid %d exited 0 on its own; exiting", worker.pid)
                return 0
            self._unpublish()
            if worker.ready_at is None and status == 2:
                log.error(
                    "supervisor: worker pid %d refused to start (exit 2: configuration or store "
                    "problem); not re-forking",
                    worker.pid,
                )
                return 2
            lived = None if worker.ready_at is None else now - worker.ready_at
            served = "before serving" if lived is None else f"after serving {lived:.2f}s"
            if lived is not None and lived >= self.policy.min_uptime_s:
                early = 0
            else:
                early += 1
            if early >= self.policy.max_fast_failures:
                raise CrashLoopError(
                    f"shard {self.cfg.shard} worker crash loop: {early} workers in a row died "
                    f"before serving or within {self.policy.min_uptime_s:g}s of it (last: "
                    f"worker pid {worker.pid} {reason} {served}); giving up (see the log above "
                    "for why they died)"
                )
            delay = self.policy.backoff(early)
            max_early = self.policy.max_fast_failures
            log.warning(
                "supervisor: worker pid %d %s %s; re-forking %s",
                worker.pid, reason, served,
                "now" if delay == 0 else f"in {delay:.2f}s (early death {early}/{max_early})",
            )  # fmt: skip
            if delay:
                self._sleep_unless_stopped(delay)
            generation += 1
            self.respawns += 1

    def _sleep_unless_stopped(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self._stop_signal is None and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    def _fork(self, generation: int) -> _Worker:
        # the worker writes its ready file (serve()'s) here; the directory lives only while the
        # worker starts: removed once it serves or dies
        private = Path(tempfile.mkdtemp(prefix="ultramem-worker-")) / "ready.json"
        if threading.active_count() > 1:
            log.warning(
                "supervisor: %d Python threads are running before fork (%s); the worker gets "
                "only the forking thread",
                threading.active_count(), [t.name for t in threading.enumerate()],
            )  # fmt: skip
        sys.stdout.flush()
        sys.stderr.flush()
        # Block the stop signals across fork: the parent must know the worker's pid before it
        # can forward a signal; the worker resets the handlers before unblocking them.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            forked_at = time.monotonic()
            pid = os.fork()
            if pid == 0:
                self._worker_main(private)  # never returns
            self._worker_pid = pid
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        return _Worker(pid, generation, forked_at, private)

    def _wait(self, worker: _Worker) -> int:
        """Wait for the worker to exit (publishing its readiness meanwhile); its exit status."""
        deadline = worker.forked_at + self.policy.ready_timeout_s
        killed = False
        raw = None
        while raw is None and worker.ready_at is None:
            pid, st = os.waitpid(worker.pid, os.WNOHANG)
            if pid:
                raw = st
            elif worker.private_ready.exists():
                worker.ready_at = time.monotonic()
                self._publish(worker)
            elif not killed and time.monotonic() > deadline:
                log.error(
                    "supervisor: worker pid %d is not serving after %.0fs; killing it",
                    worker.pid, self.policy.ready_timeout_s,
                )  # fmt: skip
                os.kill(worker.pid, signal.SIGKILL)
                killed = True
            else:
                time.sleep(_POLL_S)
        if raw is None:
            _, raw = os.waitpid(worker.pid, 0)  # PEP 475: retried after a forwarded signal
        shutil.rmtree(worker.private_ready.parent, ignore_errors=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        self._worker_pid = None  # reaped: never signal its (reusable) pid again
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        return os.waitstatus_to_exitcode(raw)

    def _publish(self, worker: _Worker) -> None:
        """The worker serves: pin its ports for re-forks, log, write the public ready file."""
        try:
            info = json.loads(worker.private_ready.read_text())
        except (OSError, ValueError) as exc:  # written atomically by the worker: unexpected
            log.warning("supervisor: cannot read worker %d's ready file: %s", worker.pid, exc)
            info = {"pid": worker.pid}
        shutil.rmtree(worker.private_ready.parent, ignore_errors=True)
        if isinstance(info.get("port"), int):
            self.cfg.port = info["port"]  # --port 0: every later worker binds the same port
        if self.cfg.health_port == 0 and isinstance(info.get("health_port"), int):
            self.cfg.health_port = info["health_port"]
        took = worker.ready_at - worker.forked_at if worker.ready_at is not None else 0.0
        if worker.generation == 0:
            log.info("supervisor: worker pid %d serving (fork to ready %.3fs)", worker.pid, took)
        else:
            log.warning(
                "supervisor: re-forked worker pid %d serving on port %s in %.3fs (respawn %d)",
                worker.pid, info.get("port"), took, self.respawns,
            )  # fmt: skip
        if self.ready_file is not None:
            payload = {**info, "supervisor_pid": os.getpid(), "respawns": self.respawns}
            write_ready_file(self.ready_file, payload)

    def _unpublish(self) -> None:
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)

    def _reap_leftover(self) -> None:
        """On an unexpected supervisor error: never leave a worker behind."""
        pid = self._worker_pid
        if pid is None or os.getpid() != self._supervisor_pid:
            return
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self._worker_pid = None

    # ------------------------------------------------------------------ worker side
    def _worker_main(self, private_ready: Path) -> NoReturn:
        """The forked worker: serve like a plain ``serve-shard`` and never return."""
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self._worker_pid = None
            _die_with_parent()
            if os.getppid() != self._supervisor_pid:  # the supervisor died before prctl
                os._exit(1)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            code = self._serve_in_worker(private_ready)
        except KeyboardInterrupt:
            code = 128 + signal.SIGINT
        except BaseException:  # noqa: BLE001  (report anything, then leave through os._exit)
            traceback.print_exc()
            code = 1
        finally:
            with contextlib.suppress(BaseException):
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _serve_in_worker(self, private_ready: Path) -> int:
        from ultramem_dist.errors import StoreError
        from ultramem_dist.serving import app as app_module

        try:
            asyncio.run(app_module.serve(self.cfg, private_ready, shard=self._shard))
        except (StoreError, ValueError) as exc:
            print(f"error: refusing to serve: {exc}", file=sys.stderr)
            return 2
        except (OSError, RuntimeError) as exc:  # grpc reports a failed bind as RuntimeError
            print(f"error: cannot start the shard server: {exc}", file=sys.stderr)
            return 1
        return 0


def _die_with_parent() -> None:
    """Ask Linux for SIGKILL when the supervisor dies (a killed supervisor = a deleted pod)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
