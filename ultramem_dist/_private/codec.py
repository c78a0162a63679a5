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

import numpy as np
import torch

from ultramem_dist.errors import InvalidRequestError
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("ultramem-dist's wire codec assumes a little-endian host")

__all__ = [
    "DTYPE_TO_PB",
    "PB_TO_DTYPE",
    "decode_array",
    "decode_tensor",
    "dtype_name",
    "encode_array",
    "encode_tensor",
]

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

_PB_TO_NP: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_FLOAT16: np.dtype(np.float16),
    pb.DTYPE_BFLOAT16: np.dtype(np.uint16),  # bit patterns; torch views them as bfloat16
    pb.DTYPE_INT64: np.dtype(np.int64),
    pb.DTYPE_INT32: np.dtype(np.int32),
}
_NP_TO_PB: dict[np.dtype, int] = {v: k for k, v in _PB_TO_NP.items() if k != pb.DTYPE_BFLOAT16}

# torch warns once per process that a tensor over a read-only array is not writable; absorb
# that single warning here instead of wrapping every decode in ``warnings.catch_warnings``.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.from_numpy(np.frombuffer(b"\0\0\0\0", dtype=np.float32))
MAX_NDIM = 4


def dtype_name(dtype: torch.dtype | int) -> str:
    """Short name of a torch dtype or a wire ``DType`` enum value."""
    if isinstance(dtype, int):
        if dtype not in PB_TO_DTYPE:
            return f"DType({dtype})"
        dtype = PB_TO_DTYPE[dtype]
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def encode_array(a: np.ndarray, out: pb.Tensor, dtype: int = 0) -> pb.Tensor:
    """Serialise a numpy array into ``out`` (one copy into its ``bytes``). ``dtype`` is the wire
    ``DType`` (default: from the array's dtype; pass ``DTYPE_BFLOAT16`` for a uint16 view of
    bfloat16 data, which numpy cannot name)."""
    code = dtype or _NP_TO_PB.get(a.dtype)
    if code is None:
        supported = sorted(_NAMES.values())
        raise TypeError(f"cannot encode numpy dtype {a.dtype}; supported: {supported}")
    out.dtype = code
    out.shape[:] = a.shape
    out.data = a.tobytes()  # C order, whatever the array's strides
    return out


def encode_tensor(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Serialise a CPU tensor (one copy into the message's ``bytes``)."""
    if t.dtype not in DTYPE_TO_PB:
        raise TypeError(f"cannot encode dtype {t.dtype}; supported: {sorted(_NAMES.values())}")
    msg = pb.Tensor() if out is None else out
    t = t.detach()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
    return encode_array(raw.numpy(), msg, DTYPE_TO_PB[t.dtype])


def decode_array(
    msg: pb.Tensor,
    *,
    name: str,
    dtypes: Collection[torch.dtype],
    max_elements: int,
    ndims: Collection[int] = (1, 2, 3),
) -> np.ndarray:
    """Validate ``msg`` and view it as a read-only numpy array without copying (bfloat16 data
    comes back as its ``uint16`` bit patterns).

    Raises:
        InvalidRequestError: unknown/disallowed dtype, bad rank, negative dims, more than
            ``max_elements`` elements, or ``len(data)`` not equal to ``numel * itemsize``.
    """
    code = msg.dtype
    dtype = PB_TO_DTYPE.get(code)
    if dtype is None or dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise InvalidRequestError(
            f"{name}: dtype {dtype_name(code)} is not allowed; expected {allowed}"
        )
    shape = tuple(msg.shape)
    if len(shape) not in ndims or len(shape) > MAX_NDIM:
        raise InvalidRequestError(
            f"{name}: has {len(shape)} dimensions {list(shape)}; "
            f"expected {sorted(ndims)} dimensions"
        )
    if min(shape, default=0) < 0:
        raise InvalidRequestError(f"{name}: negative dimension in shape {list(shape)}")
    numel = math.prod(shape)
    if numel > max_elements:
        raise InvalidRequestError(
            f"{name}: shape {list(shape)} has {numel} elements, above the limit of {max_elements}"
        )
    np_dtype = _PB_TO_NP[code]
    expected = numel * np_dtype.itemsize
    data = msg.data  # upb copies a bytes field on every access: read it once
    if len(data) != expected:
        raise InvalidRequestError(
            f"{name}: {len(data)} data bytes for shape {list(shape)} {dtype_name(dtype)}; "
            f"expected {expected} bytes"
        )
    # A read-only view by contract: nothing downstream writes into request/reply arrays.
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def decode_tensor(
    msg: pb.Tensor,
    *,
    name: str,
    dtypes: Collection[torch.dtype],
    max_elements: int,
    ndims: Collection[int] = (1, 2, 3),
) -> torch.Tensor:
    """:func:`decode_array` as a torch tensor (a zero-copy view; same checks and errors)."""
    a = decode_array(msg, name=name, dtypes=dtypes, max_elements=max_elements, ndims=ndims)
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if msg.dtype == pb.DTYPE_BFLOAT16 else t
