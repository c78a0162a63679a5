"""The verification cache (``--verify=cached``): a node's first load hashes every file, later
loads skip only files a trusted record outside the store says are the same, unchanged file;
anything changed after verification is hashed again and refused."""

from __future__ import annotations

import hashlib
import os
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ultramem_dist.cli import load_commands
from ultramem_dist.errors import ChecksumError
from ultramem_dist.reliability.synthetic import make_synthetic_store
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import load_shard, verify_store
from ultramem_dist.store import reader as reader_mod
from ultramem_dist.store import verify as verify_mod

KW = {"n_rows": 100, "dv": 8, "d_model": 8, "topm": 2}
SHARD0 = "shard-00000-of-00002.safetensors"


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(verify_mod.ENV_CACHE_DIR, str(tmp_path / "cache"))
    return make_synthetic_store(tmp_path / "store", shards=2, tables={"row": ("row", False)},
                                **KW)  # fmt: skip


@pytest.fixture
def hashes(monkeypatch) -> list[int]:
    """Counts the sha256 computations the reader starts."""
    calls: list[int] = []
    real = hashlib.sha256

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(reader_mod, "hashlib", types.SimpleNamespace(sha256=counting))
    return calls


def _flip_a_byte_keeping_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime; ctime moves


def test_first_load_hashes_later_loads_skip_only_with_a_record(store, hashes):
    load_shard(store, 0, verify="cached")
    assert len(hashes) == 1 and len(list(verify_mod.cache_dir().glob("*.json"))) == 1
    load_shard(store, 0, verify="cached")
    assert len(hashes) == 1  # the record matched: no re-hash
    load_shard(store, 0, verify="always")
    assert len(hashes) == 2  # always means always
    load_shard(store, 0, verify="never")
    assert len(hashes) == 2


def test_a_file_changed_after_verification_is_still_refused(store, hashes):
    load_shard(store, 0, verify="cached")
    _flip_a_byte_keeping_mtime(store / "v1" / SHARD0)
    with pytest.raises(ChecksumError, match="sha256"):
        load_shard(store, 0, verify="cached")
    assert len(hashes) == 2
    with pytest.raises(ChecksumError, match="sha256"):
        verify_store(store, verify="cached")


def test_a_replaced_file_misses_the_cache(store, hashes):
    load_shard(store, 0, verify="cached")
    path = store / "v1" / SHARD0
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)  # same content, a new inode: hashed again (and accepted)
    load_shard(store, 0, verify="cached")
    assert len(hashes) == 2


def test_records_others_could_write_are_not_trusted(store, hashes):
    load_shard(store, 0, verify="cached")
    (rec,) = verify_mod.cache_dir().glob("*.json")
    assert rec.stat().st_mode & 0o077 == 0  # written 0600
    rec.chmod(0o666)
    load_shard(store, 0, verify="cached")
    assert len(hashes) == 2  # world-writable record: ignored, re-hashed (and rewritten 0600)
    verify_mod.cache_dir().chmod(0o777)
    load_shard(store, 0, verify="cached")
    assert len(hashes) == 3  # world-writable cache directory: ignored too


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_records_owned_by_another_user_are_not_trusted(store, hashes):
    load_shard(store, 0, verify="cached")
    (rec,) = verify_mod.cache_dir().glob("*.json")
    os.chown(rec, 12345, 12345)
    load_shard(store, 0, verify="cached")
    assert len(hashes) == 2


def test_a_forged_record_for_another_identity_is_not_trusted(store, hashes):
    load_shard(store, 0, verify="cached")
    (rec,) = verify_mod.cache_dir().glob("*.json")
    rec.write_text(rec.read_text().replace('"st_ino": ', '"st_ino": 1'))
    load_shard(store, 0, verify="cached")
    assert len(hashes) == 2


def test_bad_verify_modes_are_refused(store, tmp_path):
    with pytest.raises(ValueError, match="verify"):
        load_shard(store, 0, verify="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="verify"):
        ServerConfig(store=store, verify="sometimes")
    res = CliRunner().invoke(load_commands(), ["serve-shard", str(store), "--shard", "0",
                                               "--verify", "sometimes"])  # fmt: skip
    assert res.exit_code == 2, res.output
