"""Frames between a process and its lookup process (:mod:`ultramem_dist.client.lookup_worker`).

A frame is a 13-byte header ``<u32 payload length><u8 kind><u64 request id>`` followed by a
pickled payload. Both ends are this package in two processes of one user, over a private
``socketpair``: pickle is the codec, never used on anything read from the network.
"""

from __future__ import annotations

import builtins
import pickle
import struct
from typing import Any

from ultramem_dist import errors

__all__ = [
    "HEADER",
    "Kind",
    "decode_error",
    "encode_error",
    "frame",
]

HEADER = struct.Struct("<IBQ")
PICKLE_PROTOCOL = 4  # protocol 5 would unpickle arrays read-only (torch.from_numpy warns)


class Kind:
    """Frame kinds. Requests go to the lookup process; OK/ERROR/READY come back."""

    OPEN = 1  # (targets, version, deadline_s, connect_timeout_s, options) -> (handle, layout, ver)
    GATHER = 2  # (handle, table_id, indices, blocks, weights) -> pooled ndarray
    CLOSE = 3  # handle -> None
    OK = 10
    ERROR = 11  # (exception class name, message)
    READY = 12  # the lookup process is up (request id 0)


def frame(kind: int, rid: int, payload: Any) -> bytes:
    """One frame: header + pickled ``payload``."""
    body = pickle.dumps(payload, protocol=PICKLE_PROTOCOL)
    return HEADER.pack(len(body), kind, rid) + body


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
