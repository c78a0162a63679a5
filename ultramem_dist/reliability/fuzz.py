"""Fuzzing the ``Gather`` request path: hostile request generators and the status contract.

The contract: every request — random bytes, a truncated or bit-flipped message, hostile
shapes/dtypes/indices, NaN/inf weights, huge ``m`` or batch, oversize messages — ends in one of
:data:`DEFINED_STATUSES`; ``UNKNOWN``/``INTERNAL`` (or anything else) is a bug, and so is a
server that stops answering. Sizes are validated from declared shapes before anything is
allocated, so a request claiming shape ``[2**40, 2**20]`` costs no memory.

Two drivers share the generators: :func:`evaluate_in_process` runs the servicer's own
decode -> validate -> kernel -> encode steps in this process (fast, thousands of cases), and
:func:`fuzz_endpoint` sends raw bytes through a generic gRPC method to a real server.
"""

from __future__ import annotations

import math
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from ultramem_dist._private.codec import encode_array, encode_tensor
from ultramem_dist._private.status import status_for
from ultramem_dist.errors import UltraMemError
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving.servicer import kernel_plan, run_kernel
from ultramem_dist.serving.validate import Limits, decode_request
from ultramem_dist.store.reader import ShardSlice

__all__ = [
    "DEFINED_STATUSES",
    "GATHER_METHOD",
    "FuzzCase",
    "FuzzStats",
    "case_stream",
    "evaluate_in_process",
    "fuzz_endpoint",
    "hostile_shape_request",
    "peak_rss_kib",
    "tcp_garbage",
    "valid_request",
]

GATHER_METHOD = "/ultramem.v1.GatherPool/Gather"
DEFINED_STATUSES = frozenset(
    {
        "OK",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "DEADLINE_EXCEEDED",
    }
)
_TENSORS = ("indices", "offsets", "blocks", "weights")
_SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45, 0.0, -0.0)
_SPECIAL_INTS = (-(2**63), 2**63 - 1, -(2**31), 2**31 - 1, -1, 0, 2**40)


@dataclass(frozen=True)
class FuzzCase:
    kind: str
    payload: bytes


@dataclass
class FuzzStats:
    """Outcome counts of a fuzz campaign."""

    cases: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    undefined: list[dict[str, Any]] = field(default_factory=list)
    """The first few cases that ended in a status outside the contract."""
    undefined_count: int = 0

    def record(self, case: FuzzCase, status: str, detail: str = "") -> None:
        self.cases += 1
        self.by_status[status] += 1
        self.by_kind.setdefault(case.kind, Counter())[status] += 1
        if status not in DEFINED_STATUSES:
            self.undefined_count += 1
            if len(self.undefined) < 20:
                self.undefined.append(
                    {"kind": case.kind, "status": status, "detail": detail[:300],
                     "payload_prefix": case.payload[:64].hex()}
                )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "undefined_status": self.undefined_count,
            "by_status": dict(sorted(self.by_status.items())),
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(self.by_kind.items())},
            "undefined_examples": self.undefined,
        }


# ----------------------------------------------------------------------------- requests


def valid_request(
    table_id: str,
    version: str,
    n_rows: int,
    expansion: int,
    num_cores: int,
    *,
    tokens: int = 3,
    per_token: int = 8,
    row_lo: int = 0,
    seed: int = 0,
) -> pb.GatherRequest:
    """A well-formed request for rows ``[row_lo, n_rows)``."""
    g = torch.Generator().manual_seed(seed)
    req = pb.GatherRequest(table_id=table_id, table_version=version)
    encode_tensor(torch.randint(row_lo, n_rows, (tokens, per_token), generator=g), req.indices)
    encode_tensor(torch.randint(0, expansion, (tokens, per_token), generator=g), req.blocks)
    encode_tensor(torch.randn(tokens, per_token, num_cores, generator=g), req.weights)
    return req


def hostile_shape_request(base: pb.GatherRequest, shape: Sequence[int]) -> pb.GatherRequest:
    """``base`` whose indices claim ``shape`` while carrying only their original bytes."""
    req = pb.GatherRequest()
    req.CopyFrom(base)
    req.indices.shape[:] = list(shape)
    return req


def _copy(req: pb.GatherRequest) -> pb.GatherRequest:
    out = pb.GatherRequest()
    out.CopyFrom(req)
    return out


