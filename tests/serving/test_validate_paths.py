"""The shard's value checks give the same query, or the same error, natively (one C pass) and
in numpy (a host without a C compiler)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_table_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.errors import UltraMemError
from ultramem_dist.kernels import native
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving.validate import Limits, decode_request
from ultramem_dist.store import export_tables
from ultramem_dist.store.reader import load_shard

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")
N_ROWS, E = 60, 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shard 1 of a row-sharded, a dim-sharded and a merged row-sharded store."""
    spec = make_table_spec(n_rows=N_ROWS, dv=8, expansion=E)
    out = {}
    for name, by, merged in (("row", "row", False), ("dim", "dim", False), ("merged", "row", True)):
        path = tmp_path_factory.mktemp(name)
        export_tables({"mem0": spec}, path, shards=2, by=by, merged=merged, version="v1")
        out[name] = load_shard(path, 1, "v1")
    return out


SLICE = {"row": (30, 60), "dim": (0, 60), "merged": (30, 60)}  # rows shard 1 serves


BREAKS = [("ids", v) for v in ("lo-1", "hi", -1, N_ROWS, 2**31 - 1)]
BREAKS += [("blk", v) for v in (-1, E, 2**31 - 1)]
BREAKS += [("w", v) for v in (float("nan"), float("inf"), -float("inf"))]


@st.composite
def requests(draw, which: str, broken: tuple[str, object] | None = None):
    """A valid request for shard 1 of ``which``; ``broken``: one value set to a bad one."""
    tokens, per = draw(st.integers(1 if broken else 0, 4)), draw(st.integers(1 if broken else 0, 5))
    nnz, cores = tokens * per, 2
    lo, hi = SLICE[which]
    ids = draw(st.lists(st.integers(lo, hi - 1), min_size=nnz, max_size=nnz))
    blk = draw(st.lists(st.integers(0, E - 1), min_size=nnz, max_size=nnz))
    w = draw(st.lists(st.floats(-2, 2, width=32), min_size=nnz * cores, max_size=nnz * cores))
    if broken is not None:
        field, value = broken
        value = {"lo-1": lo - 1, "hi": hi}.get(value, value)  # type: ignore[call-overload]
        at = draw(st.integers(0, nnz - 1))
        {"ids": ids, "blk": blk, "w": w}[field][at * (cores if field == "w" else 1)] = value
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    req = pb.GatherRequest(table_id="mem0", table_version="v1")
    encode_tensor(torch.tensor(ids, dtype=dtype).view(tokens, per), req.indices)
    encode_tensor(torch.tensor(blk, dtype=dtype).view(tokens, per), req.blocks)
    encode_tensor(torch.tensor(w, dtype=torch.float32).view(tokens, per, cores), req.weights)
    return req


def _outcome(req, shard):
    try:
        q = decode_request(req, shard, Limits(64, 64))
    except UltraMemError as exc:
        return type(exc), str(exc)
    return q.indices.tolist(), q.blocks.tolist(), q.weights.tolist(), q.num_blocks


def _both(shard, req, monkeypatch):
    fast = _outcome(req, shard)
    with monkeypatch.context() as m:
        m.setattr(native, "library", lambda: None)
        slow = _outcome(req, shard)
    return fast, slow


@pytest.mark.parametrize("which", sorted(SLICE))
@given(data=st.data())
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_valid_requests_give_the_same_query(shards, monkeypatch, which, data):
    fast, slow = _both(shards[which], data.draw(requests(which)), monkeypatch)
    assert not isinstance(fast[0], type) and fast == slow


@pytest.mark.parametrize("which", sorted(SLICE))
@pytest.mark.parametrize("broken", BREAKS, ids=[f"{f}={v}" for f, v in BREAKS])
@given(data=st.data())
@settings(
    max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_bad_value_gives_the_same_error(shards, monkeypatch, which, broken, data):
    fast, slow = _both(shards[which], data.draw(requests(which, broken)), monkeypatch)
    assert fast == slow


def test_each_failing_check_is_named(shards):
    lib = native.library()
    ids = np.array([35, 40], dtype=np.int32)
    blk = np.array([0, 2], dtype=np.int64)
    w = np.ones((2, 2), dtype=np.float32)
    assert not isinstance(lib.check_entries(ids, blk, w, (30, 60), E), int)
    assert lib.check_entries(ids, blk, w, (36, 60), E) == 3  # a row outside the slice
    assert lib.check_entries(ids, blk, w, (30, 60), 2) == 2  # a block id outside [0, E)
    w[1, 0] = np.inf
    assert lib.check_entries(ids, blk, w, (36, 60), 2) == 1  # weights are checked first
    with pytest.raises(TypeError, match="ids: expected 2 C-contiguous int32/int64"):
        lib.check_entries(ids.astype(np.int16), blk, w, (30, 60), E)
