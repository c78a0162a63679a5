"""The shard's fast path for ``GatherStream`` messages: wire bytes in, wire bytes out.

A stream message is read as raw bytes. When the native library parses it
(``kernels/csrc/wire.c``: the plain protobuf encoding every library writes) and it asks for a
table this shard pools natively, one C call checks it and pools it straight into the reply's
data area, and the reply's few header bytes are written here, so neither side of the call builds
protobuf objects or numpy views. Anything else, every refusal included, takes the general path:
the generated protobuf code parses the message and the servicer answers it or words its error
exactly as for a unary ``Gather``. The proto stays the contract; tests check the bytes written
here against the generated code's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ultramem_dist.kernels import native
from ultramem_dist.kernels.native import NativeLib, NativePlan
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving.validate import Limits
from ultramem_dist.store.reader import ShardSlice

__all__ = [
    "WireAnswer",
    "WireMessage",
    "WirePath",
    "WireTable",
    "encode_varint",
    "gather_header",
    "gather_prefix",
    "reply_header",
    "wire_path",
]

# slots of um_wire_parse's result (csrc/wire.c's enum)
_REQUEST_ID, _TIMEOUT_US, _GATHER_LEN, _TABLE_OFF, _TABLE_LEN, _VERSION_OFF, _VERSION_LEN = range(7)
_U64 = (1 << 64) - 1


def encode_varint(v: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _field_head(tag: int, body: int) -> bytes:
    """A length-delimited field's tag and length (its body follows)."""
    return bytes((tag,)) + encode_varint(body)


def gather_header(gather_prefix: bytes, shape: tuple[int, ...]) -> tuple[bytes, int]:
    """The bytes of a ``GatherReply`` that come before its float32 pooled data, and the reply's
    whole serialized size: ``gather_prefix`` (its table id, version and shard index fields),
    then ``pooled`` {dtype FLOAT32, packed ``shape``, data}. The encoding the generated code
    writes: fields in number order, zero and empty fields left out."""
    nbytes = 4 * math.prod(shape)
    packed = b"".join(encode_varint(d) for d in shape)
    tensor = b"\x08" + encode_varint(pb.DTYPE_FLOAT32) + _field_head(0x12, len(packed)) + packed
    if nbytes:
        tensor += _field_head(0x1A, nbytes)
    head = gather_prefix + _field_head(0x22, len(tensor) + nbytes) + tensor
    return head, len(head) + nbytes


def reply_header(
    request_id: int, gather_prefix: bytes, shape: tuple[int, ...]
) -> tuple[bytes, int]:
    """:func:`gather_header` inside a ``StreamGatherReply`` (``request_id``, then ``gather``):
    the bytes before the pooled data, and the size of the ``GatherReply``."""
    gather, size = gather_header(gather_prefix, shape)
    head = b"\x08" + encode_varint(request_id) if request_id else b""
    return head + _field_head(0x12, size) + gather, size


def gather_prefix(table_id: str, version: str, shard_index: int) -> bytes:
    """A ``GatherReply``'s fields 1-3 as the generated code encodes them."""
    out = b""
    for tag, text in ((0x0A, table_id), (0x12, version)):
        if text:
            data = text.encode()
            out += _field_head(tag, len(data)) + data
    if shard_index:
        out += b"\x18" + encode_varint(shard_index)
    return out


class WireMessage:
    """A request in its wire bytes — a ``StreamGatherRequest`` (``streamed``) or a unary
    ``GatherRequest`` — with the fields ``csrc/wire.c`` located."""

    __slots__ = ("fields", "fields_addr", "raw", "streamed")

    def __init__(self, raw: bytes, fields: np.ndarray, streamed: bool) -> None:
        self.raw = raw
        self.fields = fields
        self.fields_addr = fields.__array_interface__["data"][0]
        self.streamed = streamed

    @property
    def request_id(self) -> int:
        return int(self.fields[_REQUEST_ID]) & _U64  # uint64 on the wire

    @property
    def timeout_us(self) -> int:
        return int(self.fields[_TIMEOUT_US]) & _U64

    @property
    def request_bytes(self) -> int:
        """Serialized size of the message's ``GatherRequest``."""
        return int(self.fields[_GATHER_LEN])

    def _text(self, off: int, length: int) -> bytes:
        f = self.fields
        start = int(f[off])
        return self.raw[start : start + int(f[length])]

    def table_id_bytes(self) -> bytes:
        return self._text(_TABLE_OFF, _TABLE_LEN)

    def version_bytes(self) -> bytes:
        return self._text(_VERSION_OFF, _VERSION_LEN)

    @property
    def table_id(self) -> str:
        """The requested table (what a scoped token is checked against; ASCII by the parse)."""
        return self.table_id_bytes().decode()

    def parse(self) -> pb.StreamGatherRequest | pb.GatherRequest:
        """The message as the generated code reads it (for the general path)."""
        kind = pb.StreamGatherRequest if self.streamed else pb.GatherRequest
        return kind.FromString(self.raw)


