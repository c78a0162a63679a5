"""UltraMemV2 stores: one shared table (values + pre-values) stored once, per-layer offsets and
permutations in the manifest (schema 2); v1 stores keep schema 1."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.errors import InvalidRequestError, ManifestError
from ultramem_dist.model import MemoryLM, preset, save_pretrained
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving.validate import Limits, decode_request
from ultramem_dist.store.export import IVE_FILE, export_checkpoint
from ultramem_dist.store.manifest import MANIFEST_NAME, Manifest
from ultramem_dist.store.reader import load_shard, open_manifest, verify_store


@pytest.fixture(scope="module")
def v2_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = MemoryLM(preset("micro", "ultramemv2"))
    path = save_pretrained(model, tmp_path_factory.mktemp("v2") / "ckpt")
    return model, path


@pytest.mark.parametrize("by", ["row", "dim"])
def test_shared_table_is_stored_once_with_offsets_and_permutations(v2_ckpt, tmp_path, by):
    model, ckpt = v2_ckpt
    manifest = export_checkpoint(ckpt, tmp_path / "store", shards=2, by=by, version="s1")
    assert manifest.schema_version == 2
    assert [t.table_id for t in manifest.tables] == ["shared"]
    entry = manifest.tables[0]
    table = model.shared_table
    assert entry.n_rows == table.values.shape[0] and entry.sharding == by
    assert entry.pre_vdim == table.pre_values.shape[1]
    n = model.cfg.ultramemv2.n_rows
    assert [(x.layer, x.offset, x.n_rows) for x in entry.shared_layers] == [
        (i, i * n, n) for i in range(len(model.v2_layers))
    ]
    vdir, _ = open_manifest(tmp_path / "store", "s1")
    perms = load_file(str(vdir / IVE_FILE))
    for x, layer in zip(entry.shared_layers, model.v2_layers, strict=True):
        assert torch.equal(perms[x.ive_tensor], layer.ive_perm)
    verify_store(tmp_path / "store", "s1")
    parts = [load_shard(tmp_path / "store", k, "s1").tables["shared"] for k in range(2)]
    values = table.values.detach()
    pre = table.pre_values.detach()
    if by == "row":
        torch.testing.assert_close(torch.cat([p.values for p in parts]), values)
        torch.testing.assert_close(torch.cat([p.pre_values.float() for p in parts]), pre)
    else:
        torch.testing.assert_close(torch.cat([p.values for p in parts], 1), values)
        for p in parts:  # pre-values whole on every dim shard
            torch.testing.assert_close(p.pre_values.float(), pre)


def test_v1_export_keeps_schema_1(tmp_path):
    model = MemoryLM(preset("micro", "ultramem"))
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    manifest = export_checkpoint(ckpt, tmp_path / "store", shards=1, version="a")
    assert manifest.schema_version == 1
    assert all(not t.is_shared for t in manifest.tables)
    raw = json.loads((tmp_path / "store" / "a" / MANIFEST_NAME).read_text())
    assert Manifest.from_json(raw) == manifest
    assert load_shard(tmp_path / "store", 0, "a").tables["mem0"].pre_values is None


def test_schema_1_manifest_cannot_hold_a_shared_table(v2_ckpt, tmp_path):
    _, ckpt = v2_ckpt
    export_checkpoint(ckpt, tmp_path / "store", shards=1, version="b")
    raw = json.loads((tmp_path / "store" / "b" / MANIFEST_NAME).read_text())
    assert Manifest.from_json(raw).tables[0].is_shared
    raw["schema_version"] = 1
    with pytest.raises(ManifestError, match="schema 2"):
        Manifest.from_json(raw)
    raw["schema_version"] = 2
    raw["tables"][0]["shared_layers"][1]["offset"] = 10**9
    with pytest.raises(ManifestError, match="outside"):
        Manifest.from_json(raw)


def test_merged_v2_export_is_refused(v2_ckpt, tmp_path):
    from ultramem_dist.errors import ExportError

    _, ckpt = v2_ckpt
    with pytest.raises(ExportError, match="merged"):
        export_checkpoint(ckpt, tmp_path / "store", shards=1, merged=True)


def test_shard_refuses_a_plain_gather_on_a_pre_valued_table(v2_ckpt, tmp_path):
    _, ckpt = v2_ckpt
    export_checkpoint(ckpt, tmp_path / "store", shards=1, version="c")
    shard = load_shard(tmp_path / "store", 0, "c")
    req = pb.GatherRequest(table_id="shared", table_version="c")
    encode_tensor(torch.tensor([[3]]), req.indices)
    encode_tensor(torch.tensor([[0]]), req.blocks)
    encode_tensor(torch.ones(1, 1, 2), req.weights)
    with pytest.raises(InvalidRequestError, match="must carry pre_input"):
        decode_request(req, shard, Limits(max_batch=64, max_per_query=64))
