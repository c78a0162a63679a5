"""A shard answers the same through its native plan and through ``gather_pool``'s torch path
(what a host without a C compiler, or a GPU shard, runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_table_spec

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.kernels import native
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving.servicer import kernel_plan, run_kernel
from ultramem_dist.serving.validate import Limits, decode_request
from ultramem_dist.store import export_tables
from ultramem_dist.store.reader import load_shard

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")


def _request(slot, spec, ragged: bool, seed: int) -> pb.GatherRequest:
    g = torch.Generator().manual_seed(seed)
    per, tokens = spec.heads * spec.topm, 3
    nnz = tokens * per
    idx = torch.randint(slot.row_lo, slot.row_hi, (nnz,), generator=g, dtype=torch.int32)
    blk = torch.randint(0, spec.expansion, (nnz,), generator=g, dtype=torch.int32)
    w = torch.randn(nnz, spec.num_cores, generator=g)
    req = pb.GatherRequest(table_id="mem0", table_version="v1")
    if ragged:  # uneven queries, one of them empty
        encode_tensor(torch.tensor([0, 5, 5, nnz]), req.offsets)
    else:
        idx, blk, w = idx.view(tokens, per), blk.view(tokens, per), w.view(tokens, per, -1)
    encode_tensor(idx, req.indices)
    encode_tensor(blk, req.blocks)
    encode_tensor(w, req.weights)
    return req


@pytest.mark.parametrize("by,merged", [("row", False), ("dim", False), ("row", True)])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_plan_and_torch_path_agree(tmp_path, monkeypatch, by, merged, ragged, dtype):
    spec = make_table_spec(n_rows=200, dv=16)
    export_tables(
        {"mem0": spec}, tmp_path, shards=2, by=by, merged=merged, dtype=dtype, version="v1"
    )
    shard = load_shard(tmp_path, 1, "v1")
    table = shard.tables["mem0"]
    q = decode_request(_request(table.slot, spec, ragged, 7), shard, Limits(64, 64))
    plan = kernel_plan(table)
    assert plan is not None
    fast = run_kernel(q, plan)
    monkeypatch.setattr(native, "library", lambda: None)  # as on a host without a compiler
    assert kernel_plan(table) is None
    slow = run_kernel(q)
    assert fast.shape == slow.shape and fast.dtype == slow.dtype == np.float32
    np.testing.assert_allclose(fast, slow, atol=1e-5, rtol=1e-4)
