"""Message sizes computed from shapes equal protobuf's own; histogram quantiles are right."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving.metrics import (
    gather_reply_bytes,
    gather_request_bytes,
    histogram_quantile,
    tensor_wire_bytes,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]
shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3)
names = st.text(max_size=20)


@given(st.sampled_from(DTYPES), shapes)
@settings(max_examples=60, deadline=None)
def test_tensor_size_matches_protobuf(dtype, shape):
    msg = encode_tensor(torch.zeros(shape, dtype=dtype))
    assert tensor_wire_bytes(msg) == msg.ByteSize()


@given(names, names, st.integers(0, 2**32 - 1), shapes)
@settings(max_examples=60, deadline=None)
def test_reply_size_matches_protobuf(table, version, shard, shape):
    reply = pb.GatherReply(table_id=table, table_version=version, shard_index=shard)
    encode_tensor(torch.zeros(shape), reply.pooled)
    assert gather_reply_bytes(reply) == reply.ByteSize()


@given(
    names, names, st.sampled_from(DTYPES), shapes, st.lists(st.booleans(), min_size=4, max_size=4)
)
@settings(max_examples=60, deadline=None)
def test_request_size_matches_protobuf(table, version, dtype, shape, present):
    request = pb.GatherRequest(table_id=table, table_version=version)
    for name, here in zip(("indices", "offsets", "blocks", "weights"), present, strict=True):
        if here:
            encode_tensor(torch.zeros(shape, dtype=dtype), getattr(request, name))
    assert gather_request_bytes(request) == request.ByteSize()


def test_histogram_quantile_interpolates_like_promql():
    inf = math.inf
    assert histogram_quantile([], 0.5) is None
    assert histogram_quantile([[1.0, 0], [inf, 0]], 0.5) is None
    # 10 observations in (0, 1], 10 in (1, 2]: the median is the top of the first bucket
    b = [[1.0, 10], [2.0, 20], [inf, 20]]
    assert histogram_quantile(b, 0.5) == 1.0
    assert histogram_quantile(b, 0.75) == 1.5
    assert histogram_quantile(b, 0.25) == 0.5
    # an empty bucket in between is skipped; the +Inf bucket reports the largest finite bound
    assert histogram_quantile([[1.0, 0], [2.0, 0], [4.0, 4], [inf, 4]], 0.5) == 3.0
    assert histogram_quantile([[1.0, 1], [inf, 3]], 0.9) == 1.0
