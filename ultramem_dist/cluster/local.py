"""Connecting to Ray: an address, or the embedded local cluster that ``up`` starts by default.

The CLI's commands run in separate processes, so the default cluster is a local Ray head started
with ``ray start --head`` (bound to this machine, dashboard off) and remembered in a state file;
``down`` stops it again if ``up`` started it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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


def start_local_cluster(num_cpus: int | None = None) -> None:
    """``ray start --head`` on this machine and remember that we started it."""
    cmd = [_ray_cli(), "start", "--head", "--include-dashboard=false", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"`ray start --head` failed:\n{proc.stderr[-2000:]}")
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started_by": os.getpid()}))


def stop_local_cluster() -> bool:
    """Stop the local head if ``up`` started it; returns whether it did."""
    path = state_file()
    if not path.is_file():
        return False
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
