"""The user path: `up` starts a local Ray head, `status`/`generate --store ray`/`scale` use it,
`down` stops everything (real processes, loopback only)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from conftest import CLI

from ultramem_dist.model import MemoryLM, preset, save_pretrained
from ultramem_dist.store.export import export_checkpoint

pytestmark = pytest.mark.integration


def _run(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=timeout)


def test_up_status_generate_scale_down(tmp_path):
    torch.manual_seed(0)
    ckpt = save_pretrained(MemoryLM(preset("micro")), tmp_path / "ckpt")
    export_checkpoint(ckpt, tmp_path / "store", shards=2, by="row")
    env = {**os.environ, "ULTRAMEM_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    # nothing running yet: a clear error, not a traceback
    res = _run(["status"], env)
    assert res.returncode == 1 and "ultramem-dist up" in res.stderr
    try:
        res = _run(["up", str(tmp_path / "store"), "--replicas", "1"], env)
        assert res.returncode == 0, res.stderr
        assert "is active" in res.stderr
        res = _run(["status", "--window", "0.2"], env)
        assert res.returncode == 0, res.stderr
        assert res.stderr.count("SERVING") == 2
        res = _run(["status", "--json"], env)
        assert res.returncode == 0, res.stderr
        assert len(json.loads(res.stdout)["active_endpoints"]) == 2
        for lookup in ("process", "thread"):  # the gRPC client in a lookup process / a thread
            res = _run(
                [
                    "generate",
                    "--checkpoint",
                    str(ckpt),
                    "--store",
                    "ray",
                    "--prompt",
                    "def f(",
                    "--max-new-tokens",
                    "8",
                    "--compare-local",
                    "--lookup",
                    lookup,
                ],
                env,
            )
            assert res.returncode == 0, res.stderr
            assert "identical" in res.stderr
        res = _run(["scale", "--shard", "1", "--replicas", "2"], env)
        assert res.returncode == 0, res.stderr
        res = _run(["status", "--window", "0.2"], env)
        assert res.stderr.count("SERVING") == 3
        res = _run(["scale", "--shards", "3", "--shard", "0", "--replicas", "1"], env)
        assert res.returncode == 2 and "either" in res.stderr  # ambiguous usage is refused
        res = _run(["scale", "--shard", "9", "--replicas", "2"], env)
        assert res.returncode == 2 and "shard 9 does not exist" in res.stderr  # bad input
    finally:
        res = _run(["down"], env)
    assert res.returncode == 0, res.stderr
    assert "local Ray cluster" in res.stderr
    res = _run(["status"], env)
    assert res.returncode == 1
