"""The shard's fast path for gathers (``serving/wire.py``, ``kernels/csrc/wire.c``; streamed and
unary) writes the bytes
the generated protobuf code writes, answers exactly what the general path answers, and hands
everything else (every refusal, any unusual encoding, corrupted bytes) to the general path."""

from __future__ import annotations

import pytest
import torch
from conftest import make_table_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.errors import UltraMemError
from ultramem_dist.kernels import native
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving import wire
from ultramem_dist.serving.servicer import GatherPoolServicer
from ultramem_dist.serving.validate import Limits
from ultramem_dist.serving.wire import WireMessage, gather_header, gather_prefix, reply_header
from ultramem_dist.store import export_tables
from ultramem_dist.store.reader import load_shard

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")
N, E, HC, DV = 90, 3, 2, 12
LIMITS = Limits(max_batch=6, max_per_query=7)
SLICE = {"row": (45, 90), "dim": (0, 90), "merged": (45, 90)}  # what shard 1 serves
FIXED = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def servicers(tmp_path_factory):
    """Shard 1 of a row-sharded, a dim-sharded and a merged row-sharded store."""
    spec = make_table_spec(n_rows=N, dv=DV, expansion=E, num_cores=HC)
    out = {}
    for name, by, merged in (("row", "row", False), ("dim", "dim", False), ("merged", "row", True)):
        path = tmp_path_factory.mktemp(name)
        export_tables({"mem0": spec}, path, shards=2, by=by, merged=merged, version="v1")
        out[name] = GatherPoolServicer(load_shard(path, 1, "v1"), LIMITS, max_message_bytes=1 << 20)
    yield out
    for sv in out.values():
        sv.close()


def general(sv: GatherPoolServicer, raw: bytes, streamed: bool = True) -> bytes | None:
    """The general path's reply bytes for a stream message (``streamed``) or a unary
    request; None: it refuses it."""
    if streamed:
        message = pb.StreamGatherRequest.FromString(raw)
        request, out = message.gather, pb.StreamGatherReply(request_id=message.request_id)
        reply = out.gather
    else:
        request = pb.GatherRequest.FromString(raw)
        out = reply = pb.GatherReply()
    try:
        sv._gather_sync(request, reply)
    except UltraMemError:
        return None
    return out.SerializeToString()


def fast(sv: GatherPoolServicer, raw: bytes, streamed: bool = True) -> bytes | None:
    read = sv.read_stream_message if streamed else sv.read_gather_message
    msg = read(raw)
    if type(msg) is not WireMessage:
        return None
    table = sv._wire.table_for(msg)
    done = None if table is None else sv._wire.answer(msg, table, 2)
    return None if done is None else done.reply


def _raw(message: pb.StreamGatherRequest, streamed: bool) -> bytes:
    return (message if streamed else message.gather).SerializeToString()


@st.composite
def stream_messages(draw, which: str, ragged: bool | None = None) -> pb.StreamGatherRequest:
    """A valid message for shard 1 of ``which``."""
    lo, hi = SLICE[which]
    tokens = draw(st.integers(0, LIMITS.max_batch))
    ragged = draw(st.booleans()) if ragged is None else ragged
    if ragged:
        lengths = draw(
            st.lists(st.integers(0, LIMITS.max_per_query), min_size=tokens, max_size=tokens)
        )
        nnz, shape = sum(lengths), None
    else:
        per = draw(st.integers(0, LIMITS.max_per_query))
        nnz, shape = tokens * per, (tokens, per)
    ids = draw(st.lists(st.integers(lo, hi - 1), min_size=nnz, max_size=nnz))
    blk = draw(st.lists(st.integers(0, E - 1), min_size=nnz, max_size=nnz))
    w = draw(st.lists(st.floats(-2, 2, width=32), min_size=nnz * HC, max_size=nnz * HC))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    m = pb.StreamGatherRequest(
        request_id=draw(st.integers(0, 2**64 - 1)), timeout_us=draw(st.integers(0, 10**7))
    )
    req = m.gather
    req.table_id, req.table_version = "mem0", "v1"
    ids_t, blk_t = torch.tensor(ids, dtype=dtype), torch.tensor(blk, dtype=dtype)
    w_t = torch.tensor(w, dtype=torch.float32).view(nnz, HC)
    if shape is None:
        offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()])
        encode_tensor(offsets.to(dtype), req.offsets)
    else:
        ids_t, blk_t, w_t = ids_t.view(shape), blk_t.view(shape), w_t.view(*shape, HC)
    encode_tensor(ids_t, req.indices)
    encode_tensor(blk_t, req.blocks)
    encode_tensor(w_t, req.weights)
    return m


