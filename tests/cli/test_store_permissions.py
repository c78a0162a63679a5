"""A store (and checkpoint) written by one uid is readable by another (the chart's non-root
pods): every file honours the umask, 0644 / 0755 under umask 022, checked by reading each file
from a subprocess running as uid/gid 65534 (``nobody``)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ultramem_dist.model import MemoryLM, preset, save_pretrained
from ultramem_dist.store import export_checkpoint

OTHER_UID = 65534


@pytest.fixture()
def world_dir():
    """A directory outside pytest's 0700 tmp root, so another uid can reach it."""
    d = Path(tempfile.mkdtemp(prefix="ultramem-perm-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _export(root: Path) -> list[Path]:
    old = os.umask(0o022)
    try:
        torch.manual_seed(0)
        ckpt = save_pretrained(MemoryLM(preset("micro")), root / "model")
        export_checkpoint(ckpt, root / "store", shards=2, version="v1")
    finally:
        os.umask(old)
    return sorted(p for p in root.rglob("*"))


def test_store_files_honour_umask_022(world_dir):
    paths = _export(world_dir)
    files = [p for p in paths if p.is_file()]
    assert {p.name for p in files} >= {"LATEST", "manifest.json", "model.safetensors"}
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_another_uid_reads_every_store_file(world_dir):
    files = [p for p in _export(world_dir) if p.is_file()]
    code = (
        "import os, sys\n"
        f"os.setgid({OTHER_UID}); os.setuid({OTHER_UID})\n"
        "for p in sys.argv[1:]:\n"
        "    with open(p, 'rb') as f: f.read()\n"
        "print(os.getuid(), len(sys.argv) - 1)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(OTHER_UID), str(len(files))]
