"""Export -> manifest -> verified, memory-mapped load; corrupt stores are refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_table_spec, random_queries

from ultramem_dist.errors import (
    ChecksumError,
    ExportError,
    ManifestError,
    StoreError,
    StorePathError,
)
from ultramem_dist.kernels import gather_pool
from ultramem_dist.store import export_tables, load_shard, open_manifest, verify_store
from ultramem_dist.store.manifest import MANIFEST_NAME
from ultramem_dist.store.merge import fold_projector


def _export(root: Path, shards=2, by="row", merged=False, version="v1", dtype="float32", **kw):
    spec = make_table_spec(**kw)
    m = export_tables(
        {"mem0": spec, "mem1": make_table_spec(seed=7, **kw)},
        root,
        shards=shards,
        by=by,
        merged=merged,
        dtype=dtype,
        version=version,
        model_id="unit",
        config_hash="c" * 16,
    )
    return spec, m


def test_manifest_records_dims_layout_ive_and_checksums(tmp_path):
    spec, m = _export(tmp_path, shards=3, by="dim")
    raw = json.loads((tmp_path / "v1" / MANIFEST_NAME).read_text())
    assert raw["schema_version"] == 1 and raw["version"] == "v1"
    assert raw["model_id"] == "unit" and raw["config_hash"] == "c" * 16
    t = raw["tables"][0]
    assert (
        t["n_rows"],
        t["dv"],
        t["expansion"],
        t["num_cores"],
        t["d_model"],
        t["topm"],
        t["heads"],
    ) == (600, 32, 4, 2, 24, 4, 2)
    assert t["sharding"] == "dim" and [s["col_lo"] for s in t["shards"]] == [0, 11, 21]
    assert t["ive_file"] == "ive_perm.safetensors" and t["ive_seed"] == 0
    files = sorted(p.name for p in (tmp_path / "v1").iterdir() if p.name != MANIFEST_NAME)
    assert sorted(raw["files"]) == files  # every file has a sha256 + size
    assert (tmp_path / "LATEST").read_text().strip() == "v1"


@pytest.mark.parametrize("by", ["row", "dim"])
@pytest.mark.parametrize("merged", [False, True])
def test_loaded_shards_reproduce_the_local_pool(tmp_path, by, merged):
    spec, m = _export(tmp_path, shards=3, by=by, merged=merged)
    idx, blk, w = random_queries(spec, 7)
    ref = gather_pool(spec.values, idx, blk, w, spec.expansion)
    if merged:
        ref = ref.reshape(7, -1) @ spec.out_proj.T
    parts = []
    for k in range(3):
        st = load_shard(tmp_path, k).tables["mem0"]
        lo, hi = st.slot.row_lo, st.slot.row_hi
        own = (idx >= lo) & (idx < hi)
        tok = torch.arange(7)[:, None].expand_as(idx)[own]
        offs = torch.zeros(8, dtype=torch.long)
        offs[1:] = torch.cumsum(torch.bincount(tok, minlength=7), 0)
        li, lb = idx[own] - lo, blk[own]
        nb = spec.expansion
        if merged:
            li, lb, nb = lb * (hi - lo) + li, torch.zeros_like(lb), 1
        out = gather_pool(
            st.values, li, lb, w[own], nb, segments=st.segments, offsets=offs, sum_segments=merged
        )
        parts.append(out.reshape(7, -1) if merged else out)
    got = sum(parts) if by == "row" else torch.cat(parts, -1)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_merged_fold_equals_projected_pool():
    spec = make_table_spec()
    full = fold_projector(spec.values, spec.out_proj, 4, 2, (0, 600), (0, 24))
    assert full.shape == (4 * 600, 2 * 24)
    j, p = 17, 3
    cw = 16
    row = sum(
        spec.out_proj[:, p * 32 + c * cw : p * 32 + (c + 1) * cw]
        @ spec.values[j, c * cw : (c + 1) * cw]
        for c in range(2)
    )
    torch.testing.assert_close(full[p * 600 + j].view(2, 24).sum(0), row, atol=1e-6, rtol=1e-5)


def test_values_are_memory_mapped_not_copied(tmp_path):
    _export(tmp_path, n_rows=4096, dv=64)
    st = load_shard(tmp_path, 0).tables["mem0"]
    path = str((tmp_path / "v1" / st.slot.file).resolve())
    maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    assert path in maps
    # the tensor's data lives inside that mapping
    ptr = st.values.data_ptr()
    ranges = [
        tuple(int(x, 16) for x in line.split()[0].split("-"))
        for line in maps.splitlines()
        if line.endswith(path)
    ]
    assert any(lo <= ptr < hi for lo, hi in ranges)


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 1e-2)])
def test_half_precision_storage_accumulates_in_fp32(tmp_path, dtype, tol):
    spec, _ = _export(tmp_path, shards=1, by="row", dtype=dtype)
    st = load_shard(tmp_path, 0).tables["mem0"]
    assert st.values.dtype == getattr(torch, dtype)
    idx, blk, w = random_queries(spec, 5)
    got = gather_pool(st.values, idx, blk, w, 4, segments=st.segments)
    ref = gather_pool(spec.values, idx, blk, w, 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def _shard_file(root: Path) -> Path:
    return root / "v1" / "shard-00000-of-00002.safetensors"


def test_corrupt_file_is_refused(tmp_path):
    _export(tmp_path)
    f = _shard_file(tmp_path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256"):
        load_shard(tmp_path, 0)
    load_shard(tmp_path, 1)  # the other shard's files are intact


def test_truncated_file_is_refused(tmp_path):
    _export(tmp_path)
    f = _shard_file(tmp_path)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ChecksumError, match="truncated"):
        load_shard(tmp_path, 0)
    with pytest.raises(ChecksumError):
        verify_store(tmp_path)


def test_missing_file_is_refused(tmp_path):
    _export(tmp_path)
    _shard_file(tmp_path).unlink()
    with pytest.raises(ChecksumError, match="missing"):
        load_shard(tmp_path, 0)


def _edit_manifest(root: Path, fn) -> None:
    p = root / "v1" / MANIFEST_NAME
    raw = json.loads(p.read_text())
    fn(raw)
    p.write_text(json.dumps(raw))


def test_header_that_disagrees_with_the_manifest_is_refused(tmp_path):
    """A well-formed file whose checksum matches but whose tensor is not what the manifest says."""
    _export(tmp_path)

    def swap(raw):  # claim shard 0's file is shard 1's (both checksums are valid files)
        raw["tables"][0]["shards"][0]["tensor"] = "nope"

    _edit_manifest(tmp_path, swap)
    with pytest.raises(ChecksumError, match="lacks tensor"):
        load_shard(tmp_path, 0)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "a/../../x", ""])
def test_manifest_paths_cannot_escape_the_store(tmp_path, bad):
    _export(tmp_path)

    def escape(raw):
        old = raw["tables"][0]["shards"][0]["file"]
        raw["tables"][0]["shards"][0]["file"] = bad
        raw["files"][bad] = raw["files"].pop(old)
        for t in raw["tables"][1:]:
            for s in t["shards"]:
                if s["file"] == old:
                    s["file"] = bad

    _edit_manifest(tmp_path, escape)
    with pytest.raises((StorePathError, ManifestError)):
        load_shard(tmp_path, 0)


def test_symlink_escaping_the_store_is_refused(tmp_path):
    _export(tmp_path / "store")
    outside = tmp_path / "outside.safetensors"
    f = _shard_file(tmp_path / "store")
    outside.write_bytes(f.read_bytes())
    f.unlink()
    f.symlink_to(outside)
    with pytest.raises(StorePathError):
        load_shard(tmp_path / "store", 0)


def test_inconsistent_manifest_is_refused(tmp_path):
    _export(tmp_path)
    _edit_manifest(tmp_path, lambda raw: raw["tables"][0]["shards"][1].update(row_lo=1))
    with pytest.raises(ManifestError, match="contiguous"):
        open_manifest(tmp_path)
    _edit_manifest(tmp_path, lambda raw: raw.update(schema_version=99))
    with pytest.raises(ManifestError, match="schema version 99"):
        open_manifest(tmp_path)
    (tmp_path / "v1" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="JSON"):
        open_manifest(tmp_path)


def test_latest_pointer_and_version_ids(tmp_path):
    _export(tmp_path, version="v1")
    _export(tmp_path, version="v2")
    assert open_manifest(tmp_path)[1].version == "v2"
    assert open_manifest(tmp_path, "v1")[1].version == "v1"
    with pytest.raises(ExportError, match="immutable"):
        _export(tmp_path, version="v2")
    (tmp_path / "LATEST").write_text("../../etc\n")
    with pytest.raises(StorePathError):
        open_manifest(tmp_path)
    with pytest.raises(StoreError, match="no version"):
        open_manifest(tmp_path, "v3")
    with pytest.raises(StoreError, match="shard 5"):
        load_shard(tmp_path, 5, "v1")


def test_export_rejects_bad_inputs(tmp_path):
    spec = make_table_spec()
    with pytest.raises(ExportError, match="out_proj"):
        export_tables(
            {"m": make_table_spec().__class__(**{**spec.__dict__, "out_proj": None})},
            tmp_path,
            shards=1,
            merged=True,
        )
    nan = make_table_spec()
    nan.values[0, 0] = float("nan")
    with pytest.raises(ExportError, match="NaN"):
        export_tables({"m": nan}, tmp_path, shards=1)
    with pytest.raises(ExportError, match="cannot split"):
        export_tables({"m": spec}, tmp_path, shards=601, by="row")
    with pytest.raises(ExportError, match="dtype"):
        export_tables({"m": spec}, tmp_path, shards=1, dtype="int8")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
