"""UltraMemV2 layer and LM wiring, checked against a numpy reference written from the paper's
formulas (full-grid scores, no TDQKR shortcut) rather than from the layer's code."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ultramem_dist.model import LMConfig, MemoryLM, load_pretrained, preset, save_pretrained
from ultramem_dist.model.config import UltraMemV2Config
from ultramem_dist.model.ultramemv2 import SharedValueTable, UltraMemV2Layer

_erf = np.vectorize(math.erf)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def numpy_v2_layer(layer: UltraMemV2Layer, table: SharedValueTable, x: np.ndarray) -> np.ndarray:
    """Reference forward: every grid cell scored exactly, top-m by the summed cores."""
    c = layer.cfg
    p = {k: v.detach().double().numpy() for k, v in layer.state_dict().items()}
    values = table.values.detach().double().numpy()
    pre_values = table.pre_values.detach().double().numpy()
    perm = layer.ive_perm.numpy()
    dk, n, k_side = c.dk, layer.n_rows, layer.k_side  # n: the layer's window of the table
    total = values.shape[0]
    q = x @ p["query.weight"].T
    q_row = _layer_norm(q[:, :dk], p["query_norm.weight"], p["query_norm.bias"])
    q_col = _layer_norm(q[:, dk:], p["query_norm.weight"], p["query_norm.bias"])
    keys = np.swapaxes(p["keys"], -1, -2)  # [H, 2, K, r, dk]
    keys = _layer_norm(keys, p["key_norm.weight"], p["key_norm.bias"])
    dv = values.shape[1]
    seg = dv // c.num_cores
    out = np.zeros((x.shape[0], dv))
    for t in range(x.shape[0]):
        pre_in = p["pre_query.weight"] @ x[t]
        for h in range(c.heads):
            s_row = keys[h, 0] @ q_row[t]  # [K, r]
            s_col = keys[h, 1] @ q_col[t]
            grid = np.einsum("ia,cab,jb->ijc", s_row, p["cores"][h], s_col)  # [K, K, h_c]
            flat = grid.reshape(k_side * k_side, c.num_cores)
            top = np.argsort(-flat.sum(-1), kind="stable")[: c.topm]
            for cell in top:
                z = perm[cell]
                row = (z % n + layer.offset) % total
                dot = pre_values[row] @ pre_in
                act = 0.5 * dot * (1 + _erf(dot / math.sqrt(2))) if c.pre_gelu else dot
                for core in range(c.num_cores):
                    cols = slice(core * seg, (core + 1) * seg)
                    out[t, cols] += flat[cell, core] * act * values[row, cols]
    return out @ p["out_proj.weight"].T


def _exact_cfg(**kw: object) -> UltraMemV2Config:
    # topm == K: every row and column is a candidate, so TDQKR's result is the exact top-m.
    base = UltraMemV2Config(
        knum=4, expansion=4, dk=8, heads=2, topm=8, rank=2, num_cores=2, pre_vdim=6
    )
    return replace(base, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"pre_gelu": False},
        {"num_cores": 1, "rank": 1, "heads": 1},
        {"expansion": 1, "topm": 4},
        {"share_ratio": 0.75, "topm": 12},  # 3 layers: overlapping windows of 6**2 rows, K=12
    ],
)
@pytest.mark.parametrize("layer_index", [0, 2])
def test_layer_matches_numpy_reference(kw: dict, layer_index: int) -> None:
    torch.manual_seed(layer_index + len(kw))
    cfg = _exact_cfg(**kw)
    d_model = 24
    table = SharedValueTable(cfg, num_layers=3, dv=d_model // 2)
    with torch.no_grad():
        table.values.normal_()
        table.pre_values.normal_()
    layer = UltraMemV2Layer(d_model, cfg, layer_index=layer_index, num_layers=3).double()
    table = table.double()
    x = torch.randn(5, d_model, dtype=torch.float64)
    got = layer(x, table).detach().numpy()
    want = numpy_v2_layer(layer, table, x.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_rows_stay_in_the_layers_slice_of_the_shared_table() -> None:
    cfg = _exact_cfg(topm=4)
    for li in range(3):
        layer = UltraMemV2Layer(24, cfg, layer_index=li, num_layers=3)
        sel = layer.select(torch.randn(7, 24))
        assert int(sel.indices.min()) >= li * cfg.n_rows
        assert int(sel.indices.max()) < (li + 1) * cfg.n_rows
        assert sel.weights.shape == (7, cfg.heads * cfg.topm, cfg.num_cores)
        assert int(sel.blocks.abs().sum()) == 0


def test_lm_places_a_layer_in_every_kth_block_and_stores_the_table_once() -> None:
    cfg = preset("micro", "ultramemv2")
    model = MemoryLM(cfg)
    assert model.v2_blocks == [0, 1, 2, 3]
    assert model.shared_table is not None
    assert model.shared_table.values.shape == (4 * cfg.ultramemv2.n_rows, cfg.d_model // 2)
    names = [k for k in model.state_dict() if k.endswith("values")]
    assert names == ["shared_table.values", "shared_table.pre_values"]
    every2 = LMConfig.from_dict(
        {**cfg.to_dict(), "ultramemv2": {**cfg.to_dict()["ultramemv2"], "every": 2}}
    )
    assert MemoryLM(every2).v2_blocks == [1, 3]


def test_lm_output_is_the_sum_of_block_ffn_and_memory() -> None:
    """Zeroing the memory output projections must give the same logits as removing memory."""
    torch.manual_seed(0)
    model = MemoryLM(preset("micro", "ultramemv2")).eval()
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        base = model(tokens)
        for layer in model.v2_layers:
            layer.out_proj.weight.zero_()
        zeroed = model(tokens)
        model._v2_at = {}
        plain = model(tokens)
    assert not torch.allclose(base, zeroed)
    torch.testing.assert_close(zeroed, plain)


def test_gradients_reach_values_pre_values_keys_and_cores() -> None:
    torch.manual_seed(1)
    model = MemoryLM(preset("micro", "ultramemv2"))
    _, total = model.loss(torch.randint(0, 256, (2, 12)))
    total.backward()
    table = model.shared_table
    assert table is not None
    for p in (
        table.values,
        table.pre_values,
        model.v2_layers[0].keys,
        model.v2_layers[0].cores,
        model.v2_layers[0].pre_query.weight,
    ):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    ids = {id(p) for p in model.value_parameters()}
    assert id(table.values) in ids and id(table.pre_values) in ids


def test_generation_with_cache_equals_full_recompute(tmp_path) -> None:
    torch.manual_seed(2)
    model = MemoryLM(preset("micro", "ultramemv2")).eval()
    prompt = torch.randint(0, 256, (1, 6))
    out = model.generate(prompt, 5)
    seq = prompt
    for _ in range(5):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    path = save_pretrained(model, tmp_path / "ckpt")
    again = load_pretrained(path)
    assert torch.equal(again.generate(prompt, 5), out)


def test_v1_config_hashes_are_unchanged_by_the_v2_field() -> None:
    # the hashes of checkpoints written before this wave (main at 7488545)
    assert preset("tiny", "ultramem").compute_hash() == "4b030805b10e33c8"
    assert preset("micro", "ultramem").compute_hash() == "b3533c15ad5e824b"
    assert preset("tiny", "dense").compute_hash() == "4999bab0f395c3cb"
    assert preset("tiny", "pkm").compute_hash() == "732a7ebfdcfe6713"
    assert preset("tiny", "ultramemv2").compute_hash() != preset("tiny", "ultramem").compute_hash()


@pytest.mark.parametrize(
    "bad",
    [{"expansion": 3}, {"topm": 99}, {"dv": 7}, {"every": 0}, {"pre_vdim": -1}],
)
def test_bad_v2_config_is_refused_with_a_clear_error(bad: dict) -> None:
    data = preset("micro", "ultramemv2").to_dict()
    data["ultramemv2"].update(bad)
    with pytest.raises(ValueError, match="ultramemv2"):
        LMConfig.from_dict(data)


def test_training_steps_lower_the_loss(tmp_path) -> None:
    from ultramem_dist.train import TrainConfig, train

    cfg = preset("micro", "ultramemv2")
    tcfg = TrainConfig(steps=12, batch_size=4, seq_len=32, lr=3e-3, eval_every=12, warmup=2)
    result = train(cfg, tcfg, tmp_path / "run", progress=False)
    model = load_pretrained(tmp_path / "run")
    assert model.cfg.kind == "ultramemv2"
    assert math.isfinite(result.val_loss) and result.train_loss < math.log(256)
