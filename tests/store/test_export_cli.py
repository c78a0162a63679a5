"""``ultramem-dist export`` from a real checkpoint directory."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from ultramem_dist.cli import load_commands
from ultramem_dist.model import MemoryLM, preset, save_pretrained
from ultramem_dist.store import load_shard, open_manifest

app = load_commands()


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = MemoryLM(preset("micro"))
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt")), model


def test_export_checkpoint_writes_every_memory_layer(micro_checkpoint, tmp_path):
    ckpt, model = micro_checkpoint
    res = CliRunner().invoke(
        app,
        [
            "export",
            str(ckpt),
            "--out",
            str(tmp_path),
            "--shards",
            "2",
            "--by",
            "dim",
            "--version",
            "v1",
        ],
    )
    assert res.exit_code == 0, res.output
    _, m = open_manifest(tmp_path)
    assert m.dtype == "bfloat16"  # the serving default
    layers = model.ultramem_layers()
    assert [t.table_id for t in m.tables] == [layer.table_id for layer in layers]
    assert m.model_id == "ultramem-micro" and m.config_hash == model.cfg.compute_hash()
    t0 = m.tables[0]
    assert (t0.n_rows, t0.dv, t0.d_model, t0.ive_seed) == (64, 32, 64, 0)
    sl = [load_shard(tmp_path, k).tables["mem0"].values for k in range(2)]
    assert all(v.dtype == torch.bfloat16 for v in sl)
    # rounded once to bf16 (round-to-nearest-even, as Tensor.to does): bit-identical to that
    assert torch.equal(torch.cat(sl, 1), layers[0].values.detach().to(torch.bfloat16))


def test_export_float32_stays_selectable_and_exact(micro_checkpoint, tmp_path):
    ckpt, model = micro_checkpoint
    args = ["export", str(ckpt), "--out", str(tmp_path), "--shards", "1", "--dtype", "float32"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    _, m = open_manifest(tmp_path)
    assert m.dtype == "float32"
    got = load_shard(tmp_path, 0).tables["mem0"].values
    assert got.dtype == torch.float32
    assert torch.equal(got, model.ultramem_layers()[0].values.detach())


def test_export_auto_merged_half(micro_checkpoint, tmp_path):
    ckpt, _ = micro_checkpoint
    res = CliRunner().invoke(
        app,
        [
            "export",
            str(ckpt),
            "--out",
            str(tmp_path),
            "--shards",
            "3",
            "--merged",
            "--dtype",
            "bfloat16",
        ],
    )
    assert res.exit_code == 0, res.output
    _, m = open_manifest(tmp_path)
    assert all(t.merged and t.plan["requested"] == "auto" for t in m.tables)
    assert m.dtype == "bfloat16"


def test_export_refuses_models_without_value_tables(tmp_path):
    ckpt = save_pretrained(MemoryLM(preset("micro", kind="pkm")), tmp_path / "pkm")
    res = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "s")])
    assert res.exit_code == 2
    assert "only 'ultramem' models have value tables" in " ".join(res.output.split())


def test_export_refuses_a_non_checkpoint(tmp_path):
    res = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "not a checkpoint" in " ".join(res.output.split())
