"""Training through the native gather-pool: same values and gradients as the torch path."""

from __future__ import annotations

import pytest
import torch

from ultramem_dist.kernels import column_segments, gather_pool
from ultramem_dist.kernels import native as native_mod

pytestmark = pytest.mark.skipif(native_mod.library() is None, reason="no native library")


def _both_paths(table, idx, blk, w, num_blocks, **kw):
    """Output, table grad and weight grad of the torch path and of ``auto`` (native autograd)."""
    grad = torch.randn_like(gather_pool(table, idx, blk, w, num_blocks, backend="torch", **kw))
    got = []
    for backend in ("torch", "auto"):
        table.grad = w.grad = None
        out = gather_pool(table, idx, blk, w, num_blocks, backend=backend, **kw)
        (out * grad).sum().backward()
        got.append((out.detach(), table.grad.clone(), w.grad.clone(), type(out.grad_fn).__name__))
    return got


@pytest.mark.parametrize("num_cores", [1, 2, 3])
def test_dense_queries_match_the_torch_path(num_cores):
    gen = torch.Generator().manual_seed(num_cores)
    table = torch.randn(50, 6 * num_cores, generator=gen, requires_grad=True)
    idx = torch.randint(0, 50, (7, 9), generator=gen)
    idx[0, :4] = 3  # a row chosen several times by one token
    blk = torch.randint(0, 4, (7, 9), generator=gen)
    w = torch.randn(7, 9, num_cores, generator=gen, requires_grad=True)
    (ref, ref_gt, ref_gw, _), (out, gt, gw, fn) = _both_paths(table, idx, blk, w, 4)
    assert fn == "_NativePoolBackward"  # the native kernel ran, with autograd
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gt, ref_gt)
    torch.testing.assert_close(gw, ref_gw)
    assert torch.count_nonzero(gt.abs().sum(1)) == len(set(idx.flatten().tolist()))


def test_ragged_queries_and_shard_segments_match_the_torch_path():
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(30, 10, generator=gen, requires_grad=True)
    idx = torch.randint(0, 30, (20,), generator=gen)
    blk = torch.randint(0, 2, (20,), generator=gen)
    w = torch.randn(20, 2, generator=gen, requires_grad=True)
    kw = {"offsets": torch.tensor([0, 3, 3, 11, 20]), "segments": column_segments(3, 13, 16, 2)}
    (ref, ref_gt, ref_gw, _), (out, gt, gw, fn) = _both_paths(table, idx, blk, w, 2, **kw)
    assert fn == "_NativePoolBackward"
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gt, ref_gt)
    torch.testing.assert_close(gw, ref_gw)
    assert torch.all(out[1] == 0)  # the empty query pools nothing


def test_only_the_inputs_that_need_grad_get_one_and_gradcheck_passes():
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(12, 4, generator=gen)
    idx = torch.randint(0, 12, (3, 5), generator=gen)
    blk = torch.randint(0, 2, (3, 5), generator=gen)
    w = torch.randn(3, 5, 2, generator=gen, requires_grad=True)
    gather_pool(table, idx, blk, w, 2).sum().backward()
    assert table.grad is None and w.grad is not None
    # float64 takes the torch path (the native kernel is float32): gradcheck it against the
    # float32 native path's gradients
    t64 = table.double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t, ww: gather_pool(t, idx, blk, ww, 2), (t64, w64))
    t32 = table.clone().requires_grad_()
    w32 = w.detach().clone().requires_grad_()
    gather_pool(t32, idx, blk, w32, 2).square().sum().backward()
    gather_pool(t64, idx, blk, w64, 2).square().sum().backward()
    torch.testing.assert_close(t32.grad, t64.grad.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w32.grad, w64.grad.float(), atol=1e-5, rtol=1e-5)


def test_bad_rows_are_still_refused_in_training():
    table = torch.randn(10, 4, requires_grad=True)
    w = torch.ones(1, 2, 1, requires_grad=True)
    with pytest.raises(IndexError, match="row index 10 at entry 1"):
        gather_pool(table, torch.tensor([[0, 10]]), torch.zeros(1, 2, dtype=torch.long), w, 1)


def test_weight_gradient_in_several_runs_of_tokens_matches_the_torch_path():
    """Enough tokens x rows that the weight gradient is computed in several buffer-sized runs
    (the last one partial)."""
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(300, 256, generator=gen, requires_grad=True)
    idx = torch.randint(0, 300, (150, 64), generator=gen)
    blk = torch.randint(0, 4, (150, 64), generator=gen)
    w = torch.randn(150, 64, 2, generator=gen, requires_grad=True)
    (ref, ref_gt, ref_gw, _), (out, gt, gw, fn) = _both_paths(table, idx, blk, w, 4)
    assert fn == "_NativePoolBackward"
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gt, ref_gt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, ref_gw, atol=1e-4, rtol=1e-4)
