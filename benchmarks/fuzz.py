"""Fuzz campaign against the Gather request path: in process and against a real server process.

Usage::

    python benchmarks/fuzz.py            # 20k in-process cases + 5k raw-byte calls
    python benchmarks/fuzz.py --quick    # 2k + 500 (smoke run, temp output)

Writes ``benchmarks/results/fuzz.json``: ``cases`` (all of them), ``server_crashes`` (times the
server process died or stopped answering health), ``undefined_status`` (cases that ended in a
status outside :data:`ultramem_dist.reliability.fuzz.DEFINED_STATUSES`), per-family status
counts, and the server's peak RSS before/after 400 requests claiming shapes like [2**40, 2**20].
Cases come from seeded mutations of valid requests of every table layout (row/dim x plain/
merged): random bytes, bit flips, truncation, splicing, duplication, huge/negative/high-rank
shapes, bad dtypes, data-length mismatches, missing tensors, NaN/inf/extreme weights, extreme
ids and blocks, hostile CSR offsets, hostile table ids/versions, above-limit m and batch, empty
batches, unknown fields, oversize messages; plus raw TCP garbage on the port.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from ultramem_dist.reliability.fuzz import (  # noqa: E402
    DEFINED_STATUSES,
    GATHER_METHOD,
    FuzzStats,
    case_stream,
    evaluate_in_process,
    fuzz_endpoint,
    hostile_shape_request,
    peak_rss_kib,
    tcp_garbage,
    valid_request,
)
from ultramem_dist.reliability.procs import ShardFleet  # noqa: E402
from ultramem_dist.reliability.synthetic import make_synthetic_store  # noqa: E402
from ultramem_dist.serving.validate import Limits  # noqa: E402
from ultramem_dist.store import load_shard, open_manifest  # noqa: E402

LIMITS = Limits(max_batch=64, max_per_query=64)
MAX_MSG = 1 << 20
KW = {"n_rows": 1000, "dv": 32, "d_model": 24, "topm": 4}




def _bases(store: Path, shard: int) -> list:
    """A valid request per table for ``shard`` (its owned rows for row tables)."""
    _, manifest = open_manifest(store)
    out = []
    for t in manifest.tables:
        slot = t.shards[shard]
        lo, hi = (slot.row_lo, slot.row_hi) if t.sharding == "row" else (0, t.n_rows)
        out.append(valid_request(t.table_id, manifest.version, hi, t.expansion, t.num_cores,
                                 row_lo=lo, seed=len(out)))  # fmt: skip
    return out


def healthy(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=10)  # fmt: skip
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2k + 500 cases, temp output")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_local, n_remote = (2000, 500) if args.quick else (20000, 5000)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ultramem-fuzz-") as tmp:
        store = make_synthetic_store(Path(tmp) / "store", shards=2, seed=args.seed, **KW)
        # -------- in process: the servicer's decode/validate/kernel/encode steps
        shard = load_shard(store, 1)
        local = FuzzStats()
        bases = _bases(store, 1)
        per = n_local // len(bases)
        for i, base in enumerate(bases):
            stream = case_stream(base, LIMITS, seed=args.seed * 100 + i)
            for _ in range(per):
                case = next(stream)
                status, detail = evaluate_in_process(shard, LIMITS, case.payload)
                local.record(case, status, detail)
        # -------- a real serve-shard process, raw bytes over a generic method
        limits = ["--max-batch", str(LIMITS.max_batch), "--max-per-query",
                  str(LIMITS.max_per_query), "--max-message-bytes", str(MAX_MSG)]  # fmt: skip
        remote = FuzzStats()
        crashes = 0
        with ShardFleet(store, Path(tmp) / "run", shards=[1], extra_args=limits) as fleet:
            rep = fleet.replicas[0]
            per = n_remote // len(bases)
            for i, base in enumerate(bases):
                stream = case_stream(base, LIMITS, seed=args.seed * 100 + 50 + i,
                                     oversize_bytes=MAX_MSG, oversize_every=100)  # fmt: skip
                done = 0
                while done < per:
                    chunk = min(100, per - done)
                    part = fuzz_endpoint(rep.target, stream, chunk, timeout_s=10)
                    for st, n in part.by_status.items():
                        remote.by_status[st] += n
                    for kind, counter in part.by_kind.items():
                        remote.by_kind.setdefault(kind, type(counter)()).update(counter)
                    remote.cases += part.cases
                    remote.undefined_count += part.undefined_count
                    remote.undefined.extend(part.undefined[: 20 - len(remote.undefined)])
                    done += chunk
                    if not rep.alive or not healthy(rep.target):
                        crashes += 1
                        fleet.signal(rep)
                        fleet.wait_exit(rep)
                        fleet.restart(rep)
            garbage = tcp_garbage("127.0.0.1", rep.port, seed=args.seed, connections=100)
            if not rep.alive or not healthy(rep.target):
                crashes += 1
            # -------- memory: requests claiming huge shapes
            hostile = [
                hostile_shape_request(bases[0], s).SerializeToString()
                for s in ([2**40, 2**20], [2**20, 2**40], [2**62, 2], [2**31, 2**31])
            ]
            with grpc.insecure_channel(rep.target) as ch:
                call = ch.unary_unary(GATHER_METHOD)
                for _ in range(50):
                    call(bases[0].SerializeToString(), timeout=10)
                rss0, hwm0 = peak_rss_kib(rep.pid)
                refused = 0
                for _ in range(100):
                    for p in hostile:
                        try:
                            call(p, timeout=10)
                        except grpc.RpcError as exc:
                            refused += exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                rss1, hwm1 = peak_rss_kib(rep.pid)
            alive_at_end = rep.alive and healthy(rep.target)
    payload = {
        "cases": local.cases + remote.cases,
        "server_crashes": crashes + (0 if alive_at_end else 1),
        "undefined_status": local.undefined_count + remote.undefined_count,
        "in_process": local.to_json(),
        "server_process": {**remote.to_json(), "tcp_garbage_connections": garbage},
        "huge_shape_memory": {
            "requests": 400,
            "refused_invalid_argument": refused,
            "rss_kib_before": rss0,
            "rss_kib_after": rss1,
            "peak_rss_kib_before": hwm0,
            "peak_rss_kib_after": hwm1,
            "peak_growth_kib": hwm1 - hwm0,
        },
        "defined_statuses": sorted(DEFINED_STATUSES),
        "elapsed_s": round(time.monotonic() - t0, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "quick": args.quick,
    }
    out = save(payload, "fuzz.json", args.out, args.quick)
    summary = {k: payload[k] for k in ("cases", "server_crashes", "undefined_status")}
    print(json.dumps({**summary, "huge_shape_memory": payload["huge_shape_memory"]}, indent=2))
    print(f"wrote {out / 'fuzz.json'}")
    sys.exit(0 if summary["server_crashes"] == 0 and summary["undefined_status"] == 0 else 1)


if __name__ == "__main__":
    main()
