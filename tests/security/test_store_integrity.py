"""What a shard refuses to serve: files whose sha256 does not match the manifest (even a
same-size swap), and any manifest path or version directory that escapes the store through
``..``, an absolute path or a symlink. (tests/store covers the basic cases; these add the
ones an attacker with write access to part of the volume would try.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ultramem_dist.cli import load_commands
from ultramem_dist.errors import ChecksumError, ManifestError, StorePathError
from ultramem_dist.reliability.synthetic import make_synthetic_store
from ultramem_dist.store import load_shard, open_manifest, verify_store

app = load_commands()

KW = {"n_rows": 100, "dv": 8, "d_model": 8, "topm": 2}
SHARD0, SHARD1 = "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"


@pytest.fixture
def store(tmp_path) -> Path:
    return make_synthetic_store(tmp_path / "store", shards=2, tables={"row": ("row", False)},
                                **KW)  # fmt: skip


def _manifest(store: Path) -> tuple[Path, dict]:
    p = store / "v1" / "manifest.json"
    return p, json.loads(p.read_text())


def test_same_size_file_swap_fails_the_checksum(store):
    a, b = store / "v1" / SHARD0, store / "v1" / SHARD1
    assert a.stat().st_size == b.stat().st_size  # equal row counts: a swap keeps sizes
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(ChecksumError, match="sha256"):
        load_shard(store, 0)
    with pytest.raises(ChecksumError, match="sha256"):
        verify_store(store)


def test_symlinked_version_directory_outside_the_store_is_refused(store, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(store / "v1", outside / "v2")
    m = outside / "v2" / "manifest.json"  # a self-consistent version "v2", outside the store
    m.write_text(json.dumps({**json.loads(m.read_text()), "version": "v2"}))
    (store / "v2").symlink_to(outside / "v2", target_is_directory=True)
    (store / "LATEST").write_text("v2\n")
    with pytest.raises(StorePathError):
        open_manifest(store)
    with pytest.raises(StorePathError):
        load_shard(store, 0, "v2")


def test_symlinked_subdirectory_in_a_manifest_path_is_refused(store, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(store / "v1" / SHARD0, outside / SHARD0)
    (store / "v1" / "sub").symlink_to(outside, target_is_directory=True)
    p, raw = _manifest(store)
    raw["files"][f"sub/{SHARD0}"] = raw["files"].pop(SHARD0)
    raw["tables"][0]["shards"][0]["file"] = f"sub/{SHARD0}"
    p.write_text(json.dumps(raw))
    with pytest.raises(StorePathError, match="outside"):
        load_shard(store, 0)


@pytest.mark.parametrize("bad", ["../x.safetensors", "/etc/hostname", "./../x", "a\\..\\x",
                                 "x\x00.safetensors"])  # fmt: skip
def test_unreferenced_file_entries_are_checked_too(store, bad):
    p, raw = _manifest(store)
    raw["files"][bad] = {"sha256": "0" * 64, "bytes": 1}
    p.write_text(json.dumps(raw))
    with pytest.raises((StorePathError, ManifestError)):
        open_manifest(store)


def test_serve_shard_refuses_an_escaping_store(store, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(store / "v1" / SHARD0, outside)
    (store / "v1" / SHARD0).unlink()
    (store / "v1" / SHARD0).symlink_to(outside)
    res = CliRunner().invoke(app, ["serve-shard", str(store), "--shard", "0"])
    assert res.exit_code == 2 and "refusing to serve" in res.output
    assert "outside" in " ".join(res.output.split())
