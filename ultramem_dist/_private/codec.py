"""Tensor <-> ``ultramem.v1.Tensor`` (raw little-endian bytes + dtype + shape).

Decoding never trusts the sender: the element count is computed from the declared shape with
Python integers and checked against a caller-given cap and against ``len(data)`` *before* any
tensor is allocated, and the result is a zero-copy view of the ``bytes`` object the protobuf
runtime hands out (upb materialises that object once per field access; we access it once).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Collection

import torch

from ultramem_dist.errors import InvalidRequestError
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("ultramem-dist's wire codec assumes a little-endian host")

__all__ = ["DTYPE_TO_PB", "PB_TO_DTYPE", "decode_tensor", "dtype_name", "encode_tensor"]

PB_TO_DTYPE: dict[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_INT32: torch.int32,
}
DTYPE_TO_PB: dict[torch.dtype, int] = {v: k for k, v in PB_TO_DTYPE.items()}
_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
}
_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in _NAMES}

# torch warns once per process that a tensor over immutable ``bytes`` is not writable; absorb
# that single warning here instead of wrapping every decode in ``warnings.catch_warnings``.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(b"\0\0\0\0", dtype=torch.float32)
MAX_NDIM = 4


def dtype_name(dtype: torch.dtype | int) -> str:
    """Short name of a torch dtype or a wire ``DType`` enum value."""
    if isinstance(dtype, int):
        if dtype not in PB_TO_DTYPE:
            return f"DType({dtype})"
        dtype = PB_TO_DTYPE[dtype]
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def encode_tensor(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Serialise a CPU tensor (one copy into the message's ``bytes``)."""
    if t.dtype not in DTYPE_TO_PB:
        raise TypeError(f"cannot encode dtype {t.dtype}; supported: {sorted(_NAMES.values())}")
    msg = pb.Tensor() if out is None else out
    t = t.detach().contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
    msg.dtype = DTYPE_TO_PB[t.dtype]
    msg.shape[:] = list(t.shape)
    msg.data = raw.numpy().tobytes()
    return msg


def decode_tensor(
    msg: pb.Tensor,
    *,
    name: str,
    dtypes: Collection[torch.dtype],
    max_elements: int,
    ndims: Collection[int] = (1, 2, 3),
) -> torch.Tensor:
    """Validate and view ``msg`` as a tensor without copying.

    Raises:
        InvalidRequestError: unknown/disallowed dtype, bad rank, negative dims, more than
            ``max_elements`` elements, or ``len(data)`` not equal to ``numel * itemsize``.
    """
    if msg.dtype not in PB_TO_DTYPE or PB_TO_DTYPE[msg.dtype] not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise InvalidRequestError(
            f"{name}: dtype {dtype_name(msg.dtype)} is not allowed; expected {allowed}"
        )
    dtype = PB_TO_DTYPE[msg.dtype]
    shape = tuple(msg.shape)
    if len(shape) not in ndims or len(shape) > MAX_NDIM:
        raise InvalidRequestError(
            f"{name}: has {len(shape)} dimensions {list(shape)}; "
            f"expected {sorted(ndims)} dimensions"
        )
    if any(d < 0 for d in shape):
        raise InvalidRequestError(f"{name}: negative dimension in shape {list(shape)}")
    numel = math.prod(shape)
    if numel > max_elements:
        raise InvalidRequestError(
            f"{name}: shape {list(shape)} has {numel} elements, above the limit of {max_elements}"
        )
    expected = numel * _ITEMSIZE[dtype]
    data = msg.data  # upb copies a bytes field on every access: read it once
    if len(data) != expected:
        raise InvalidRequestError(
            f"{name}: {len(data)} data bytes for shape {list(shape)} {dtype_name(dtype)}; "
            f"expected {expected} bytes"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # A read-only view by contract: nothing downstream writes into request/reply tensors.
    return torch.frombuffer(data, dtype=dtype).view(shape)
