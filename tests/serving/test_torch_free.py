"""A CPU shard never imports torch: ``serve-shard`` runs in a fresh interpreter, answers unary
``Gather`` and ``GatherStream`` calls (plain and merged tables, fp32 and bf16 stores, plus a
refused request on each), and ``torch`` is still absent from that process' ``sys.modules``.
The answers equal the torch path's (``gather_pool(backend="torch")``) on the same store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_table_spec

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.kernels import gather_pool, native
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving.validate import Limits, decode_request
from ultramem_dist.store import export_tables, load_shard

N, E, HC, DV = 300, 4, 2, 16
CHILD = Path(__file__).with_name("_torch_free_child.py")

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: torch path")


def _requests(seed: int) -> dict[str, pb.GatherRequest]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for table, (t, per) in {"row": (5, 8), "mrg": (3, 6)}.items():
        req = pb.GatherRequest(table_id=table, table_version="v1")
        encode_tensor(torch.randint(0, N, (t, per), generator=g), req.indices)
        encode_tensor(torch.randint(0, E, (t, per), generator=g), req.blocks)
        encode_tensor(torch.randn(t, per, HC, generator=g), req.weights)
        out[table] = req
    return out


def _torch_answer(shard, req: pb.GatherRequest) -> np.ndarray:
    """The torch path's answer to a validated request (the kernels' other implementation)."""
    q = decode_request(req, shard, Limits(64, 64))
    t = q.table
    out = gather_pool(
        t.values,
        torch.from_numpy(q.indices),
        torch.from_numpy(q.blocks),
        torch.from_numpy(np.ascontiguousarray(q.weights)),
        q.num_blocks,
        segments=t.segments,
        offsets=torch.from_numpy(q.offsets),
        sum_segments=t.entry.merged,
        backend="torch",
    ).numpy()
    return out.reshape(q.num_tokens, out.shape[-1]) if t.entry.merged else out


@pytest.mark.parametrize(
    ("dtype", "use_native"), [("float32", True), ("bfloat16", True), ("float32", False)]
)
def test_a_cpu_shard_serves_without_importing_torch(tmp_path, dtype, use_native):
    """``use_native=False`` (``ULTRAMEM_NATIVE=0``): the torch fallback path serves the same
    answers, and does import torch (so the check above is one that can fail)."""
    store = tmp_path / "store"
    spec = make_table_spec(n_rows=N, dv=DV, expansion=E, num_cores=HC)
    export_tables({"row": spec, "mrg": spec}, store, shards=1, by="row",
                  merged={"row": False, "mrg": True}, dtype=dtype, version="v1")  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    requests = _requests(seed=3)
    for table, req in requests.items():
        (work / f"req-{table}.bin").write_bytes(req.SerializeToString())

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ULTRAMEM_CACHE": str(tmp_path / "cache")}
    env["ULTRAMEM_NATIVE"] = "1" if use_native else "0"
    env["ULTRAMEM_NATIVE_DIR"] = str(native.library().path.parent)  # the build already made
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(store), str(work)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((work / "result.json").read_text())
    assert "error" not in result, result["error"]
    assert result["answered"] == len(requests)
    assert result["bad_unary"] == "NOT_FOUND"
    assert result["bad_stream"] is True
    assert result["torch_imported"] is not use_native

    shard = load_shard(store, 0)
    for table, req in requests.items():
        want = _torch_answer(shard, req)
        for kind in ("unary", "stream"):
            got = np.load(work / f"out-{kind}-req-{table}.npy")
            assert got.shape == want.shape
            # one contract, two implementations: equal up to fp32 summation order
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
