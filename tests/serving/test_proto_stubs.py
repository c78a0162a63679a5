"""The checked-in stubs are exactly what the generator produces, and import cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_regenerating_the_stubs_gives_identical_files():
    res = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr


def test_stubs_import_by_absolute_package_path_from_anywhere(tmp_path):
    code = (
        "from ultramem_dist.proto.ultramem.v1 import gather_pb2, gather_pb2_grpc;"
        "print(gather_pb2.DESCRIPTOR.package, gather_pb2_grpc.GatherPoolStub.__name__)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ultramem.v1", "GatherPoolStub"]
