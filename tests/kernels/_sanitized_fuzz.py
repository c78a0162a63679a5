"""Run under AddressSanitizer + UBSan by test_sanitized.py: corrupted GatherStream messages and
unary Gather requests through the shard's native fast path (wire.c -> entries.c ->
gather_pool.c) and random batches through the client's native split. Any out-of-bounds access
or undefined behaviour aborts."""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared table spec
from conftest import make_table_spec  # noqa: E402

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.client.router import split_arrays, split_for_wire
from ultramem_dist.kernels import native
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving.servicer import GatherPoolServicer
from ultramem_dist.serving.validate import Limits
from ultramem_dist.serving.wire import WireMessage
from ultramem_dist.store import export_tables
from ultramem_dist.store.reader import load_shard


def corrupt(rng: random.Random, raw: bytearray) -> bytes:
    for _ in range(rng.randint(0, 3)):
        at = rng.randint(0, len(raw))
        kind = rng.random()
        if kind < 0.5 and at < len(raw):
            raw[at] = rng.randint(0, 255)
        elif kind < 0.75:
            del raw[at:]
        else:
            raw[at:at] = bytes([rng.randint(0, 255)])
    return bytes(raw)


def v2_rounds(rng: random.Random, tmp: Path, rounds: int) -> int:
    """Corrupted UltraMemV2 unary requests (pre_input included) through the general decode path
    into the one-pass native pre-value kernel, row and dim shards (pre-values whole on dim)."""
    from dataclasses import replace

    from google.protobuf.message import DecodeError

    from ultramem_dist.errors import UltraMemError
    from ultramem_dist.serving.servicer import kernel_plan, run_kernel
    from ultramem_dist.serving.validate import decode_request

    spec = make_table_spec(n_rows=90, dv=12, expansion=1, num_cores=2)
    spec = replace(spec, pre_values=torch.randn(90, 5))
    answered = 0
    for by in ("row", "dim"):
        store = tmp / f"v2{by}"
        export_tables({"shared": spec}, store, shards=2, by=by, version="v1", dtype="bfloat16")
        shard = load_shard(store, 1, "v1")
        plan = kernel_plan(shard.tables["shared"])
        assert plan is not None and plan.pre is not None
        lo = 45 if by == "row" else 0
        for _ in range(rounds):
            T, L = rng.randint(0, 6), rng.randint(0, 7)
            r = pb.GatherRequest(table_id="shared", table_version="v1")
            encode_tensor(torch.randint(lo, 90, (T, L)), r.indices)
            encode_tensor(torch.zeros(T, L, dtype=torch.int64), r.blocks)
            encode_tensor(torch.randn(T, L, 2), r.weights)
            encode_tensor(torch.randn(T, rng.choice([5, 5, 5, 4])), r.pre_input)
            try:
                req = pb.GatherRequest.FromString(corrupt(rng, bytearray(r.SerializeToString())))
                q = decode_request(req, shard, Limits(6, 7))
            except (DecodeError, UltraMemError):  # refused bad bytes: the point of the fuzz
                continue
            run_kernel(q, plan)
            answered += 1
    assert answered > 0, "no V2 request got through to the kernel"
    return answered


def main(rounds: int) -> None:
    lib = native.library()
    assert lib is not None and "sanitized" in str(lib.path), lib and lib.path
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_table_spec(n_rows=90, dv=12, expansion=3, num_cores=2)
        answered = 0
        for by, merged in (("row", False), ("dim", False), ("row", True)):
            store = Path(tmp) / f"{by}{merged}"
            export_tables({"mem0": spec}, store, shards=2, by=by, merged=merged, version="v1")
            sv = GatherPoolServicer(
                load_shard(store, 1, "v1"), Limits(6, 7), max_message_bytes=1 << 20
            )
            lo = 45 if by == "row" else 0
            for _ in range(rounds):
                T, L = rng.randint(0, 6), rng.randint(0, 7)
                m = pb.StreamGatherRequest(request_id=rng.randint(0, 2**64 - 1), timeout_us=10**7)
                r = m.gather
                r.table_id, r.table_version = "mem0", "v1"
                dtype = rng.choice([torch.int32, torch.int64])
                if rng.random() < 0.3:  # ragged
                    n = rng.randint(0, 12)
                    cuts = sorted(rng.randint(0, n) for _ in range(T))
                    encode_tensor(torch.tensor([0, *cuts, n])[: T + 1].clamp(max=n), r.offsets)
                    encode_tensor(torch.randint(lo, 90, (n,), dtype=dtype), r.indices)
                    encode_tensor(torch.randint(0, 3, (n,)), r.blocks)
                    encode_tensor(torch.randn(n, 2), r.weights)
                else:
                    encode_tensor(torch.randint(lo, 90, (T, L), dtype=dtype), r.indices)
                    encode_tensor(torch.randint(0, 3, (T, L)), r.blocks)
                    encode_tensor(torch.randn(T, L, 2), r.weights)
                streamed = rng.random() < 0.5  # a GatherStream message, or a unary request
                read = sv.read_stream_message if streamed else sv.read_gather_message
                plain = (m if streamed else m.gather).SerializeToString()
                msg = read(corrupt(rng, bytearray(plain)))
                table = sv._wire.table_for(msg) if type(msg) is WireMessage else None
                if table is not None and sv._wire.answer(msg, table, 2) is not None:
                    answered += 1
            sv.close()
        answered += v2_rounds(rng, Path(tmp), rounds)
        for _ in range(rounds):
            n = rng.randint(0, 40)
            ids = np.array([rng.randint(-5, 2**33) for _ in range(n)], dtype=np.int64)
            blk = np.array([rng.randint(-2, 5) for _ in range(n)], dtype=np.int64)
            w = np.ones((n, 2), dtype=np.float32)
            offs = np.array([0, *sorted(rng.randint(0, n) for _ in range(3)), n], dtype=np.int64)
            los = [0, *sorted(rng.sample(range(1, 2**32), rng.randint(0, 4)))]
            got, want = split_for_wire(ids, blk, w, offs, los), split_arrays(ids, blk, w, offs, los)
            assert [g is None for g in got] == [e is None for e in want]
    print(f"ok: {answered} fast-path answers")


if __name__ == "__main__":
    main(int(sys.argv[1]))