@dataclass(frozen=True)
class WireTable:
    """A natively pooled table as the fast path answers for it."""

    table_id: str
    plan: NativePlan
    rows: tuple[int, int]
    expansion: int
    merged_rows: int
    out_blocks: int  # E; 0 for a merged table (its reply is [T, cols])
    prefix: bytes


@dataclass(frozen=True)
class WireAnswer:
    """A message answered on the fast path."""

    reply: bytes
    table_id: str
    entries: int
    reply_bytes: int  # serialized size of the reply's GatherReply (for the metrics)


class WirePath:
    """The fast path over one shard's natively pooled tables."""

    def __init__(
        self,
        lib: NativeLib,
        shard: ShardSlice,
        plans: dict[str, NativePlan | None],
        limits: Limits,
    ) -> None:
        self._lib = lib
        self._version = shard.manifest.version.encode()
        self._limits = (limits.max_batch, limits.max_per_query)
        self._tables: dict[bytes, WireTable] = {}
        self.answered = 0
        """Messages answered on the fast path so far (a diagnostic)."""
        for tid, table in shard.tables.items():
            plan = plans.get(tid)
            if plan is None or not tid.isascii() or table.pre_array is not None:
                continue  # a GPU table, no plan, or UltraMemV2 pre-values: the general path
            e, slot = table.entry, table.slot
            self._tables[tid.encode()] = WireTable(
                table_id=tid,
                plan=plan,
                rows=(slot.row_lo, slot.row_hi),
                expansion=e.expansion,
                merged_rows=slot.row_hi - slot.row_lo if e.merged else 0,
                out_blocks=0 if e.merged else e.expansion,
                prefix=gather_prefix(tid, shard.manifest.version, shard.shard),
            )

    def read(self, raw: bytes, general: Callable[[bytes], Any], *, streamed: bool = True) -> Any:
        """A request deserializer (``streamed``: ``GatherStream``'s, else unary ``Gather``'s):
        a :class:`WireMessage` when the message is in the plain encoding, else ``general(raw)``
        (the generated code's parse)."""
        fields = np.empty(self._lib.wire_slots, dtype=np.int64)
        parse = self._lib.wire_parse if streamed else self._lib.wire_parse_gather
        if parse(raw, len(raw), fields.__array_interface__["data"][0]) == 0:
            return WireMessage(raw, fields, streamed)
        return general(raw)

    def table_for(self, msg: WireMessage) -> WireTable | None:
        """The table ``msg`` asks for, when the fast path may answer it (served version)."""
        t = self._tables.get(msg.table_id_bytes())
        return t if t is not None and msg.version_bytes() == self._version else None

    def answer(self, msg: WireMessage, t: WireTable, nthreads: int) -> WireAnswer | None:
        """Check and pool ``msg`` for its table ``t`` (:meth:`table_for`); ``None`` when the
        general path must take it."""
        tokens = self._lib.wire_tokens(msg.fields_addr)
        if not 0 <= tokens <= self._limits[0]:  # (checked again in C; never allocate past it)
            return None
        cols = t.plan.out_cols
        shape = (tokens, t.out_blocks, cols) if t.out_blocks else (tokens, cols)
        if msg.streamed:
            head, gather_bytes = reply_header(msg.request_id, t.prefix, shape)
        else:
            head, gather_bytes = gather_header(t.prefix, shape)
        out = np.empty(shape, dtype=np.float32)  # aligned for the kernel's stores
        entries = t.plan.run_wire(
            msg.raw,
            msg.fields_addr,
            t.rows,
            t.expansion,
            t.merged_rows,
            self._limits,
            out.__array_interface__["data"][0],
            nthreads,
        )
        if entries is None:
            return None
        reply = b"".join((head, out))  # the one copy of the pooled values
        self.answered += 1
        return WireAnswer(reply, t.table_id, entries, gather_bytes)


def wire_path(
    shard: ShardSlice, plans: dict[str, NativePlan | None], limits: Limits
) -> WirePath | None:
    """The fast path for ``shard``'s natively pooled tables (``None``: no native library)."""
    lib = native.library()
    return None if lib is None else WirePath(lib, shard, plans, limits)
