"""UltraMemV2 fidelity to the official code: ``share_ratio`` windows of the shared table and the
paper's Eq. 26 value initialisation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ultramem_dist.model import LMConfig, MemoryLM, preset, save_pretrained
from ultramem_dist.model.config import UltraMemV2Config, eq26_value_std
from ultramem_dist.model.ultramemv2 import UltraMemV2Layer, measure_top1_score_var
from ultramem_dist.store.export import export_checkpoint

_CFG = UltraMemV2Config(knum=4, expansion=4, dk=8, heads=2, topm=4, rank=2, num_cores=2)


@pytest.mark.parametrize(
    ("ratio", "knum_w"),
    # A = 4**2 * 4 = 64 rows; official rule: knum' = floor(sqrt(64 * ratio))
    [(0.0, 4), (0.25, 4), (0.5, 5), (0.3, 4), (0.8, 7), (1.0, 8)],
)
def test_window_follows_the_official_share_ratio_rule(ratio: float, knum_w: int) -> None:
    cfg = replace(_CFG, share_ratio=ratio)
    assert cfg.window_knum(4) == knum_w
    for li in range(4):
        layer = UltraMemV2Layer(24, cfg, layer_index=li, num_layers=4)
        assert layer.offset == li * 16 and layer.total_rows == 64
        assert layer.n_rows == knum_w**2 and layer.k_side == 2 * knum_w
        assert tuple(layer.keys.shape) == (2, 2, 2 * knum_w, 8, 2)
        assert layer.ive_perm.numel() == 4 * knum_w**2
        rows = layer.select(torch.randn(9, 24)).indices
        # every row lies in the layer's window [offset, offset + W) taken modulo A
        assert bool((((rows - layer.offset) % 64) < layer.n_rows).all())


def test_windows_overlap_and_wrap_with_share_ratio_one() -> None:
    cfg = replace(_CFG, share_ratio=1.0)
    layers = [UltraMemV2Layer(24, cfg, layer_index=li, num_layers=4) for li in range(4)]
    assert all(m.n_rows == 64 for m in layers)  # every layer addresses the whole table
    seen = torch.cat([m.select(torch.randn(200, 24)).indices.flatten() for m in layers])
    assert int(seen.min()) < 16 and int(seen.max()) >= 48  # rows past every offset, wrapped


def test_ratio_one_over_l_is_the_default_disjoint_layout() -> None:
    torch.manual_seed(3)
    x = torch.randn(6, 24)
    for li in range(4):
        torch.manual_seed(li)
        a = UltraMemV2Layer(24, _CFG, layer_index=li, num_layers=4)
        torch.manual_seed(li)
        b = UltraMemV2Layer(24, replace(_CFG, share_ratio=0.25), layer_index=li, num_layers=4)
        assert torch.equal(a.select(x).indices, b.select(x).indices)


def test_export_writes_each_layers_window(tmp_path) -> None:
    cfg = preset("micro", "ultramemv2")  # knum=4, 4 layers: A = 64
    cfg.ultramemv2.share_ratio = 0.5
    torch.manual_seed(0)
    model = MemoryLM(cfg)
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    manifest = export_checkpoint(ckpt, tmp_path / "store", shards=2, by="row", version="s1")
    entry = manifest.tables[0]
    assert entry.n_rows == 64
    assert [(x.layer, x.offset, x.n_rows) for x in entry.shared_layers] == [
        (i, 16 * i, 25) for i in range(4)
    ]


def test_new_fields_leave_the_v2_config_hashes_alone() -> None:
    # hashes of V2 checkpoints written before share_ratio existed (main at 07239b3)
    assert preset("tiny", "ultramemv2").compute_hash() == "b588ec8994b8b447"
    assert preset("micro", "ultramemv2").compute_hash() == "1871d761e3a7e69c"
    cfg = preset("micro", "ultramemv2")
    cfg.ultramemv2.share_ratio = 0.5
    assert cfg.compute_hash() != "1871d761e3a7e69c"


@pytest.mark.parametrize("bad", [{"share_ratio": 1.5}, {"share_ratio": -0.1}, {"value_std": -1}])
def test_bad_share_ratio_or_std_is_refused(bad: dict) -> None:
    data = preset("micro", "ultramemv2").to_dict()
    data["ultramemv2"].update(bad)
    with pytest.raises(ValueError, match="ultramemv2"):
        LMConfig.from_dict(data)


def test_a_window_too_small_for_topm_is_refused() -> None:
    data = preset("micro", "ultramemv2").to_dict()  # topm 4, E 4: needs knum' >= 2
    data["ultramemv2"]["share_ratio"] = 0.05  # floor(sqrt(64 * 0.05)) = 1: K = 2 < 4
    with pytest.raises(ValueError, match="topm m=4 is larger than the K=2"):
        LMConfig.from_dict(data)


def test_eq26_formula_by_hand() -> None:
    # D=256, d_ff=1024 (k_inner 4), m=16, H=2, sigma_s^2=0.1, d_pre=32, Dv=128, L=6
    want = (0.2 * 4 * 256 / (16 * 2 * 1.1 * 32 * 128 * 6)) ** 0.25
    assert eq26_value_std(256, 1024, 16, 2, 32, 128, 6, 0.1) == pytest.approx(want, rel=1e-12)
    # no pre-values: d_pre counts as 1
    assert eq26_value_std(256, 1024, 16, 2, 0, 128, 6, 0.0) == pytest.approx(
        (0.2 * 4 * 256 / (16 * 2 * 128 * 6)) ** 0.25, rel=1e-12
    )


def test_value_std_zero_initialises_by_eq26() -> None:
    cfg = preset("tiny", "ultramemv2")  # 6 * 1024 rows: std estimated to ~1%
    cfg.ultramemv2.value_std = 0.0
    torch.manual_seed(0)
    model = MemoryLM(cfg)
    v2 = cfg.ultramemv2
    score_var = measure_top1_score_var(model.v2_layers[0])
    assert math.isfinite(score_var) and 0 < score_var < 10
    want = eq26_value_std(
        cfg.d_model, cfg.d_ff, v2.topm, v2.heads, v2.pre_vdim, cfg.d_model // 2, 6, score_var
    )
    table = model.shared_table
    assert table is not None
    assert float(table.values.detach().std()) == pytest.approx(want, rel=0.03)
    assert float(table.pre_values.detach().std()) == pytest.approx(want, rel=0.03)
    assert abs(want - 0.02) > 0.05  # a different scale from the 0.02 default
    default = MemoryLM(preset("tiny", "ultramemv2")).shared_table
    assert default is not None
    assert float(default.values.detach().std()) == pytest.approx(0.02, rel=0.03)
