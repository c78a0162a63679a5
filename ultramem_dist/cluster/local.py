"""Connecting to Ray: an address, or the embedded local cluster that ``up`` starts by default.

The CLI's commands run in separate processes, so the default cluster is a local Ray head started
with ``ray start --head`` (dashboard off) and remembered in a state file; ``down`` stops it again
if ``up`` started it. The head gets its own GCS port, and ``down`` stops only the processes of
that head (its session's and their children: never every Ray process of the machine, as a bare
``ray stop`` would).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from ultramem_dist.train.data import default_cache_dir


def state_file() -> Path:
    return default_cache_dir() / "local-ray.json"


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def local_cluster_started() -> bool:
    """Whether ``up`` started a local Ray head that has not been stopped by ``down``."""
    return state_file().is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_root() -> Path:
    return Path(tempfile.gettempdir()) / "ray"


def start_local_cluster(num_cpus: int | None = None) -> None:
    """``ray start --head`` on this machine (its own GCS port) and remember which head it is."""
    port = _free_port()
    cmd = [
        _ray_cli(),
        "start",
        "--head",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--port={port}",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"`ray start --head` failed:\n{proc.stderr[-2000:]}")
    latest = _ray_root() / "session_latest"
    session = str(latest.resolve()) if latest.exists() else ""
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started_by": os.getpid(), "port": port, "session_dir": session}))


def _state() -> dict:
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}


def _head_pids(session_dir: str, port: int) -> set[int]:
    """Processes of the head with this session dir / GCS port, and all their descendants."""
    sessions = (session_dir + "/", session_dir + " ") if session_dir else ()
    marks = (*sessions, f":{port} ", f"={port} ")
    cmdlines: dict[int, str] = {}
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            raw = (entry / "cmdline").read_bytes()
            cmdlines[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace") + " "
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = {pid for pid, cmd in cmdlines.items() if any(m in cmd for m in marks)}
    found.discard(os.getpid())
    grew = True
    while grew:
        kids = {pid for pid, ppid in parents.items() if ppid in found} - found - {os.getpid()}
        grew = bool(kids)
        found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is gone for our purposes
        if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _stop_head(session_dir: str, port: int, grace_s: float = 5.0) -> None:
    pids = _head_pids(session_dir, port)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            pids = {pid for pid in pids if _alive(pid)}
            time.sleep(0.05)
        if not pids:
            break
    # ``ray stop`` also forgets the head: without this, a later ``ray.init()`` would find the
    # dead head's address in ``ray_current_cluster`` and try to attach to it.
    current = _ray_root() / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def stop_local_cluster() -> bool:
    """Stop the local head if ``up`` started it (only its processes); returns whether it did."""
    path = state_file()
    if not path.is_file():
        return False
    state = _state()
    if state.get("port"):
        _stop_head(state.get("session_dir", ""), int(state["port"]))
    else:  # a state file written before heads were told apart by their port
        subprocess.run([_ray_cli(), "stop"], capture_output=True, text=True, timeout=180)
    path.unlink(missing_ok=True)
    return True


def _init(address: str) -> None:
    ray.init(address=address, namespace="ultramem", log_to_driver=False, logging_level="ERROR")


def connect(address: str | None, *, start_if_missing: bool = False) -> None:
    """``ray.init`` against ``address`` ("auto", "ray://host:port", "host:port") or the
    embedded local cluster (started when ``start_if_missing``)."""
    if ray.is_initialized():
        return
    if address is not None:
        _init(address)
        return
    if local_cluster_started():
        try:
            _init("auto")
            return
        except ConnectionError:
            state_file().unlink(missing_ok=True)  # stale: the head is gone
    if not start_if_missing:
        raise ConnectionError(
            "no local Ray cluster is running: start one with `ultramem-dist up STORE` "
            "or pass --address"
        )
    start_local_cluster()
    _init("auto")
