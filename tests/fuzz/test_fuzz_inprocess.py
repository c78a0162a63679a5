"""Fuzzing the Gather request path in this process: hypothesis-generated messages and bytes
through the servicer's decode -> validate -> kernel -> encode steps, then raw bytes through a
real in-process gRPC server. Every case must end in a defined status."""

from __future__ import annotations

import math
import tracemalloc

import grpc
import pytest
from conftest import InProcessShard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.reliability.fuzz import (
    DEFINED_STATUSES,
    GATHER_METHOD,
    FuzzStats,
    case_stream,
    evaluate_in_process,
    hostile_shape_request,
    valid_request,
)
from ultramem_dist.reliability.synthetic import make_synthetic_store
from ultramem_dist.serving import ServerConfig
from ultramem_dist.serving.validate import Limits
from ultramem_dist.store import load_shard

N, E, HC = 300, 4, 2
LIMITS = Limits(max_batch=32, max_per_query=32)
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_ITEM = {1: 4, 2: 2, 3: 2, 4: 8, 5: 4}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    kw = {"n_rows": N, "dv": 16, "d_model": 12, "topm": 4}
    return make_synthetic_store(tmp_path_factory.mktemp("store"), shards=2, **kw)


@pytest.fixture(scope="module")
def shard(store):
    return load_shard(store, 1)  # shard 1 of 2: row tables own rows [150, 300)


def _assert_defined(shard, payload: bytes) -> str:
    status, detail = evaluate_in_process(shard, LIMITS, payload)
    assert status in DEFINED_STATUSES, (status, detail, payload[:80].hex())
    return status


# ---------------------------------------------------------------- hypothesis: structured

dims = st.one_of(
    st.integers(0, 40),
    st.integers(-3, -1),
    st.sampled_from([2**20, 2**31, 2**40, 2**62, 2**63 - 1]),
)


@st.composite
def tensors(draw):
    dtype = draw(st.integers(-2, 8))
    shape = draw(st.lists(dims, max_size=5))
    numel = math.prod(shape) if all(d >= 0 for d in shape) else -1
    item = _ITEM.get(dtype, 4)
    if 0 <= numel * item <= 4096 and draw(st.booleans()):
        data = draw(st.binary(min_size=numel * item, max_size=numel * item))
    else:
        data = draw(st.binary(max_size=256))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def requests(draw):
    req = pb.GatherRequest(
        table_id=draw(st.sampled_from(["row", "dim", "row_m", "dim_m", "", "nope", "r" * 300])),
        table_version=draw(st.sampled_from(["v1", "v1", "v0", ""])),
    )
    for name in ("indices", "offsets", "blocks", "weights"):
        if draw(st.booleans()):
            getattr(req, name).CopyFrom(draw(tensors()))
    return req


@SETTINGS
@given(requests())
def test_structured_requests_end_in_a_defined_status(shard, req):
    _assert_defined(shard, req.SerializeToString())


# ---------------------------------------------------------------- hypothesis: well-shaped


@st.composite
def shaped_requests(draw):
    """Consistent shapes and mostly valid values (so requests reach the kernel), with a few
    hostile ids, blocks or weights injected at drawn positions."""
    import torch

    from ultramem_dist._private.codec import encode_tensor

    table = draw(st.sampled_from(["row", "dim", "row_m", "dim_m"]))
    lo = 150 if table.startswith("row") else 0  # shard 1 owns rows [150, 300) of row tables
    t = draw(st.integers(0, LIMITS.max_batch + 1))
    per = draw(st.integers(0, LIMITS.max_per_query + 1))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    idx = torch.randint(lo, N, (t, per), generator=g)
    blk = torch.randint(0, E, (t, per), generator=g)
    w = torch.randn(t, per, HC, generator=g)
    if t * per:
        hostile_ids = st.sampled_from([-(2**63), 2**63 - 1, 2**31, -1, 0, lo - 1, N, N + 1])
        for _ in range(draw(st.integers(0, 3))):
            pos = draw(st.integers(0, t * per - 1))
            what = draw(st.sampled_from(["idx", "blk", "w"]))
            if what == "idx":
                idx.view(-1)[pos] = draw(hostile_ids)
            elif what == "blk":
                blk.view(-1)[pos] = draw(st.sampled_from([-1, E, 2**31 - 1, -(2**31)]))
            else:
                w.view(-1)[pos * HC + draw(st.integers(0, HC - 1))] = draw(
                    st.floats(width=32, allow_nan=True, allow_infinity=True)
                )
    req = pb.GatherRequest(table_id=table, table_version="v1")
    encode_tensor(idx, req.indices)
    encode_tensor(blk.to(draw(st.sampled_from([torch.int32, torch.int64]))), req.blocks)
    encode_tensor(w, req.weights)
    return req