@given(
    request_id=st.integers(0, 2**64 - 1),
    table=st.text(min_size=1, max_size=12),
    version=st.text(min_size=1, max_size=12),
    shard=st.integers(0, 2**32 - 1),
    shape=st.lists(st.integers(0, 300), min_size=2, max_size=3),
)
@settings(max_examples=150, deadline=None)
def test_reply_header_is_what_the_generated_code_writes(request_id, table, version, shard, shape):
    data = torch.arange(int(torch.tensor(shape).prod())).float().numpy().tobytes()
    want = pb.StreamGatherReply(request_id=request_id)
    want.gather.table_id, want.gather.table_version = table, version
    want.gather.shard_index = shard
    want.gather.pooled.dtype = pb.DTYPE_FLOAT32
    want.gather.pooled.shape[:] = shape
    want.gather.pooled.data = data
    prefix = gather_prefix(table, version, shard)
    head, gather_bytes = reply_header(request_id, prefix, tuple(shape))
    assert head + data == want.SerializeToString()
    assert gather_bytes == want.gather.ByteSize()
    unary, size = gather_header(prefix, tuple(shape))  # a unary Gather's reply
    assert unary + data == want.gather.SerializeToString() and size == gather_bytes


@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "unary"])
@pytest.mark.parametrize("which", sorted(SLICE))
@given(data=st.data())
@settings(FIXED, max_examples=40)
def test_valid_messages_get_the_general_paths_reply(servicers, which, streamed, data):
    sv = servicers[which]
    raw = _raw(data.draw(stream_messages(which)), streamed)
    before = sv._wire.answered
    reply = fast(sv, raw, streamed)
    assert reply is not None and sv._wire.answered == before + 1
    assert reply == general(sv, raw, streamed)


def _dense(which="row", **change) -> bytes:
    """One valid dense message for shard 1 of ``which``, with ``change`` applied."""
    m = pb.StreamGatherRequest(request_id=9)
    req = m.gather
    req.table_id, req.table_version = change.pop("table", "mem0"), change.pop("version", "v1")
    ids = change.pop("ids", torch.tensor([[50, 51], [52, 89]]))
    encode_tensor(ids, req.indices)
    encode_tensor(change.pop("blocks", torch.tensor([[0, 1], [2, 0]])), req.blocks)
    encode_tensor(change.pop("weights", torch.ones(*ids.shape, HC)), req.weights)
    if "offsets" in change:
        encode_tensor(change.pop("offsets"), req.offsets)
    assert not change
    return m.SerializeToString()


