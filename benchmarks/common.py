"""Helpers shared by the benchmark scripts: machine description, result files, plots."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


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