@SETTINGS
@given(shaped_requests())
def test_well_shaped_hostile_values_end_in_a_defined_status(shard, req):
    status = _assert_defined(shard, req.SerializeToString())
    if status == "OK" and req.weights.data:  # then every weight really was finite
        import torch

        w = torch.frombuffer(bytearray(req.weights.data), dtype=torch.float32)
        assert bool(torch.isfinite(w).all())


@SETTINGS
@given(st.binary(max_size=2048))
def test_random_bytes_end_in_a_defined_status(shard, data):
    _assert_defined(shard, data)


# ---------------------------------------------------------------- seeded stream


def test_seeded_mutation_stream(shard):
    stats = FuzzStats()
    for table, row_lo in (("row", 150), ("dim", 0), ("row_m", 150), ("dim_m", 0)):
        base = valid_request(table, "v1", N, E, HC, row_lo=row_lo)
        assert _assert_defined(shard, base.SerializeToString()) == "OK"
        stream = case_stream(base, LIMITS, seed=hash(table) % 1000)
        for _ in range(400):
            case = next(stream)
            status, detail = evaluate_in_process(shard, LIMITS, case.payload)
            stats.record(case, status, detail)
    assert stats.cases == 1600
    assert stats.undefined_count == 0, stats.undefined
    assert stats.by_status["OK"] > 0 and stats.by_status["INVALID_ARGUMENT"] > 0


def test_huge_declared_shape_allocates_nothing(shard):
    base = valid_request("row", "v1", N, E, HC, row_lo=150)
    hostile = hostile_shape_request(base, [2**40, 2**20]).SerializeToString()
    _assert_defined(shard, hostile)  # warm up imports/caches
    tracemalloc.start()
    try:
        for shape in ([2**40, 2**20], [2**20, 2**40], [2**31, 2**31], [2**62, 4]):
            status, detail = evaluate_in_process(
                shard, LIMITS, hostile_shape_request(base, shape).SerializeToString()
            )
            assert status == "INVALID_ARGUMENT" and "above the limit" in detail
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, f"validation allocated {peak} bytes for a hostile shape"


# ---------------------------------------------------------------- real gRPC, in process


def test_raw_bytes_through_an_in_process_server(store):
    server = InProcessShard(ServerConfig(store=store, shard=1, max_batch=32, max_per_query=32,
                                         max_message_bytes=256 << 10))  # fmt: skip
    try:
        base = valid_request("row", "v1", N, E, HC, row_lo=150)
        stream = case_stream(base, LIMITS, seed=7, oversize_bytes=256 << 10, oversize_every=40)
        stats = FuzzStats()
        opts = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(server.target, options=opts) as ch:
            call = ch.unary_unary(GATHER_METHOD)  # no serializer: the bytes go as they are
            for _ in range(300):
                case = next(stream)
                try:
                    call(case.payload, timeout=10)
                    status, detail = "OK", ""
                except grpc.RpcError as exc:
                    status, detail = exc.code().name, exc.details() or ""
                stats.record(case, status, detail)
            assert stats.undefined_count == 0, stats.undefined
            assert stats.by_status["RESOURCE_EXHAUSTED"] >= 1  # oversize messages
            with pytest.raises(grpc.RpcError) as info:  # undecodable -> INVALID_ARGUMENT
                call(b"\xff\xff\xff\xff", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid ultramem.v1.GatherRequest" in info.value.details()
            reply = pb.GatherReply.FromString(call(base.SerializeToString(), timeout=10))
            assert list(reply.pooled.shape) == [3, E, 16]
    finally:
        server.stop()


def test_fuzz_cli_against_a_live_server(store, tmp_path):
    import json

    from typer.testing import CliRunner

    from ultramem_dist.cli import load_commands

    app = load_commands()
    server = InProcessShard(ServerConfig(store=store, shard=0, max_message_bytes=128 << 10))
    try:
        out = tmp_path / "fuzz.json"
        res = CliRunner().invoke(
            app,
            ["fuzz", "--target", server.target, "--cases", "120", "--table", "dim",
             "--json-out", str(out)],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        data = json.loads(out.read_text())
        assert data["cases"] == 120 and data["undefined_status"] == 0 and data["server_alive"]
        res = CliRunner().invoke(app, ["fuzz", "--target", "198.51.100.7:50051"])
        assert res.exit_code == 2 and "non-loopback" in " ".join(res.output.split())
    finally:
        server.stop()
