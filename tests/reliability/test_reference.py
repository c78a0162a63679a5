"""The load/chaos verifier: reassembled references, ok/partial/wrong classification, targets."""

from __future__ import annotations

import pytest
import torch

from ultramem_dist.kernels import gather_pool
from ultramem_dist.reliability.loadtest import check_targets, percentile
from ultramem_dist.reliability.reference import OK, PARTIAL, WRONG, StoreReference, classify
from ultramem_dist.reliability.synthetic import (
    SYNTHETIC_TABLES,
    make_synthetic_store,
    synthetic_spec,
)

SPEC_KW = {"n_rows": 300, "dv": 16, "d_model": 12, "topm": 4}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = make_synthetic_store(tmp_path_factory.mktemp("s"), shards=3, seed=7, **SPEC_KW)
    return StoreReference(root)


def _queries(t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 300, (t, 8), generator=g)
    blk = torch.randint(0, 4, (t, 8), generator=g)
    w = torch.randn(t, 8, 2, generator=g)
    return idx, blk, w


@pytest.mark.parametrize("table", list(SYNTHETIC_TABLES))
def test_reassembled_reference_equals_the_unsharded_model_math(ref, table):
    spec = synthetic_spec(seed=7 + list(SYNTHETIC_TABLES).index(table), **SPEC_KW)
    idx, blk, w = _queries()
    pooled = gather_pool(spec.values, idx, blk, w, spec.expansion)  # [T, E, Dv]
    merged = SYNTHETIC_TABLES[table][1]
    want = pooled.reshape(5, -1) @ spec.out_proj.T if merged else pooled  # merged: projected
    exp = ref.table(table).expected(idx, blk, w)
    torch.testing.assert_close(exp.total, want, rtol=1e-4, atol=1e-5)
    assert len(exp.parts) == 3
    torch.testing.assert_close(sum(exp.parts), exp.total, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("table", ["row", "dim", "row_m"])
def test_classify_ok_partial_wrong(ref, table):
    exp = ref.table(table).expected(*_queries(seed=3))
    assert classify(exp.total.clone(), exp) == OK
    assert classify(exp.parts[0] + exp.parts[2], exp) == PARTIAL  # shard 1 missing
    assert classify(torch.zeros_like(exp.total), exp) == PARTIAL  # nothing at all
    assert classify(exp.total[:4], exp) == PARTIAL  # a token missing
    assert classify(exp.total * 1.01 + 1e-3, exp) == WRONG
    nan = exp.total.clone()
    nan.view(-1)[0] = float("nan")
    assert classify(nan, exp) == WRONG


def test_targets_must_be_loopback_unless_allowed():
    assert check_targets("127.0.0.1:1,localhost:2,[::1]:3") == [
        "127.0.0.1:1",
        "localhost:2",
        "[::1]:3",
    ]
    with pytest.raises(ValueError, match="--allow-remote"):
        check_targets("127.0.0.1:1,10.1.2.3:50051")
    assert check_targets("10.1.2.3:50051", allow_remote=True) == ["10.1.2.3:50051"]


def test_percentile_nearest_rank():
    xs = [float(i) for i in range(1, 101)]
    assert (percentile(xs, 50), percentile(xs, 99), percentile(xs, 100)) == (50.0, 99.0, 100.0)
    assert percentile([3.0], 99) == 3.0
