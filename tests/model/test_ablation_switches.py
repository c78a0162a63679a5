"""The ablation switches of the UltraMem layer (docs/ablation.md): each changes what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ultramem_dist.model import LMConfig, MemoryLM, PKMConfig, UltraMemConfig, UltraMemLayer
from ultramem_dist.model import preset as model_preset
from ultramem_dist.model.pkm import PKMLayer

D = 64


def _pkm_like(**over) -> UltraMemConfig:
    """The ladder's base at micro size: every switch in its PKM position."""
    base = dict(
        knum=8,
        expansion=1,
        dk=16,
        dv=D,
        heads=2,
        topm=4,
        num_cores=1,
        shared_query=False,
        softmax=True,
        value_proj=False,
        qk_norm=False,
        tdqkr=False,
        official_init=False,
    )
    return UltraMemConfig(**{**base, **over})


def _layer(cfg: UltraMemConfig, seed: int = 0) -> UltraMemLayer:
    torch.manual_seed(seed)
    return UltraMemLayer(D, cfg)


def _x(t: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


def test_pkm_like_layer_equals_the_pkm_baseline_layer():
    """All switches off is Lample et al.'s PKM: same query, keys, values → same output and
    gradients as PKMLayer (the IVE permutation with E = 1 only relabels the rows)."""
    ours = _layer(_pkm_like())
    pkm = PKMLayer(D, PKMConfig(n_keys=8, dk=16, heads=2, topk=4))
    with torch.no_grad():
        pkm.query.weight.copy_(ours.query.weight)
        pkm.keys.copy_(ours.keys[:, :, :, 0])
        ours.values[ours.ive_perm] = pkm.values
    x = _x()
    out_ours, out_pkm = ours(x), pkm(x)
    torch.testing.assert_close(out_ours, out_pkm, rtol=1e-5, atol=1e-6)
    out_ours.square().sum().backward()
    out_pkm.square().sum().backward()
    torch.testing.assert_close(ours.query.weight.grad, pkm.query.weight.grad, rtol=1e-4, atol=1e-6)


def test_additive_product_keys_select_the_exact_additive_top_m():
    """tdqkr=False: the rank-2 special case S_row=[s,1], S_col=[1,t], C=I ranks cells by s+t,
    which PKM's two-stage top-m finds exactly; checked against a numpy brute force."""
    layer = _layer(_pkm_like(softmax=False, topm=5))
    x = _x(9)
    sel = layer.select(x)
    q = (x @ layer.query.weight.detach().T).numpy().reshape(9, 2, 2, 16)
    keys = layer.keys.detach().numpy()[:, :, :, 0]  # [H, 2, K, dk]
    inv = torch.argsort(layer.ive_perm).numpy()
    k = layer.k_side
    for t in range(9):
        for h in range(2):
            grid = (q[t, h, 0] @ keys[h, 0].T)[:, None] + (q[t, h, 1] @ keys[h, 1].T)[None, :]
            want = set(np.argsort(-grid.ravel())[:5].tolist())
            virtual = inv[sel.indices[t, h * 5 : (h + 1) * 5].numpy()]
            assert set(virtual.tolist()) == want
            np.testing.assert_allclose(
                sel.weights[t, h * 5 : (h + 1) * 5, 0].detach().numpy(),
                grid[virtual // k, virtual % k],
                rtol=1e-5,
                atol=1e-6,
            )


def test_additive_keys_have_one_key_per_side_no_trained_core_and_fixed_uv():
    layer = _layer(_pkm_like(rank=2))
    assert tuple(layer.keys.shape) == (2, 2, 8, 1, 16)  # rank unused
    assert "cores" not in dict(layer.named_parameters())
    assert torch.equal(layer.cores, torch.eye(2).expand(2, 1, 2, 2))
    before = (layer.u.clone(), layer.v.clone())
    layer.refresh_svd()
    assert torch.equal(layer.u, before[0]) and torch.equal(layer.u, torch.tensor([[1.0, 0]] * 2))
    assert torch.equal(layer.v, before[1]) and torch.equal(layer.v, torch.tensor([[0, 1.0]] * 2))
    assert float(layer.aux_loss()) == 0.0
    with pytest.raises(ValueError, match="num_cores must be 1"):
        UltraMemLayer(D, _pkm_like(num_cores=2, dv=D))


def test_softmax_switch_normalises_each_heads_top_m_per_core():
    cfg = dict(knum=8, expansion=4, dk=16, heads=2, topm=4, num_cores=2)
    raw = _layer(UltraMemConfig(**cfg)).select(_x())
    soft = _layer(UltraMemConfig(**cfg, softmax=True)).select(_x())
    assert torch.equal(raw.indices, soft.indices) and torch.equal(raw.blocks, soft.blocks)
    w = raw.weights.detach().numpy().reshape(7, 2, 4, 2)  # [T, H, m, h_c]
    e = np.exp(w - w.max(axis=2, keepdims=True))
    want = (e / e.sum(axis=2, keepdims=True)).reshape(7, 8, 2)
    np.testing.assert_allclose(soft.weights.detach().numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("expansion", "dv"), [(1, D), (4, D // 4)])
def test_no_value_projector_outputs_the_pooled_blocks(expansion, dv):
    layer = _layer(_pkm_like(expansion=expansion, dv=dv, knum=4))
    assert layer.out_proj is None
    assert not any("out_proj" in n for n in layer.state_dict())
    x = _x()
    sel = layer.select(x)
    vals = layer.values.detach().numpy()
    idx, blk, w = sel.indices.numpy(), sel.blocks.numpy(), sel.weights.detach().numpy()[..., 0]
    want = np.zeros((7, expansion, dv), dtype=np.float32)
    for t in range(7):
        for j in range(idx.shape[1]):
            want[t, blk[t, j]] += w[t, j] * vals[idx[t, j]]
    np.testing.assert_allclose(layer(x).detach().numpy(), want.reshape(7, D), rtol=1e-5, atol=1e-6)


def test_no_value_projector_needs_e_times_dv_equal_to_d_model():
    with pytest.raises(ValueError, match="E\\*Dv == d_model"):
        UltraMemConfig(value_proj=False, expansion=4, dv=D // 2).validate(D)


def test_qk_norm_off_has_no_layernorm_and_raw_dot_product_scores():
    off = _layer(_pkm_like())
    assert not any(isinstance(m, nn.LayerNorm) for m in off.modules())
    x = _x()
    s_row, s_col = off.key_scores(x)  # [T, H, 1, K]
    q = (x @ off.query.weight.detach().T).numpy().reshape(7, 2, 2, 16)
    keys = off.keys.detach().numpy()[:, :, :, 0]
    np.testing.assert_allclose(
        s_row[:, :, 0].detach().numpy(), np.einsum("thd,hkd->thk", q[:, :, 0], keys[:, 0]),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    np.testing.assert_allclose(
        s_col[:, :, 0].detach().numpy(), np.einsum("thd,hkd->thk", q[:, :, 1], keys[:, 1]),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    on = _layer(_pkm_like(qk_norm=True))
    assert sum(isinstance(m, nn.LayerNorm) for m in on.modules()) == 3
    assert not torch.allclose(on.key_scores(x)[0], s_row)


def test_per_head_and_shared_query_widths():
    assert _layer(_pkm_like()).query.weight.shape == (2 * 2 * 16, D)
    assert _layer(_pkm_like(shared_query=True)).query.weight.shape == (2 * 16, D)


def test_official_init_switch():
    cfg = dict(knum=16, expansion=4, dk=16, heads=2, topm=4, num_cores=2)
    pkm_init = _layer(UltraMemConfig(**cfg, official_init=False))
    official = _layer(UltraMemConfig(**cfg))
    dv = D // 2
    # PKM init: PyTorch-default Linear (U(+-1/sqrt(fan_in))) and LayerNorm, values N(0, 1/Dv)
    assert pkm_init.query.weight.abs().max() <= D**-0.5
    assert pkm_init.out_proj.weight.abs().max() <= (4 * dv) ** -0.5
    for norm in (pkm_init.q_norm_row, pkm_init.q_norm_col, pkm_init.k_norm):
        assert torch.equal(norm.weight, torch.ones(16)) and torch.equal(norm.bias, torch.zeros(16))
    assert float(pkm_init.values.detach().std()) == pytest.approx(dv**-0.5, rel=0.05)
    # official init: LayerNorm scale Dk^-0.33, W_q ~ N(0, 1/sqrt(Dk)), values N(0, 0.02)
    assert torch.allclose(official.k_norm.weight, torch.full((16,), 16**-0.33))
    assert float(official.values.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(official.query.weight.detach().std()) == pytest.approx(16**-0.5, rel=0.1)


def test_new_switches_change_the_hash_only_away_from_their_defaults():
    micro = model_preset("micro")
    pinned = micro.compute_hash()
    explicit = LMConfig.from_dict(
        {
            **micro.to_dict(),
            "ultramem": {
                **micro.ultramem.__dict__,
                "softmax": False,
                "value_proj": True,
                "qk_norm": True,
                "tdqkr": True,
                "official_init": True,
            },
        }
    )
    assert explicit.compute_hash() == pinned
    changes = [
        {"softmax": True},
        {"value_proj": False, "dv": 16},
        {"qk_norm": False},
        {"tdqkr": False, "num_cores": 1},
        {"official_init": False},
    ]
    hashes = set()
    for change in changes:
        cfg = LMConfig.from_dict(
            {**micro.to_dict(), "ultramem": {**micro.ultramem.__dict__, **change}}
        )
        hashes.add(cfg.compute_hash())
    assert pinned not in hashes and len(hashes) == len(changes)


def test_in_place_ultramem_layer_runs_in_its_block():
    cfg = model_preset("micro")
    cfg.memory_spec = "2:2"
    model = MemoryLM(cfg).eval()
    assert model.memory_pairs == [(2, 2)]
    tokens = torch.randint(0, 256, (2, 9))
    base = model(tokens)
    with torch.no_grad():
        model.memory_layers[0].out_proj.weight.mul_(3.0)
    assert not torch.allclose(model(tokens), base)
