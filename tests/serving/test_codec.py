"""Tensor <-> bytes codec: round trips and hostile inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ultramem_dist._private.codec import decode_array, decode_tensor, encode_array, encode_tensor
from ultramem_dist.errors import InvalidRequestError
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]


@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * 1000).to(dtype)
    msg = pb.Tensor.FromString(encode_tensor(t).SerializeToString())
    back = decode_tensor(msg, name="x", dtypes=DTYPES, max_elements=1000)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_non_contiguous_input_is_encoded_in_logical_order():
    t = torch.arange(12, dtype=torch.float32).view(3, 4).T
    back = decode_tensor(encode_tensor(t), name="x", dtypes=DTYPES, max_elements=100)
    assert torch.equal(back, t)


def _msg(dtype=pb.DTYPE_FLOAT32, shape=(2, 3), nbytes=24):
    return pb.Tensor(dtype=dtype, shape=list(shape), data=b"\0" * nbytes)


@pytest.mark.parametrize(
    "msg,match",
    [
        (_msg(nbytes=20), "expected 24 bytes"),
        (_msg(nbytes=28), "expected 24 bytes"),
        (_msg(dtype=pb.DTYPE_INT64, nbytes=48), "dtype int64 is not allowed"),
        (_msg(dtype=0), "dtype DType\\(0\\) is not allowed"),
        (_msg(dtype=99), "is not allowed"),
        (_msg(shape=(2, -3)), "negative"),
        (_msg(shape=(6,)), "1 dimensions"),
        (_msg(shape=(1 << 40, 1 << 40), nbytes=0), "above the limit"),
    ],
)
def test_hostile_tensors_are_rejected_before_allocation(msg, match):
    with pytest.raises(InvalidRequestError, match=match):
        decode_tensor(msg, name="x", dtypes=(torch.float32,), max_elements=1000, ndims=(2,))


def test_arrays_round_trip_as_read_only_views_of_the_message_bytes():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2]  # strided: encoded in C order
    msg = encode_array(a, pb.Tensor())
    back = decode_array(msg, name="x", dtypes=(torch.int32,), max_elements=100, ndims=(2,))
    np.testing.assert_array_equal(back, a)
    assert not back.flags.writeable  # a view of the bytes, never written
    with pytest.raises(TypeError, match="cannot encode numpy dtype bool"):
        encode_array(np.zeros(3, dtype=bool), pb.Tensor())
