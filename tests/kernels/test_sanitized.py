"""The native code that reads network bytes (the shard's stream fast path) and the client's
split, run under AddressSanitizer and UndefinedBehaviorSanitizer on corrupted inputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _runtime(name: str) -> str | None:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def test_native_paths_are_clean_under_asan_and_ubsan(tmp_path):
    asan = _runtime("libasan.so")
    if asan is None:
        pytest.skip("no C compiler with AddressSanitizer here")
    env = {
        **os.environ,
        "LD_PRELOAD": asan,  # the ASan runtime must come first in the process
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",  # (CPython itself leaks by design)
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "ULTRAMEM_NATIVE_DIR": str(tmp_path / "sanitized"),
        "ULTRAMEM_NATIVE_CFLAGS": "-march=native -fsanitize=address,undefined "
        "-fno-sanitize-recover=all -fno-omit-frame-pointer -g",
        "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(HERE / "_sanitized_fuzz.py"), "1000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, report
    assert "ok:" in proc.stdout and "runtime error" not in proc.stderr, report
