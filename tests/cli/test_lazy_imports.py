"""``ultramem-dist --help`` and input errors answer before torch, Ray or gRPC is imported
(a correctness property of the entry point, not a timing: those imports take seconds)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "grpc")
PROBE = """
import json, sys
sys.argv = ["ultramem-dist", *json.loads(sys.argv[1])]
from ultramem_dist.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in HEAVY if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
""".replace("HEAVY", repr(HEAVY))


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--help"], 0),
        (["--version"], 0),
        (["export", "--help"], 0),
        (["up", "--help"], 0),
        (["export", "nope", "--out", "x", "--shards", "0"], 2),
        (["up", "/nonexistent-store"], 2),
        (["roll", "/nonexistent-store", "--version", "v2"], 2),
        (["scale", "--shards", "0"], 2),
        (["generate", "--prompt", "x"], 2),
        (["import-official", "x.pt", "--out", "y"], 2),
    ],
)
def test_help_and_input_errors_do_not_import_torch_ray_or_grpc(argv, code):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": code, "heavy": []}, (argv, result, out.stderr)
