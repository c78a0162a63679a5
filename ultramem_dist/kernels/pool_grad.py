"""Autograd for the native gather-pool: training runs the same C kernel as inference.

The forward is one native :func:`~ultramem_dist.kernels.gather_pool` call. The backward needs
no second kernel either:

* table: ``grad_table[r, cols(s)] = sum_{l: idx[l]=r} w[l, core(s)] * g[tok(l), blk(l), cols(s)]``
  is a gather-pool *of the output gradient* ``[T*E, cols]`` with the entries grouped by table
  row (one stable radix sort) instead of by token: ragged queries, one bin each;
* weights: ``grad_w[l, c] = sum_{s: core(s)=c} <table[idx[l], cols(s)], g[tok(l), blk(l),
  cols(s)]>``, one row-wise dot product per entry and segment.

This replaces ``embedding_bag``'s dense backward (a sort of every (entry, segment) pair and a
scatter) and the torch path's index bookkeeping, which were most of an UltraMem layer's
training time on the CPU. The sums are the same; only their floating-point order differs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ultramem_dist.kernels.gather_pool import (
    _CHUNK_BYTES,
    ColumnSegment,
    _i64,
    _scratch,
    _stable_order,
    dense_offsets,
    native_plan,
)
from ultramem_dist.kernels.native import NativePlan

__all__ = ["native_pool_with_grad"]


class _NativePool(torch.autograd.Function):
    """``gather_pool`` through the native kernel, with both gradients (see the module doc)."""

    @staticmethod
    def forward(
        ctx: Any,
        table: torch.Tensor,
        weights: torch.Tensor,
        idx: np.ndarray,
        blk: np.ndarray,
        tok_off: np.ndarray,
        num_blocks: int,
        segments: tuple[ColumnSegment, ...],
        plan: NativePlan,
    ) -> torch.Tensor:
        num_cores = weights.shape[-1]
        w = np.ascontiguousarray(weights.detach().reshape(-1, num_cores).numpy())
        out = plan.run(idx, blk, w, tok_off, num_blocks, torch.get_num_threads())
        ctx.idx, ctx.blk, ctx.tok_off = idx, blk, tok_off
        ctx.num_blocks, ctx.segments = num_blocks, segments
        ctx.w_shape = weights.shape
        ctx.save_for_backward(table, weights)
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        table, weights = ctx.saved_tensors
        idx, blk, tok_off, num_blocks = ctx.idx, ctx.blk, ctx.tok_off, ctx.num_blocks
        num_cores = weights.shape[-1]
        rows, cols = table.shape
        grad = grad.contiguous().reshape(-1, cols)  # [T * E, cols]
        tok = np.repeat(np.arange(tok_off.size - 1, dtype=np.int64), np.diff(tok_off))
        bin_id = tok * num_blocks + blk  # the output row every entry was pooled into
        w_flat = weights.detach().reshape(-1, num_cores)
        grad_table = grad_w = None
        if ctx.needs_input_grad[0]:
            order = _stable_order(idx, rows)
            row_off = np.zeros(rows + 1, dtype=np.int64)
            np.cumsum(np.bincount(idx, minlength=rows), out=row_off[1:])
            w_sorted = np.ascontiguousarray(w_flat.numpy()[order])
            plan = native_plan(grad, ctx.segments, num_cores, backend="native")
            zeros = np.zeros(idx.size, dtype=np.int64)
            pooled = plan.run(
                np.ascontiguousarray(bin_id[order]), zeros, w_sorted, row_off, 1,
                torch.get_num_threads(),
            )  # fmt: skip
            grad_table = torch.from_numpy(pooled).view(rows, cols)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(table.detach(), grad, idx, blk, bin_id, ctx)
        return grad_table, grad_w, None, None, None, None, None, None


def _weight_grad(
    table: torch.Tensor,
    grad: torch.Tensor,
    idx: np.ndarray,
    blk: np.ndarray,
    bin_id: np.ndarray,
    ctx: Any,
) -> torch.Tensor:
    """``grad_w [*w_shape]``: per entry and core, the dot product of its table row with the
    output gradient of its bin over that core's columns. Dense queries: per run of tokens,
    their rows are gathered into a reused cache-sized buffer (a fresh multi-MB temporary costs
    more in page faults than the gather) and multiplied with the tokens' ``[E, cols]``
    gradients, one ``[L, w] x [w, E]`` matmul per token and segment."""
    num_cores = ctx.w_shape[-1]
    cols = table.shape[1]
    grad_w = table.new_zeros(idx.size, num_cores)
    if len(ctx.w_shape) == 3:  # dense [T, L, h_c]
        t, per = ctx.w_shape[0], ctx.w_shape[1]
        g3 = grad.view(t, ctx.num_blocks, cols)
        idx_t, pick = torch.from_numpy(idx), torch.from_numpy(blk).view(t, per, 1)
        run = max(1, _CHUNK_BYTES // (per * cols * table.element_size()))
        for t0 in range(0, t, run):
            t1 = min(t, t0 + run)
            n = (t1 - t0) * per
            rows = _scratch("grad_rows", n * cols, table.dtype, table.device).view(n, cols)
            torch.index_select(table, 0, idx_t[t0 * per : t1 * per], out=rows)
            rows3 = rows.view(t1 - t0, per, cols)
            out = grad_w[t0 * per : t1 * per].view(t1 - t0, per, num_cores)
            for s in ctx.segments:
                sl = slice(s.start, s.stop)
                dots = torch.bmm(rows3[:, :, sl], g3[t0:t1, :, sl].mT)  # [run, L, E]
                out[:, :, s.core] += dots.gather(2, pick[t0:t1]).squeeze(2)
    else:
        rows = table.index_select(0, torch.from_numpy(idx))
        prod = rows * grad.index_select(0, torch.from_numpy(bin_id))
        for s in ctx.segments:
            grad_w[:, s.core] += prod[:, s.start : s.stop].sum(1)
    return grad_w.view(ctx.w_shape)


def native_pool_with_grad(
    table: torch.Tensor,
    indices: torch.Tensor,
    blocks: torch.Tensor,
    weights: torch.Tensor,
    num_blocks: int,
    segments: tuple[ColumnSegment, ...],
    offsets: torch.Tensor | None,
) -> torch.Tensor | None:
    """Differentiable native gather-pool of ``table`` (see :func:`~.gather_pool.gather_pool`
    for the arguments), or ``None`` where it does not apply: both float32 on the CPU, the
    native library present and ``segments`` tiling the table's columns (not ``sum_segments``)."""
    if table.dtype != torch.float32 or weights.dtype != torch.float32:
        return None
    if table.device.type != "cpu" or weights.device.type != "cpu":
        return None
    plan = native_plan(table, segments, weights.shape[-1])
    if plan is None:
        return None
    if offsets is None:
        tok_off = dense_offsets(indices.shape[0], indices.shape[1])
    else:
        tok_off = _i64(offsets)
    return _NativePool.apply(
        table, weights, _i64(indices), _i64(blocks), tok_off, num_blocks, segments, plan
    )
