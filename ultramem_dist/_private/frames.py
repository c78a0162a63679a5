"""Frames between a process and its lookup process (:mod:`ultramem_dist.client.lookup_worker`).

A frame is a 13-byte header ``<u32 payload length><u8 kind><u64 request id>`` and a payload.
Lookups and their results, the hot path, carry raw arrays (:func:`pack_gather`,
:func:`pack_array`: a dtype string, the shape and the bytes); the rare control frames carry a
pickle. Both ends are this package in two processes of one user, over a private
``socketpair``: pickle is never used on anything read from the network.
"""

from __future__ import annotations

import builtins
import math
import pickle
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from ultramem_dist import errors

__all__ = [
    "HEADER",
    "Kind",
    "decode_error",
    "encode_error",
    "frame",
    "pack_array",
    "pack_gather",
    "pickled",
    "raw_frame",
    "unpack_array",
    "unpack_gather",
]

HEADER = struct.Struct("<IBQ")
PICKLE_PROTOCOL = 4  # protocol 5 would unpickle arrays read-only (torch.from_numpy warns)


class Kind:
    """Frame kinds. Requests go to the lookup process; OK/ERROR/READY come back."""

    OPEN = 1  # pickle (targets, version, deadline_s, connect_timeout_s, options)
    #           -> OK pickle (handle, layout, version)
    GATHER = 2  # pack_gather(handle, table_id, indices, blocks, weights[, pre_input])
    #             -> ARRAY pooled
    CLOSE = 3  # pickle handle -> OK pickle None
    OK = 10
    ERROR = 11  # pickle (exception class name, message)
    READY = 12  # the lookup process is up (request id 0)
    ARRAY = 13  # pack_array(result)


def pickled(payload: Any) -> bytes:
    """The body of a control frame."""
    return pickle.dumps(payload, protocol=PICKLE_PROTOCOL)


def frame(kind: int, rid: int, payload: Any) -> bytes:
    """One frame: header + pickled ``payload``."""
    return raw_frame(kind, rid, pickled(payload))


def raw_frame(kind: int, rid: int, body: bytes) -> bytes:
    return HEADER.pack(len(body), kind, rid) + body


_ARRAY_HEAD = struct.Struct("<B4sB")  # dtype string length, dtype string (padded), ndim
_U32 = struct.Struct("<I")
_SHAPES = [struct.Struct(f"<{n}Q") for n in range(9)]  # shape structs by ndim, built once

# These run on a decoding thread between model blocks, where every instruction is cold (this VM
# runs a tiny numpy call ~15x slower right after compute or idle than in a hot loop): keep them
# to a few C calls each (no np.prod, no per-call format strings).


def _shape_struct(ndim: int) -> struct.Struct:
    return _SHAPES[ndim] if ndim < len(_SHAPES) else struct.Struct(f"<{ndim}Q")


def pack_array(a: np.ndarray) -> bytes:
    """``a`` as dtype string + shape + C-order bytes."""
    dt = a.dtype.str.encode()
    if len(dt) > 4:
        raise ValueError(f"cannot frame dtype {a.dtype}")
    ndim = a.ndim
    return _ARRAY_HEAD.pack(len(dt), dt, ndim) + _shape_struct(ndim).pack(*a.shape) + a.tobytes()


def unpack_array(buf: bytes | bytearray, offset: int = 0) -> tuple[np.ndarray, int]:
    """The array packed at ``offset`` (a view of ``buf``: writable if ``buf`` is a bytearray)
    and the offset just past it."""
    n, dt, ndim = _ARRAY_HEAD.unpack_from(buf, offset)
    offset += _ARRAY_HEAD.size
    shape = _shape_struct(ndim).unpack_from(buf, offset)
    offset += 8 * ndim
    dtype = np.dtype(dt[:n].decode())
    count = math.prod(shape)
    a = np.frombuffer(buf, dtype, count, offset).reshape(shape)
    return a, offset + count * dtype.itemsize


def pack_gather(handle: int, table_id: str, arrays: Sequence[np.ndarray]) -> bytes:
    name = table_id.encode()
    parts = [_U32.pack(handle), _U32.pack(len(name)), name, _U32.pack(len(arrays))]
    parts.extend(pack_array(a) for a in arrays)
    return b"".join(parts)


def unpack_gather(buf: bytes | bytearray) -> tuple[int, str, list[np.ndarray]]:
    (handle,) = _U32.unpack_from(buf, 0)
    (n,) = _U32.unpack_from(buf, 4)
    table_id = bytes(buf[8 : 8 + n]).decode()
    offset = 8 + n
    (count,) = _U32.unpack_from(buf, offset)
    offset += 4
    arrays = []
    for _ in range(count):
        a, offset = unpack_array(buf, offset)
        arrays.append(a)
    return handle, table_id, arrays


def encode_error(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def decode_error(payload: tuple[str, str]) -> Exception:
    """The exception an ERROR frame describes: the same ultramem_dist or builtin exception class
    when there is one, else a :class:`~ultramem_dist.errors.RemoteError` naming the type."""
    name, message = payload
    cls = getattr(errors, name, None) if name in errors.__all__ else getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - a builtin with another signature: fall through
            pass
    return errors.RemoteError(f"{name}: {message}")
