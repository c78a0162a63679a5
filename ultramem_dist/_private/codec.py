"""Tensor <-> ``ultramem.v1.Tensor`` (raw little-endian bytes + dtype + shape).

Decoding never trusts the sender: the element count is computed from the declared shape with
Python integers and checked against a caller-given cap and against ``len(data)`` *before* any
tensor is allocated, and the result is a zero-copy view of the ``bytes`` object the protobuf
runtime hands out (upb materialises that object once per field access; we access it once).
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import numpy as np

from ultramem_dist.errors import InvalidRequestError
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("ultramem-dist's wire codec assumes a little-endian host")

__all__ = [
    "NAME_TO_PB",
    "decode_array",
    "decode_tensor",
    "dtype_name",
    "encode_array",
    "encode_tensor",
]

_PB_NAMES: dict[int, str] = {
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
    pb.DTYPE_INT64: "int64",
    pb.DTYPE_INT32: "int32",
}
NAME_TO_PB: dict[str, int] = {v: k for k, v in _PB_NAMES.items()}
"""Wire ``DType`` of each dtype name (torch-free; :data:`DTYPE_TO_PB` is keyed by torch dtypes)."""


@functools.cache
def _torch_maps() -> tuple[dict[int, torch.dtype], dict[torch.dtype, int]]:
    import torch

    # torch warns once per process that a tensor over a read-only array is not writable;
    # absorb that single warning here instead of wrapping every decode in catch_warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(np.frombuffer(b"\0\0\0\0", dtype=np.float32))
    to_torch = {code: getattr(torch, name) for code, name in _PB_NAMES.items()}
    return to_torch, {v: k for k, v in to_torch.items()}


def __getattr__(name: str) -> Any:
    # PB_TO_DTYPE / DTYPE_TO_PB map to torch dtypes: built (importing torch) on first use only
    if name == "PB_TO_DTYPE":
        return _torch_maps()[0]
    if name == "DTYPE_TO_PB":
        return _torch_maps()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _name(dtype: Any) -> str:
    """Name of a dtype given as a name, a torch dtype or a numpy dtype."""
    if isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


_PB_TO_NP: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_FLOAT16: np.dtype(np.float16),
    pb.DTYPE_BFLOAT16: np.dtype(np.uint16),  # bit patterns; torch views them as bfloat16
    pb.DTYPE_INT64: np.dtype(np.int64),
    pb.DTYPE_INT32: np.dtype(np.int32),
}
_NP_TO_PB: dict[np.dtype, int] = {v: k for k, v in _PB_TO_NP.items() if k != pb.DTYPE_BFLOAT16}
MAX_NDIM = 4


def dtype_name(dtype: torch.dtype | str | int) -> str:
    """Short name of a torch dtype, a dtype name or a wire ``DType`` enum value."""
    if isinstance(dtype, int):
        return _PB_NAMES.get(dtype, f"DType({dtype})")
    return _name(dtype)


def encode_array(a: np.ndarray, out: pb.Tensor, dtype: int = 0) -> pb.Tensor:
    """Serialise a numpy array into ``out`` (one copy into its ``bytes``). ``dtype`` is the wire
    ``DType`` (default: from the array's dtype; pass ``DTYPE_BFLOAT16`` for a uint16 view of
    bfloat16 data, which numpy cannot name)."""
    code = dtype or _NP_TO_PB.get(a.dtype)
    if code is None:
        supported = sorted(_PB_NAMES.values())
        raise TypeError(f"cannot encode numpy dtype {a.dtype}; supported: {supported}")
    out.dtype = code
    out.shape[:] = a.shape
    out.data = a.tobytes()  # C order, whatever the array's strides
    return out


def encode_tensor(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Serialise a CPU tensor (one copy into the message's ``bytes``)."""
    import torch

    to_pb = _torch_maps()[1]
    if t.dtype not in to_pb:
        raise TypeError(f"cannot encode dtype {t.dtype}; supported: {sorted(_PB_NAMES.values())}")
    msg = pb.Tensor() if out is None else out
    t = t.detach()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
    return encode_array(raw.numpy(), msg, to_pb[t.dtype])


def decode_array(
    msg: pb.Tensor,
    *,
    name: str,
    dtypes: Collection[torch.dtype | str],
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
    dtype = _PB_NAMES.get(code)
    if dtype is None or dtype not in {_name(d) for d in dtypes}:
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
    dtypes: Collection[torch.dtype | str],
    max_elements: int,
    ndims: Collection[int] = (1, 2, 3),
) -> torch.Tensor:
    """:func:`decode_array` as a torch tensor (a zero-copy view; same checks and errors)."""
    import torch

    _torch_maps()  # absorbs torch's one read-only-array warning
    a = decode_array(msg, name=name, dtypes=dtypes, max_elements=max_elements, ndims=ndims)
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if msg.dtype == pb.DTYPE_BFLOAT16 else t
