"""``ultramem-dist demo`` never deletes data it did not create in that run: a model it did not
train is refused (exit 2, nothing touched); a full run (slow: Ray + a 1-step training) serves a
scratch store of its own, removes only that, and leaves ``WORKDIR/store`` as it was."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ultramem_dist.cli import load_commands
from ultramem_dist.cli.demo_cmd import DEMO_MARKER
from ultramem_dist.model import MemoryLM, preset, save_pretrained
from ultramem_dist.store import export_checkpoint

app = load_commands()


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def user_workdir(tmp_path):
    """A workdir as a user leaves it: their own model and a store they exported."""
    torch.manual_seed(0)
    ckpt = save_pretrained(MemoryLM(preset("micro")), tmp_path / "model")
    export_checkpoint(ckpt, tmp_path / "store", shards=1, version="v1")
    (tmp_path / "notes.txt").write_text("mine\n")
    return tmp_path


def test_demo_refuses_a_model_it_did_not_train(user_workdir):
    before = _tree(user_workdir)
    res = CliRunner().invoke(app, ["demo", "--workdir", str(user_workdir), "--steps", "3"])
    assert res.exit_code == 2, res.stderr
    assert "did not train" in res.stderr and "--workdir" in res.stderr
    assert _tree(user_workdir) == before


@pytest.mark.slow
def test_a_demo_run_keeps_the_users_store(tmp_path):
    work = tmp_path / "w"
    torch.manual_seed(0)
    ckpt = save_pretrained(MemoryLM(preset("micro")), tmp_path / "elsewhere")
    export_checkpoint(ckpt, work / "store", shards=1, version="v1")
    before = _tree(work / "store")
    env = {**os.environ, "ULTRAMEM_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}
    for _ in range(2):  # the second run reuses the model (and still keeps the store)
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "ultramem_dist.cli",
                "demo",
                "--workdir",
                str(work),
                "--steps",
                "1",
                "--max-new-tokens",
                "8",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert _tree(work / "store") == before
        assert not list(work.glob(".demo-store-*"))
        assert (work / "model" / DEMO_MARKER).is_file()
    assert "reusing the trained model" in res.stderr
    assert not any(line != line.rstrip() for line in res.stdout.splitlines())