def _mutate_message(
    rng: random.Random, base: pb.GatherRequest, limits: Limits
) -> tuple[str, pb.GatherRequest]:
    """One structured hostile mutation of a valid (int64 ids) request: (name, request)."""
    req = _copy(base)
    name = rng.choice(_TENSORS)
    t = getattr(req, name)
    op = rng.randrange(16)
    if op == 0:
        t.shape[:] = [rng.choice([2**40, 2**31, 2**20, 2**63 - 1]), rng.choice([2**20, 2**33, 1])]
        return f"{name}:huge-shape", req
    if op == 1:
        t.shape[:] = [rng.randint(-(2**63), -1) if rng.random() < 0.5 else -1, 3]
        return f"{name}:negative-dim", req
    if op == 2:
        t.shape[:] = [rng.randint(0, 3) for _ in range(rng.randint(0, 12))]
        return f"{name}:rank", req
    if op == 3:
        t.dtype = rng.choice([-1, 0, 6, 7, 99, 2**31 - 1, pb.DTYPE_FLOAT16, pb.DTYPE_INT64])
        return f"{name}:dtype", req
    if op == 4:
        data = bytes(t.data)
        cut = rng.randint(0, max(0, len(data)))
        t.data = data[:cut] if rng.random() < 0.5 else data + bytes(rng.randint(1, 64))
        return f"{name}:data-length", req
    if op == 5:
        req.ClearField(name)
        return f"{name}:missing", req
    if op == 6:  # special values written over the tensor's bytes, keeping its dtype/shape
        tensor = torch.frombuffer(bytearray(base.weights.data), dtype=torch.float32).clone()
        if tensor.numel():
            for _ in range(rng.randint(1, 4)):
                tensor[rng.randrange(tensor.numel())] = rng.choice(_SPECIAL_FLOATS)
        req.weights.data = tensor.numpy().tobytes()
        return "weights:special-floats", req
    if op == 7:
        ids = torch.frombuffer(bytearray(base.indices.data), dtype=torch.int64).clone()
        if ids.numel():
            ids[rng.randrange(ids.numel())] = rng.choice(_SPECIAL_INTS)
        req.indices.data = ids.numpy().tobytes()
        return "indices:extreme-ids", req
    if op == 8:
        blk = torch.frombuffer(bytearray(base.blocks.data), dtype=torch.int64).clone()
        if blk.numel():
            blk[rng.randrange(blk.numel())] = rng.choice(_SPECIAL_INTS)
        req.blocks.data = blk.numpy().tobytes()
        return "blocks:extreme-ids", req
    if op == 9:  # ragged with hostile offsets
        nnz = math.prod(base.indices.shape)
        flat = _copy(base)
        for f in ("indices", "blocks"):
            getattr(flat, f).shape[:] = [nnz]
        flat.weights.shape[:] = [nnz, base.weights.shape[-1]]
        offs = rng.choice(
            [[0, nnz], [0, nnz + 1], [1, nnz], [0, nnz, 2], [0, -5, nnz], [0, 2**62, nnz],
             [0], [], [0] * (limits.max_batch + 2), list(range(0, nnz + 1))]
        )  # fmt: skip
        encode_tensor(torch.tensor(offs, dtype=torch.int64), flat.offsets)
        return "offsets:hostile", flat
    if op == 10:
        req.table_id = rng.choice(["", "x" * 100_000, "../../etc/passwd", "mem\x00", "é" * 50])
        return "table_id:hostile", req
    if op == 11:
        req.table_version = rng.choice(["", "v" * 100_000, "other", "v1\x00", "v1 "])
        return "version:hostile", req
    if op == 12:  # consistent but above the limits: huge m or batch
        per = limits.max_per_query + 1 if rng.random() < 0.5 else 2
        toks = 1 if per > 2 else limits.max_batch + 1
        ids = torch.zeros(toks, per, dtype=torch.int64)
        encode_tensor(ids, req.indices)
        encode_tensor(ids, req.blocks)
        encode_tensor(torch.zeros(toks, per, base.weights.shape[-1]), req.weights)
        return "limits:huge-m-or-batch", req
    if op == 13:  # empty batch / empty per-token lists
        shape = rng.choice([[0, 8], [3, 0], [0, 0]])
        ids = torch.zeros(shape, dtype=torch.int64)
        encode_tensor(ids, req.indices)
        encode_tensor(ids, req.blocks)
        encode_tensor(torch.zeros(*shape, base.weights.shape[-1]), req.weights)
        return "empty", req
    if op == 14:  # dtype of indices switched to int32 with consistent bytes (valid if in range)
        for f in ("indices", "blocks"):
            ten = torch.frombuffer(bytearray(getattr(base, f).data), dtype=torch.int64)
            encode_tensor(ten.to(torch.int32).view(list(getattr(base, f).shape)), getattr(req, f))
        return "int32-ids", req
    # unknown fields, or the same message twice (protobuf merges: repeated shapes concatenate)
    return "unknown-fields", req


