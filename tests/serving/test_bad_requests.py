"""Every malformed request gets its status code and a clear message; the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
import torch
from conftest import make_table_spec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables

N, E, HC, DV = 600, 4, 2, 32
ROW_LO = 300  # this server is shard 1 of 2 of the row table: it owns rows [300, 600)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    spec = make_table_spec(n_rows=N, dv=DV)
    export_tables(
        {"row": spec, "dim": spec, "mrg": spec},
        root,
        shards=2,
        by={"row": "row", "dim": "dim", "mrg": "row"},
        merged={"row": False, "dim": False, "mrg": True},
        version="v1",
    )
    return root


@pytest.fixture(scope="module")
def server(store, in_process_shard):
    return in_process_shard(ServerConfig(store=store, shard=1, max_batch=16, max_per_query=32))


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.GatherPoolStub(channel)
    channel.close()


def request(table="row", version="v1", T=3, L=8, idx=None, blk=None, w=None, offsets=None):
    g = torch.Generator().manual_seed(T * 100 + L)
    if idx is None:
        idx = torch.randint(ROW_LO, N, (T, L), generator=g)
    if blk is None:
        blk = torch.randint(0, E, idx.shape, generator=g)
    if w is None:
        w = torch.randn(*idx.shape, HC, generator=g)
    req = pb.GatherRequest(table_id=table, table_version=version)
    encode_tensor(idx, req.indices)
    encode_tensor(blk, req.blocks)
    encode_tensor(w, req.weights)
    if offsets is not None:
        encode_tensor(offsets, req.offsets)
    return req


def assert_good(stub):
    reply = stub.Gather(request(), timeout=10)
    assert reply.table_version == "v1" and list(reply.pooled.shape) == [3, E, DV]


def _truncate(req):
    req.weights.data = req.weights.data[:-3]
    return req


def _set_shape(req, field, shape):
    getattr(req, field).shape[:] = shape
    return req


BAD = {
    "indices dtype": (
        lambda: _retype(request(), "indices", pb.DTYPE_FLOAT32),
        "INVALID_ARGUMENT",
        "indices: dtype float32 is not allowed",
    ),
    "indices rank": (
        lambda: _set_shape(request(), "indices", [3, 4, 2]),
        "INVALID_ARGUMENT",
        "expected [2] dimensions",
    ),
    "indices length": (
        lambda: _set_shape(request(), "indices", [3, 9]),
        "INVALID_ARGUMENT",
        "expected 216 bytes",
    ),
    "truncated weights": (lambda: _truncate(request()), "INVALID_ARGUMENT", "weights:"),
    "blocks shape": (
        lambda: request(blk=torch.zeros(3, 7, dtype=torch.long)),
        "INVALID_ARGUMENT",
        "blocks: shape [3, 7]; expected the indices shape",
    ),
    "weights cores": (
        lambda: request(w=torch.randn(3, 8, 3)),
        "INVALID_ARGUMENT",
        "weights: shape [3, 8, 3]; expected [3, 8, 2]",
    ),
    "weights dtype": (
        lambda: request(w=torch.randn(3, 8, 2, dtype=torch.float64).half()),
        "INVALID_ARGUMENT",
        "weights: dtype float16 is not allowed",
    ),
    "index too large": (
        lambda: request(idx=torch.full((3, 8), N)),
        "INVALID_ARGUMENT",
        "value 600 is out of range; expected a row id in [0, 600)",
    ),
    "negative index": (
        lambda: request(idx=torch.full((3, 8), -1)),
        "INVALID_ARGUMENT",
        "value -1 is out of range",
    ),
    "index not owned": (
        lambda: request(idx=torch.full((3, 8), 5)),
        "INVALID_ARGUMENT",
        "rows owned by shard 1 in [300, 600)",
    ),
    "block id >= E": (
        lambda: request(blk=torch.full((3, 8), E)),
        "INVALID_ARGUMENT",
        "blocks: value 4 is out of range; expected an IVE block id in [0, 4)",
    ),
    "negative block": (
        lambda: request(blk=torch.full((3, 8), -2)),
        "INVALID_ARGUMENT",
        "blocks: value -2",
    ),
    "nan weight": (
        lambda: request(w=torch.full((3, 8, 2), float("nan"))),
        "INVALID_ARGUMENT",
        "weights: contain NaN or Inf",
    ),
    "inf weight": (
        lambda: request(w=torch.full((3, 8, 2), float("inf"))),
        "INVALID_ARGUMENT",
        "NaN or Inf",
    ),
    "m above limit": (
        lambda: request(L=33),
        "INVALID_ARGUMENT",
        "33 entries per query; expected at most 32",
    ),
    "batch above limit": (
        lambda: request(T=17),
        "INVALID_ARGUMENT",
        "batch of 17 queries; expected at most 16",
    ),
    "huge declared shape": (
        lambda: _set_shape(request(), "indices", [1 << 31, 1 << 31]),
        "INVALID_ARGUMENT",
        "above the limit of 512",
    ),
    "offsets end": (
        lambda: request(idx=torch.full((5,), 400), offsets=torch.tensor([0, 2, 4])),
        "INVALID_ARGUMENT",
        "expected 0 and the number of indices (5)",
    ),
    "offsets decreasing": (
        lambda: request(idx=torch.full((5,), 400), offsets=torch.tensor([0, 4, 3, 5])),
        "INVALID_ARGUMENT",
        "decreasing",
    ),
    "ragged query too long": (
        lambda: request(idx=torch.full((40,), 400), offsets=torch.tensor([0, 40])),
        "INVALID_ARGUMENT",
        "a query has 40 entries; expected at most 32",
    ),
    "ragged 2-D indices": (
        lambda: request(offsets=torch.tensor([0, 8, 16, 24])),
        "INVALID_ARGUMENT",
        "indices: has 2 dimensions",
    ),
    "empty version": (lambda: request(version=""), "INVALID_ARGUMENT", "table_version is empty"),
    "unknown table": (
        lambda: request(table="mem9"),
        "NOT_FOUND",
        "table 'mem9' is not served here; tables: ['dim', 'mrg', 'row']",
    ),
    "wrong version": (
        lambda: request(version="v0"),
        "FAILED_PRECONDITION",
        "requested table version 'v0', but this shard serves 'v1'",
    ),
}


def _retype(req, field, dtype):
    getattr(req, field).dtype = dtype
    return req


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_its_status_and_the_server_keeps_serving(stub, case):
    make, code, message = BAD[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.Gather(make(), timeout=10)
    assert info.value.code().name == code
    assert message in info.value.details()
    assert info.value.details().startswith("shard 1: ")
    assert_good(stub)


def test_valid_ragged_dim_and_merged_requests(stub):
    ragged = request(
        idx=torch.tensor([300, 301, 599, 450]),
        blk=torch.tensor([0, 1, 3, 3]),
        w=torch.randn(4, 2),
        offsets=torch.tensor([0, 3, 3, 4]),
    )
    assert list(stub.Gather(ragged, timeout=10).pooled.shape) == [3, E, DV]
    dim = stub.Gather(request(table="dim", idx=torch.randint(0, N, (2, 8))), timeout=10)
    assert list(dim.pooled.shape) == [2, E, DV // 2] and dim.shard_index == 1
    mrg = stub.Gather(request(table="mrg"), timeout=10)
    assert list(mrg.pooled.shape) == [3, 24]
    empty = stub.Gather(request(idx=torch.zeros(0, 8, dtype=torch.long)), timeout=10)
    assert list(empty.pooled.shape) == [0, E, DV]


def test_info_describes_the_shard(stub):
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert (info.shard_index, info.num_shards, info.table_version) == (1, 2, "v1")
    assert (info.max_batch, info.max_per_query) == (16, 32)
    row = next(t for t in info.tables if t.table_id == "row")
    assert (row.sharding, row.row_lo, row.row_hi, row.col_lo, row.col_hi) == (
        pb.SHARDING_ROW,
        300,
        600,
        0,
        DV,
    )
    dim = next(t for t in info.tables if t.table_id == "dim")
    assert (dim.sharding, dim.row_lo, dim.row_hi, dim.col_lo, dim.col_hi) == (
        pb.SHARDING_DIM,
        0,
        600,
        16,
        32,
    )
    assert next(t for t in info.tables if t.table_id == "mrg").merged


def test_health_and_reflection_are_served(server):
    with grpc.insecure_channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "ultramem.v1.GatherPool"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"ultramem.v1.GatherPool", "grpc.health.v1.Health"} <= names
