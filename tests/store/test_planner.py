"""Shard layouts and the row/dim planner."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ultramem_dist.store.layout import column_ranges, is_core_aligned, row_ranges
from ultramem_dist.store.planner import CostConstants, TableShape, cost_dim, cost_row, plan_table

RELEASED = TableShape(
    n_rows=652_864, dv=384, expansion=4, num_cores=2, topm=80, heads=2, d_model=768
)


@given(n=st.integers(1, 10_000), s=st.integers(1, 64))
def test_row_ranges_tile_the_table_evenly(n, s):
    if n < s:
        with pytest.raises(ValueError):
            row_ranges(n, s)
        return
    r = row_ranges(n, s)
    assert r[0][0] == 0 and r[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(r, r[1:], strict=False))
    sizes = [hi - lo for lo, hi in r]
    assert max(sizes) - min(sizes) <= 1


@given(cores=st.sampled_from([1, 2, 4]), core_w=st.integers(1, 96), s=st.integers(1, 12))
def test_column_ranges_tile_and_align_to_cores_when_possible(cores, core_w, s):
    width = cores * core_w
    if width < s:
        with pytest.raises(ValueError):
            column_ranges(width, s, cores)
        return
    r = column_ranges(width, s, cores)
    assert r[0][0] == 0 and r[-1][1] == width and len(r) == s
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(r, r[1:], strict=False))
    if (s % cores == 0 and core_w % (s // cores) == 0) or cores % s == 0:
        assert is_core_aligned(r, width, cores)


def test_column_ranges_core_aligned_examples():
    assert column_ranges(384, 2, 2) == [(0, 192), (192, 384)]
    assert column_ranges(384, 4, 2) == [(0, 96), (96, 192), (192, 288), (288, 384)]
    assert column_ranges(384, 1, 2) == [(0, 384)]
    three = column_ranges(384, 3, 2)  # cannot align: even split straddles the core boundary
    assert three == [(0, 128), (128, 256), (256, 384)] and not is_core_aligned(three, 384, 2)


def test_planner_prefers_dim_for_the_released_config_with_several_shards():
    plan = plan_table(RELEASED, 2)
    assert plan.by == "dim" and plan.cost_dim < plan.cost_row
    assert plan.ranges == ((0, 192), (192, 384)) and plan.core_aligned


def test_planner_prefers_row_for_narrow_values_and_many_entries():
    narrow = TableShape(
        n_rows=1 << 20, dv=8, expansion=1, num_cores=1, topm=512, heads=4, d_model=16
    )
    plan = plan_table(narrow, 4)
    assert plan.by == "row"
    assert plan.ranges[0] == (0, (1 << 20) // 4)


def test_planner_single_shard_is_a_tie_broken_to_dim_or_row_consistently():
    plan = plan_table(RELEASED, 1)
    assert plan.ranges in (((0, 652_864),), ((0, 384),))
    assert plan.by == ("row" if plan.cost_row < plan.cost_dim else "dim")


def test_forced_sharding_is_honoured_and_costs_are_reported():
    plan = plan_table(RELEASED, 3, "row")
    assert plan.by == "row" and plan.cost_dim is not None and plan.cost_row is not None


def test_unaligned_dim_split_is_penalised():
    k = CostConstants()
    aligned = cost_dim(RELEASED, 2, k)
    unaligned = cost_dim(RELEASED, 3, k)
    no_penalty = cost_dim(RELEASED, 3, CostConstants(split_penalty=1.0))
    assert unaligned > no_penalty and aligned > 0
    assert cost_row(RELEASED, 2, k) > 0


def test_planner_refuses_impossible_splits():
    tiny = TableShape(n_rows=2, dv=2, expansion=1, num_cores=1, topm=1, heads=1, d_model=2)
    with pytest.raises(ValueError, match="cannot"):
        plan_table(tiny, 3)
    assert plan_table(tiny, 2).by in ("row", "dim")


def test_merged_dim_split_is_over_d_model():
    merged = TableShape(**{**RELEASED.__dict__, "merged": True})
    plan = plan_table(merged, 2, "dim")
    assert plan.ranges == ((0, 384), (384, 768))


def test_pre_values_cost_more_on_dim_shards_and_can_flip_the_choice():
    """UltraMemV2 pre-values: row shards each do the pre-value work of their L/S entries, dim
    shards all L (pre-values whole), so the modelled difference grows by exactly
    (c_read*b*P + c_pre) * L * (1 - 1/S), and a wide enough P makes row-wise win."""
    from dataclasses import replace

    k = CostConstants()
    s = 4
    v1 = RELEASED
    assert plan_table(v1, s).by == "dim"
    for p in (16, 64):
        v2 = replace(v1, pre_vdim=p)
        grow = (cost_dim(v2, s, k) - cost_row(v2, s, k)) - (cost_dim(v1, s, k) - cost_row(v1, s, k))
        want = (k.c_read * v1.storage_bytes * p + k.c_pre) * v1.entries * (1 - 1 / s)
        assert grow == pytest.approx(want, rel=1e-9)
        assert cost_row(v2, s, k) > cost_row(v1, s, k)  # pre_input on the wire, reads, GELU
    wide = replace(v1, pre_vdim=4096)
    assert plan_table(wide, s).by == "row"
    assert plan_table(replace(v1, pre_vdim=0), s) == plan_table(v1, s)  # v1 unchanged