def case_stream(
    base: pb.GatherRequest,
    limits: Limits,
    *,
    seed: int = 0,
    oversize_bytes: int | None = None,
    oversize_every: int = 400,
) -> Iterator[FuzzCase]:
    """Endless seeded stream of hostile cases derived from the valid request ``base``.

    With ``oversize_bytes`` (the server's message limit) one case in ``oversize_every`` is a
    message just above it (gRPC must answer RESOURCE_EXHAUSTED).
    """
    rng = random.Random(seed)
    good = base.SerializeToString()
    n = 0
    while True:
        n += 1
        family = n % 8
        if family == 0:
            yield FuzzCase("random-bytes", rng.randbytes(rng.choice([0, 1, 7, 64, 1024, 4096])))
        elif family == 1:
            data = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            yield FuzzCase("bit-flips", bytes(data))
        elif family == 2:
            yield FuzzCase("truncated", good[: rng.randrange(len(good))])
        elif family == 3:
            a = rng.randrange(len(good))
            b = rng.randrange(len(good))
            yield FuzzCase("spliced", good[:a] + rng.randbytes(rng.randint(0, 32)) + good[b:])
        elif family == 4:
            yield FuzzCase("duplicated", good + good[: rng.randrange(len(good) + 1)])
        elif family == 5 and oversize_bytes and n % oversize_every == 5:
            huge = _copy(base)
            huge.weights.data = bytes(oversize_bytes + 1024)
            yield FuzzCase("oversize", huge.SerializeToString())
        else:
            kind, req = _mutate_message(rng, base, limits)
            payload = req.SerializeToString()
            if kind == "unknown-fields":
                payload += bytes([0xF8, 0x07]) + rng.randbytes(2)  # field 127 varint
            yield FuzzCase(kind, payload)


# ----------------------------------------------------------------------------- drivers


def evaluate_in_process(shard: ShardSlice, limits: Limits, payload: bytes) -> tuple[str, str]:
    """(status name, detail) the server's Gather path gives ``payload`` (no gRPC involved).

    Mirrors the servicer: parse (undecodable -> INVALID_ARGUMENT), validate, run the kernel,
    encode the reply. Any exception that is not a typed ultramem error is ``INTERNAL``.
    """
    try:
        req = pb.GatherRequest.FromString(payload)
    except DecodeError as exc:
        return "INVALID_ARGUMENT", f"undecodable: {exc}"
    try:
        q = decode_request(req, shard, limits)
        pooled = run_kernel(q, kernel_plan(q.table))
        reply = pb.GatherReply(table_id=req.table_id, table_version=shard.manifest.version)
        encode_array(pooled, reply.pooled)
    except UltraMemError as exc:
        return status_for(exc).name, str(exc)
    except Exception as exc:  # a bug: the server would answer INTERNAL
        return "INTERNAL", f"{type(exc).__name__}: {exc}"
    want_cols = q.table.out_cols
    want = [q.num_tokens, want_cols] if q.table.entry.merged else [
        q.num_tokens, q.table.entry.expansion, want_cols
    ]  # fmt: skip
    if list(reply.pooled.shape) != want:
        return "INTERNAL", f"reply shape {list(reply.pooled.shape)}, expected {want}"
    return "OK", ""


def fuzz_endpoint(
    target: str,
    cases: Iterator[FuzzCase],
    n: int,
    *,
    timeout_s: float = 5.0,
    metadata: Sequence[tuple[str, str]] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    time_budget_s: float | None = None,
    on_case: Callable[[FuzzCase, str], None] | None = None,
) -> FuzzStats:
    """Send ``n`` raw payloads to ``target``'s Gather method; count the statuses."""
    stats = FuzzStats()
    opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 1 << 30),
            ("grpc.enable_retries", 0)]  # fmt: skip
    channel = (
        grpc.secure_channel(target, credentials, options=opts)
        if credentials is not None
        else grpc.insecure_channel(target, options=opts)
    )
    stop_at = None if time_budget_s is None else time.monotonic() + time_budget_s
    with channel:
        call = channel.unary_unary(GATHER_METHOD, request_serializer=None,
                                   response_deserializer=None)  # fmt: skip
        for _ in range(n):
            if stop_at is not None and time.monotonic() > stop_at:
                break
            case = next(cases)
            try:
                call(case.payload, timeout=timeout_s, metadata=metadata)
                status, detail = "OK", ""
            except grpc.RpcError as exc:
                status, detail = exc.code().name, exc.details() or ""
            stats.record(case, status, detail)
            if on_case is not None:
                on_case(case, status)
    return stats


def tcp_garbage(host: str, port: int, *, seed: int = 0, connections: int = 20) -> int:
    """Open raw TCP connections and send non-gRPC bytes (random data, a cut HTTP/2 preface,
    a huge frame header) then hang up; returns how many connections were made."""
    rng = random.Random(seed)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    payloads = [
        lambda: rng.randbytes(rng.randint(1, 2048)),
        lambda: preface[: rng.randrange(len(preface))],
        lambda: preface + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + rng.randbytes(64),
        lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        lambda: b"",
    ]
    made = 0
    for i in range(connections):
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                made += 1
                s.sendall(payloads[i % len(payloads)]())
                s.settimeout(0.05)
                try:
                    s.recv(1024)
                except OSError:
                    pass
        except OSError:
            continue
    return made


def peak_rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a Linux process in KiB (peak resident set since start)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]
