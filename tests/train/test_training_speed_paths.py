"""The fast training paths (native gather-pool autograd, TDQKR gradients through the selected
cells only) train exactly like the straightforward reference paths they replaced."""

from __future__ import annotations

import pytest
import torch

from ultramem_dist.kernels import gather_pool
from ultramem_dist.model import load_pretrained, preset
from ultramem_dist.model import ultramem as ultramem_mod
from ultramem_dist.model.ultramem import UltraMemLayer
from ultramem_dist.train import Corpus, TrainConfig, train

# train/val losses of preset("micro") under TCFG, computed with the code before the
# training-speed work (commit 07239b3: embedding_bag autograd, TDQKR grid with autograd)
PINNED = [5.365930080413818, 5.174440622329712, 5.000890731811523, 4.946679592132568]
TCFG = TrainConfig(steps=4, batch_size=4, seq_len=32, eval_every=2, eval_batches=2, warmup=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return Corpus.stdlib(cache_dir=tmp_path_factory.mktemp("cache"))


def _reference_tdqkr(s_row, s_col, cores, u, v, m, candidates="paper"):
    """TDQKR with autograd through the whole m x m candidate grid (the old form)."""
    assert candidates == "paper"
    k_side, r = s_row.shape[-1], s_row.shape[2]
    row_idx = torch.einsum("thri,hr->thi", s_row, u).topk(m, dim=-1).indices
    col_idx = torch.einsum("thri,hr->thi", s_col, v).topk(m, dim=-1).indices
    sr = s_row.gather(-1, row_idx.unsqueeze(2).expand(-1, -1, r, -1))
    sc = s_col.gather(-1, col_idx.unsqueeze(2).expand(-1, -1, r, -1))
    flat = torch.einsum("thai,hcab,thbj->thijc", sr, cores, sc).flatten(2, 3)
    best = flat.sum(-1).topk(m, dim=-1).indices
    scores = flat.gather(2, best.unsqueeze(-1).expand(-1, -1, -1, flat.shape[-1]))
    return row_idx.gather(-1, best // m) * k_side + col_idx.gather(-1, best % m), scores


def _losses(result) -> list[float]:
    return [x for h in result.history for x in (h["train_loss"], h["val_loss"])]


def _torch_pool(self, sel):
    return gather_pool(
        self.values, sel.indices, sel.blocks, sel.weights, self.cfg.expansion, backend="torch"
    )


def test_training_matches_the_reference_paths_and_the_old_code(corpus, tmp_path, monkeypatch):
    fast = train(preset("micro"), TCFG, tmp_path / "fast", corpus=corpus, progress=False)
    got = _losses(fast)
    assert got == pytest.approx(PINNED, abs=2e-5)
    with monkeypatch.context() as mp:
        mp.setattr(ultramem_mod, "tdqkr_topm", _reference_tdqkr)
        mp.setattr(UltraMemLayer, "pool_local", _torch_pool)
        ref = train(preset("micro"), TCFG, tmp_path / "ref", corpus=corpus, progress=False)
    assert _losses(ref) == pytest.approx(got, abs=2e-5)
    a = torch.load(tmp_path / "fast" / "trainer_state.pt", weights_only=False)["optimizer"]
    b = torch.load(tmp_path / "ref" / "trainer_state.pt", weights_only=False)["optimizer"]
    for key, state in a["state"].items():  # Adam moments of every parameter
        torch.testing.assert_close(
            state["exp_avg"], b["state"][key]["exp_avg"], atol=1e-6, rtol=1e-4
        )
    pa = load_pretrained(tmp_path / "fast").state_dict()
    pb = load_pretrained(tmp_path / "ref").state_dict()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], atol=1e-5, rtol=1e-4)
