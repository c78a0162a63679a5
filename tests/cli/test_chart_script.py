"""``make chart`` (``scripts/chart.py``): lint + render + validate the chart offline, for the
values given; exit 0 when valid, 2 for values the chart's schema refuses or bad arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("helm_python")
pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]


def chart(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "chart.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_default_values_are_valid_including_the_raycluster():
    res = chart()
    assert res.returncode == 0, res.stderr
    assert "RayCluster" in res.stdout and "all valid" in res.stdout


def test_values_files_and_sets(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("mode: standalone\nstore:\n  shards: 2\n")
    res = chart("-f", str(f), "--set", "store.replicas=3", "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert "StatefulSet" in res.stdout and "RayCluster" not in res.stdout
    assert list((tmp_path / "out").rglob("*.yaml"))


@pytest.mark.parametrize(
    "args",
    [["--set", "store.shards=0"], ["--set", "noequals"], ["-f", "/nonexistent/values.yaml"]],
)
def test_bad_values_exit_2_with_one_sentence(args):
    res = chart(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
