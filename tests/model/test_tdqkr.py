"""TDQKR selection: the fast path against a straightforward reference, and the two-sided rule."""

from __future__ import annotations

import pytest
import torch

from ultramem_dist.model import LMConfig, UltraMemConfig, preset
from ultramem_dist.model.ultramem import (
    brute_force_topm,
    key_recall,
    refresh_core_vectors,
    tdqkr_topm,
)


def _reference_tdqkr(s_row, s_col, cores, u, v, m):
    """The paper's TDQKR written plainly: score the whole m x m candidate grid with autograd,
    keep the top m cells (the form the layer used before the training-speed work)."""
    k_side = s_row.shape[-1]
    row_idx = torch.einsum("thri,hr->thi", s_row, u).topk(m, dim=-1).indices
    col_idx = torch.einsum("thri,hr->thi", s_col, v).topk(m, dim=-1).indices
    sr = s_row.gather(-1, row_idx.unsqueeze(2).expand(-1, -1, s_row.shape[2], -1))
    sc = s_col.gather(-1, col_idx.unsqueeze(2).expand(-1, -1, s_col.shape[2], -1))
    exact = torch.einsum("thai,hcab,thbj->thijc", sr, cores, sc)
    t, h = exact.shape[:2]
    flat = exact.reshape(t, h, m * m, -1)
    best = flat.sum(-1).topk(m, dim=-1).indices
    scores = flat.gather(2, best.unsqueeze(-1).expand(-1, -1, -1, flat.shape[-1]))
    rows, cols = row_idx.gather(-1, best // m), col_idx.gather(-1, best % m)
    return rows * k_side + cols, scores


def _scores(seed, t=24, h=2, r=2, k=32, cores=2):
    gen = torch.Generator().manual_seed(seed)
    s_row = torch.randn(t, h, r, k, generator=gen)
    s_col = torch.randn(t, h, r, k, generator=gen)
    c = torch.rand(h, cores, r, r, generator=gen)
    u, v = torch.zeros(h, r), torch.zeros(h, r)
    refresh_core_vectors(c, u, v)
    return s_row, s_col, c, u, v


@pytest.mark.parametrize("seed,cores", [(0, 1), (1, 2), (2, 3)])
def test_selection_scores_and_gradients_match_the_reference(seed, cores):
    s_row, s_col, c, u, v = _scores(seed, cores=cores)
    grads = []
    for fn in (_reference_tdqkr, tdqkr_topm):
        leaves = [x.clone().requires_grad_() for x in (s_row, s_col, c)]
        virtual, scores = fn(leaves[0], leaves[1], leaves[2], u, v, 8)
        weight = torch.linspace(-1, 1, scores.numel()).view_as(scores)
        (scores * weight).sum().backward()
        grads.append((virtual, scores.detach(), [x.grad for x in leaves]))
    (ref_v, ref_s, ref_g), (got_v, got_s, got_g) = grads
    assert torch.equal(got_v, ref_v)  # same cells, in the same order
    torch.testing.assert_close(got_s, ref_s)
    for a, b in zip(got_g, ref_g, strict=True):  # the cores' grad sums T*m terms: rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_two_sided_finds_pairs_of_large_negative_factors():
    """Rank 1, positive core: the best cells are the products of two large negatives, which
    the paper's top-of-each-side candidates cannot contain."""
    t, h, k, m = 8, 2, 32, 4
    gen = torch.Generator().manual_seed(3)
    s_row = torch.rand(t, h, 1, k, generator=gen)
    s_col = torch.rand(t, h, 1, k, generator=gen)
    s_row[..., : m // 2] = -5.0 - torch.rand(t, h, 1, m // 2, generator=gen)  # large negatives
    s_col[..., -(m // 2) :] = -5.0 - torch.rand(t, h, 1, m // 2, generator=gen)
    cores = torch.ones(h, 2, 1, 1)
    u, v = torch.zeros(h, 1), torch.zeros(h, 1)
    refresh_core_vectors(cores, u, v)
    exact = brute_force_topm(s_row, s_col, cores, m)
    paper, _ = tdqkr_topm(s_row, s_col, cores, u, v, m, "paper")
    two, scores = tdqkr_topm(s_row, s_col, cores, u, v, m, "two_sided")
    assert key_recall(paper, exact) == 0.0
    assert key_recall(two, exact) == 1.0
    rows, cols = two // k, two % k
    expect = s_row[:, :, 0].gather(-1, rows) * s_col[:, :, 0].gather(-1, cols)
    torch.testing.assert_close(scores, expect.unsqueeze(-1).expand(-1, -1, -1, 2))


@pytest.mark.parametrize("m", [1, 5, 8])
def test_two_sided_candidates_are_the_extremes_of_each_side(m):
    s_row, s_col, c, u, v = _scores(4)
    virtual, _ = tdqkr_topm(s_row, s_col, c, u, v, m, "two_sided")
    k = s_row.shape[-1]
    approx_row = torch.einsum("thri,hr->thi", s_row, u)
    order = approx_row.argsort(dim=-1, descending=True)
    allowed = torch.cat([order[..., : m - m // 2], order[..., k - m // 2 :]], dim=-1)
    rows = virtual // k
    assert (rows.unsqueeze(-1) == allowed.unsqueeze(-2)).any(-1).all()
    assert virtual.shape == (s_row.shape[0], 2, m)
    assert all(len(set(x.tolist())) == m for x in virtual.reshape(-1, m))  # distinct cells


def test_two_sided_recall_beats_the_paper_rule_on_gaussian_scores():
    """Measured (benchmarks/tdqkr_recall.py): ~0.50 for the paper rule, ~0.97 two-sided."""
    s_row, s_col, c, u, v = _scores(5, t=64, k=64)
    exact = brute_force_topm(s_row, s_col, c, 16)
    paper = key_recall(tdqkr_topm(s_row, s_col, c, u, v, 16, "paper")[0], exact)
    two = key_recall(tdqkr_topm(s_row, s_col, c, u, v, 16, "two_sided")[0], exact)
    assert paper < 0.7 < 0.9 < two


def test_candidate_rule_is_validated_and_hashed_only_when_changed():
    with pytest.raises(ValueError, match="tdqkr_candidates='top' must be 'paper' or"):
        preset("micro").ultramem.__class__(tdqkr_candidates="top").validate(64)
    with pytest.raises(ValueError, match="unknown TDQKR candidate rule"):
        tdqkr_topm(*_scores(0), 4, "top")
    base = preset("micro")
    paper = preset("micro")
    paper.ultramem.tdqkr_candidates = "paper"
    two = LMConfig.from_dict(
        {
            **base.to_dict(),
            "ultramem": {**base.to_dict()["ultramem"], "tdqkr_candidates": "two_sided"},
        }
    )
    assert isinstance(two.ultramem, UltraMemConfig)
    assert paper.compute_hash() == base.compute_hash() != two.compute_hash()
