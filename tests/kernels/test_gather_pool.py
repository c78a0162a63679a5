"""The shared gather-pool kernel against a plain Python reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultramem_dist.kernels import column_segments, gather_pool


def naive(table, indices, blocks, weights, num_blocks, dv_total=None, col_lo=0):
    """Loop reference: core of a column = global column // (Dv / h_c)."""
    t_count, length = indices.shape
    cores = weights.shape[-1]
    dv_total = dv_total or table.shape[1]
    width = dv_total // cores
    out = torch.zeros(t_count, num_blocks, table.shape[1], dtype=torch.float64)
    for t in range(t_count):
        for j in range(length):
            row = table[indices[t, j]].double()
            for col in range(table.shape[1]):
                core = (col_lo + col) // width
                out[t, blocks[t, j], col] += weights[t, j, core].double() * row[col]
    return out


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    tokens=st.integers(1, 5),
    length=st.integers(1, 9),
    blocks=st.integers(1, 4),
    cores=st.sampled_from([1, 2, 4]),
    width=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_loop(rows, tokens, length, blocks, cores, width, seed):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, cores * width, generator=gen)
    idx = torch.randint(0, rows, (tokens, length), generator=gen)
    blk = torch.randint(0, blocks, (tokens, length), generator=gen)
    w = torch.randn(tokens, length, cores, generator=gen)
    out = gather_pool(table, idx, blk, w, blocks)
    assert out.shape == (tokens, blocks, cores * width)
    torch.testing.assert_close(
        out.double(), naive(table, idx, blk, w, blocks), atol=1e-5, rtol=1e-5
    )


@settings(max_examples=25, deadline=None)
@given(
    dv=st.sampled_from([4, 6, 8, 12]),
    cores=st.sampled_from([1, 2]),
    cut=st.data(),
    seed=st.integers(0, 2**16),
)
def test_dimension_slices_concatenate_to_full(dv, cores, cut, seed):
    """Any column slice (aligned to cores or not) equals the same columns of the full result."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(30, dv, generator=gen)
    idx = torch.randint(0, 30, (3, 7), generator=gen)
    blk = torch.randint(0, 4, (3, 7), generator=gen)
    w = torch.randn(3, 7, cores, generator=gen)
    full = gather_pool(table, idx, blk, w, 4)
    lo = cut.draw(st.integers(0, dv - 1))
    hi = cut.draw(st.integers(lo + 1, dv))
    part = gather_pool(
        table[:, lo:hi].contiguous(), idx, blk, w, 4, segments=column_segments(lo, hi, dv, cores)
    )
    torch.testing.assert_close(part, full[..., lo:hi], atol=1e-5, rtol=1e-5)


def test_ragged_offsets_equal_dense():
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(50, 8, generator=gen)
    idx = torch.randint(0, 50, (4, 6), generator=gen)
    blk = torch.randint(0, 4, (4, 6), generator=gen)
    w = torch.randn(4, 6, 2, generator=gen)
    dense = gather_pool(table, idx, blk, w, 4)
    offsets = torch.arange(0, 25, 6)
    ragged = gather_pool(
        table, idx.reshape(-1), blk.reshape(-1), w.reshape(-1, 2), 4, offsets=offsets
    )
    torch.testing.assert_close(ragged, dense)
    # a token with no entries pools to zeros
    offsets = torch.tensor([0, 6, 6, 24])
    out = gather_pool(
        table, idx.reshape(-1)[:24], blk.reshape(-1)[:24], w.reshape(-1, 2)[:24], 4, offsets=offsets
    )
    assert out.shape == (3, 4, 8)
    assert torch.count_nonzero(out[1]) == 0


def test_sum_segments_adds_core_outputs():
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(10, 2 * 5, generator=gen)  # two cores, each a full 5-wide output
    idx = torch.randint(0, 10, (3, 4), generator=gen)
    blk = torch.zeros(3, 4, dtype=torch.long)
    w = torch.randn(3, 4, 2, generator=gen)
    concat = gather_pool(table, idx, blk, w, 1)
    summed = gather_pool(table, idx, blk, w, 1, sum_segments=True)
    torch.testing.assert_close(summed, concat[..., :5] + concat[..., 5:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage_accumulates_in_weight_dtype(dtype):
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(64, 8, generator=gen)
    idx = torch.randint(0, 64, (5, 16), generator=gen)
    blk = torch.randint(0, 4, (5, 16), generator=gen)
    w = torch.randn(5, 16, 2, generator=gen)
    out = gather_pool(table.to(dtype), idx, blk, w, 4)
    assert out.dtype == torch.float32
    ref = gather_pool(table.to(dtype).float(), idx, blk, w, 4)
    torch.testing.assert_close(out, ref)


def test_empty_selection_and_bad_table():
    out = gather_pool(
        torch.randn(4, 6),
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, 0, 2),
        3,
    )
    assert out.shape == (2, 3, 6) and not out.any()
    with pytest.raises(ValueError, match="2-D"):
        gather_pool(
            torch.randn(4),
            torch.zeros(1, 1, dtype=torch.long),
            torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, 1, 1),
            1,
        )
    with pytest.raises(ValueError, match="divisible"):
        column_segments(0, 5, 5, 2)
