"""Property tests of the fan-out split and the fan-in sum/concatenation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultramem_dist.client.router import (
    concat_columns,
    split_arrays,
    split_by_owner,
    split_for_wire,
    sum_partials,
)
from ultramem_dist.kernels import column_segments, gather_pool, native
from ultramem_dist.store.layout import column_ranges, owner_of, row_ranges


@st.composite
def batches(draw):
    n = draw(st.integers(1, 50))
    shards = draw(st.integers(1, min(n, 5)))
    t = draw(st.integers(0, 6))
    length = draw(st.integers(0, 9))
    cores = draw(st.sampled_from([1, 2]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (t, length), generator=g)
    blk = torch.randint(0, 3, (t, length), generator=g)
    w = torch.randn(t, length, cores, generator=g)
    return n, shards, idx, blk, w


@given(batches())
@settings(max_examples=60, deadline=None)
def test_split_by_owner_partitions_entries_by_row_range(batch):
    n, shards, idx, blk, w = batch
    ranges = row_ranges(n, shards)
    parts = split_by_owner(idx, blk, w, [lo for lo, _ in ranges])
    assert len(parts) == shards
    seen = 0
    for k, part in enumerate(parts):
        if part is None:
            assert not ((idx >= ranges[k][0]) & (idx < ranges[k][1])).any()
            continue
        lo, hi = ranges[k]
        assert bool(((part.indices >= lo) & (part.indices < hi)).all())
        assert part.offsets[0] == 0 and part.offsets[-1] == part.indices.numel()
        assert bool((part.offsets[1:] >= part.offsets[:-1]).all())
        assert part.offsets.numel() == idx.shape[0] + 1
        # per token, the entries are exactly the owned entries in their original order
        for t in range(idx.shape[0]):
            mine = (idx[t] >= lo) & (idx[t] < hi)
            a, b = int(part.offsets[t]), int(part.offsets[t + 1])
            assert torch.equal(part.indices[a:b], idx[t][mine])
            assert torch.equal(part.blocks[a:b], blk[t][mine])
            assert torch.equal(part.weights[a:b], w[t][mine])
        seen += part.indices.numel()
    assert seen == idx.numel()


@given(batches())
@settings(max_examples=50, deadline=None)
def test_row_split_then_sum_equals_the_unsharded_pool(batch):
    n, shards, idx, blk, w = batch
    cores = w.shape[-1]
    table = torch.randn(n, 4 * cores, dtype=torch.float64).float()
    ref = gather_pool(table, idx, blk, w, 3)
    ranges = row_ranges(n, shards)
    partials = []
    for (lo, hi), part in zip(
        ranges, split_by_owner(idx, blk, w, [r[0] for r in ranges]), strict=True
    ):
        if part is not None:
            partials.append(
                gather_pool(
                    table[lo:hi],
                    part.indices - lo,
                    part.blocks,
                    part.weights,
                    3,
                    offsets=part.offsets,
                )
            )
    got = sum_partials(partials, ref.shape)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@given(batches(), st.integers(1, 4))
@settings(max_examples=50, deadline=None)
def test_dim_slices_concatenate_to_the_unsharded_pool(batch, shards):
    n, _, idx, blk, w = batch
    cores = w.shape[-1]
    width = 4 * cores
    table = torch.randn(n, width)
    ref = gather_pool(table, idx, blk, w, 3)
    slices = [
        gather_pool(
            table[:, lo:hi].contiguous(),
            idx,
            blk,
            w,
            3,
            segments=column_segments(lo, hi, width, cores),
        )
        for lo, hi in column_ranges(width, shards, cores)
    ]
    torch.testing.assert_close(concat_columns(slices), ref, atol=1e-5, rtol=1e-5)


@given(st.integers(1, 10_000), st.integers(1, 16), st.integers(0, 2**16))
def test_owner_of_matches_the_ranges(n, shards, seed):
    shards = min(shards, n)
    ranges = row_ranges(n, shards)
    ids = torch.randint(0, n, (64,), generator=torch.Generator().manual_seed(seed))
    owners = owner_of(ids, [lo for lo, _ in ranges])
    for i, k in zip(ids.tolist(), owners.tolist(), strict=True):
        assert ranges[k][0] <= i < ranges[k][1]


def test_concat_single_slice_is_a_writable_copy():
    src = torch.ones(2, 3)
    out = concat_columns([src])
    out += 1
    assert src.max() == 1


def test_out_of_range_ids_go_to_the_edge_shards_so_the_owner_refuses_them():
    idx = torch.tensor([[-5, 3, 15, 99]])
    parts = split_by_owner(idx, torch.zeros_like(idx), torch.ones(1, 4, 2), [0, 10])
    assert parts[0].indices.tolist() == [-5, 3]
    assert parts[1].indices.tolist() == [15, 99]
    assert parts[0].offsets.tolist() == [0, 2] and parts[1].offsets.tolist() == [0, 2]


def test_ragged_input_is_split_with_per_shard_offsets():
    idx = torch.tensor([1, 12, 2, 13, 14])
    offsets = torch.tensor([0, 2, 2, 5])
    parts = split_by_owner(idx, torch.zeros_like(idx), torch.ones(5, 1), [0, 10], offsets=offsets)
    assert parts[0].indices.tolist() == [1, 2] and parts[0].offsets.tolist() == [0, 1, 1, 2]
    assert parts[1].indices.tolist() == [12, 13, 14] and parts[1].offsets.tolist() == [0, 1, 1, 3]


def test_expand_targets_turns_a_multi_address_name_into_every_address(monkeypatch):
    import socket

    from ultramem_dist.client.channels import expand_targets

    def fake_getaddrinfo(host, port, type=0):  # noqa: A002 - socket's own keyword
        table = {"shards.svc": ["10.0.0.1", "10.0.0.2", "10.0.0.1"], "one.svc": ["10.0.0.9"]}
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in table[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert expand_targets(["shards.svc:50051", "127.0.0.1:7", "one.svc:5"]) == [
        "10.0.0.1:50051",
        "10.0.0.2:50051",
        "127.0.0.1:7",
        "one.svc:5",
    ]


@st.composite
def wire_batches(draw):
    """Ragged batches with ids anywhere in int64 (out of the table, negative, past int32)."""
    shards = draw(st.integers(1, 6))
    row_los = sorted(draw(st.lists(st.integers(1, 1000), min_size=shards - 1, max_size=shards - 1)))
    lengths = draw(st.lists(st.integers(0, 7), max_size=6))
    nnz = sum(lengths)
    bound = draw(st.sampled_from([1100, 2**31, 2**40]))
    ids = draw(st.lists(st.integers(-bound, bound), min_size=nnz, max_size=nnz))
    blk = draw(st.lists(st.integers(-3, 2**33), min_size=nnz, max_size=nnz))
    cores = draw(st.sampled_from([1, 2, 3]))
    w = np.arange(nnz * cores, dtype=np.float32).reshape(nnz, cores)
    offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.array(ids, dtype=np.int64), np.array(blk, dtype=np.int64), w, offs, [0, *row_los]


@given(wire_batches())
@settings(max_examples=150, deadline=None)
def test_native_split_for_the_wire_equals_the_numpy_split(batch):
    ids, blk, w, offs, row_los = batch
    want = split_arrays(ids, blk, w, offs, row_los)
    got = split_for_wire(ids, blk, w, offs, row_los)
    assert len(got) == len(want)
    fits = all(np.iinfo(np.int32).min <= int(x) <= np.iinfo(np.int32).max for x in [*ids, *blk])
    for g, e in zip(got, want, strict=True):
        assert (g is None) == (e is None)
        if g is None:
            continue
        for a, b in zip(g, e, strict=True):
            np.testing.assert_array_equal(a, b)  # same values; narrowed only when all fit
        if fits and native.library() is not None:
            assert g[0].dtype == g[1].dtype == g[3].dtype == np.int32
        else:
            assert g[0].dtype == np.int64  # never wrapped into another (valid) row id


def test_native_split_refuses_arrays_it_would_misread():
    lib = native.library()
    if lib is None:
        pytest.skip("no C compiler: the numpy split is the only path")
    ids = np.zeros(4, dtype=np.int64)
    w = np.zeros((4, 2), dtype=np.float32)
    offs = np.array([0, 4], dtype=np.int64)
    rl = np.array([0, 2], dtype=np.int64)
    with pytest.raises(TypeError, match="ids: expected a C-contiguous int64"):
        lib.split_rows(ids.astype(np.int32), ids, w, offs, rl)
    with pytest.raises(TypeError, match="w: expected"):
        lib.split_rows(ids, ids, w[:, :1], offs, rl)
    with pytest.raises(ValueError, match="tok_off must run from 0 to nnz=4"):
        lib.split_rows(ids, ids, w, np.array([0, 3], dtype=np.int64), rl)
    with pytest.raises(ValueError, match="bad offsets"):
        lib.split_rows(ids, ids, w, np.array([0, 5, 4], dtype=np.int64), rl)