BAD = {
    "other version": dict(version="v2"),
    "unknown table": dict(table="mem9"),
    "row below the slice": dict(ids=torch.tensor([[44, 51], [52, 89]])),
    "row past the table": dict(ids=torch.tensor([[50, 51], [52, 90]])),
    "block id E": dict(blocks=torch.tensor([[0, 1], [2, E]])),
    "negative block": dict(blocks=torch.tensor([[0, -1], [2, 0]])),
    "NaN weight": dict(weights=torch.tensor(float("nan")).expand(2, 2, HC).clone()),
    "weights of another h_c": dict(weights=torch.ones(2, 2, HC + 1)),
    "bfloat16 weights": dict(weights=torch.ones(2, 2, HC, dtype=torch.bfloat16)),
    "float indices": dict(ids=torch.tensor([[50.0, 51.0], [52.0, 53.0]])),
    "blocks of another shape": dict(blocks=torch.tensor([[0, 1, 2], [2, 0, 1]])),
    "blocks of another shape, same size": dict(blocks=torch.tensor([[0, 1, 2, 0]])),
    "weights of another shape, same size": dict(weights=torch.ones(1, 4, HC)),
    "batch above the limit": dict(
        ids=torch.full((7, 1), 50),
        blocks=torch.zeros(7, 1, dtype=torch.int64),
        weights=torch.ones(7, 1, HC),
    ),  # fmt: skip
    "query above the limit": dict(
        ids=torch.full((1, 8), 50),
        blocks=torch.zeros(1, 8, dtype=torch.int64),
        weights=torch.ones(1, 8, HC),
    ),  # fmt: skip
    "offsets on dense indices": dict(offsets=torch.tensor([0, 4])),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_what_the_general_path_refuses_is_left_to_it(servicers, case):
    raw = _dense(**BAD[case])
    sv = servicers["row"]
    assert general(sv, raw) is None  # refused (the test's premise)
    assert fast(sv, raw) is None
    unary = pb.StreamGatherRequest.FromString(raw).gather.SerializeToString()
    assert general(sv, unary, streamed=False) is None and fast(sv, unary, streamed=False) is None


@pytest.mark.parametrize(
    "offsets",
    [[0, 1, 4], [0, 3, 2, 4], [1, 4], [0, 5], [0, 0, 0, 0, 0, 0, 0, 0, 4], [0, 0, 8], [0, 8, 8]],
)
def test_bad_offsets_are_left_to_the_general_path(servicers, offsets):
    n = offsets[-1] if offsets[-1] == 8 else 4  # 8 entries: one query above the limit of 7
    flat = dict(ids=torch.arange(50, 50 + n), blocks=torch.arange(n) % E)
    raw = _dense(**flat, weights=torch.ones(n, HC), offsets=torch.tensor(offsets))
    sv = servicers["row"]
    if offsets == [0, 1, 4]:  # the valid one: answered the same both ways
        assert fast(sv, raw) == general(sv, raw) is not None
    else:
        assert general(sv, raw) is None and fast(sv, raw) is None


def test_a_huge_declared_batch_is_left_before_anything_is_allocated(servicers, monkeypatch):
    flat = dict(ids=torch.arange(50, 54), blocks=torch.arange(4) % E, weights=torch.ones(4, HC))
    raw = _dense(**flat, offsets=torch.tensor([0] * 2**20 + [4]))  # 2^20 queries declared
    sv = servicers["row"]
    msg = sv.read_stream_message(raw)
    assert type(msg) is WireMessage
    monkeypatch.setattr(wire.np, "empty", lambda *a, **k: pytest.fail("allocated a reply"))
    assert sv._wire.answer(msg, sv._wire.table_for(msg), 2) is None
    monkeypatch.undo()
    assert general(sv, raw) is None  # refused there (batch above the limit)


def test_a_differently_encoded_message_takes_the_general_path(servicers):
    sv = servicers["row"]
    raw = _dense()
    assert type(sv.read_stream_message(raw)) is WireMessage
    twice = raw + pb.StreamGatherRequest(request_id=10).SerializeToString()  # field 1 again
    unknown = raw + b"\x20\x01"  # a field 4 (not in this version of the contract)
    for other in (twice, unknown):
        assert type(sv.read_stream_message(other)) is pb.StreamGatherRequest  # generated code
    assert type(sv.read_stream_message(b"\xff\xff")).__name__ == "_Undecodable"
    # not UTF-8: the generated code refuses the string field, so the fast path must not read it
    bad_text = raw.replace(b"mem0", b"m\xffm0")
    assert type(sv.read_stream_message(bad_text)).__name__ == "_Undecodable"


@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "unary"])
@given(data=st.data())
@settings(FIXED, max_examples=200)
def test_corrupted_bytes_never_get_another_answer(servicers, streamed, data):
    which = data.draw(st.sampled_from(sorted(SLICE)))
    sv = servicers[which]
    raw = bytearray(_raw(data.draw(stream_messages(which)), streamed))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw)))
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip" and at < len(raw):
            raw[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del raw[at:]
        else:
            raw[at:at] = bytes([data.draw(st.integers(0, 255))])
    raw = bytes(raw)
    msg = (sv.read_stream_message if streamed else sv.read_gather_message)(raw)
    if type(msg) is WireMessage:
        msg.parse()  # what the fast path read, the generated code reads too (never raises)
    reply = fast(sv, raw, streamed)
    if reply is not None:  # the fast path answered: the general path gives the same bytes
        assert reply == general(sv, raw, streamed)
