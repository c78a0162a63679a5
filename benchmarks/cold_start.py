"""Idle cold start of `serve-shard`: wall clock from spawning the process to its first answered
Gather, per `--verify` mode, on a ~1 GB single-shard synthetic store (median of N runs).

    python benchmarks/cold_start.py [--runs 5] [--out benchmarks/results/cold_start.json]

The first `cached` run after the export hashes the file and writes the record; the timed
`cached` runs then find it. Also records `python -X importtime` of the shard's server module
(cumulative seconds of the largest imports) and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.reliability.synthetic import make_synthetic_store

ROWS, DV = 1_000_000, 256  # 1 GiB of fp32 values


def _request() -> pb.GatherRequest:
    g = torch.Generator().manual_seed(0)
    req = pb.GatherRequest(table_id="row", table_version="v1")
    encode_tensor(torch.randint(0, ROWS, (8, 4), generator=g), req.indices)
    encode_tensor(torch.randint(0, 4, (8, 4), generator=g), req.blocks)
    encode_tensor(torch.randn(8, 4, 2, generator=g), req.weights)
    return req


def cold_start(store: Path, verify: str, env: dict[str, str], work: Path) -> float:
    ready = work / f"ready-{time.monotonic_ns()}.json"
    req = _request()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ultramem_dist.cli import main; main()", "serve-shard",
         str(store), "--shard", "0", "--verify", verify, "--ready-file", str(ready)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"serve-shard exited {proc.returncode}")
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("serve-shard did not become ready in 120 s")
            time.sleep(0.005)
        port = json.loads(ready.read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            pb_grpc.GatherPoolStub(ch).Gather(req, timeout=30, wait_for_ready=True)
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)


# what `serve-shard` imports: the CLI with its command modules, then the server module
SERVE_PATH = (
    "import sys; from ultramem_dist.cli import load_commands; load_commands(); "
    "import ultramem_dist.serving.app; print('torch' in sys.modules)"
)


def import_profile(env: dict[str, str]) -> dict[str, float | bool | dict[str, float]]:
    """``-X importtime`` of the serve path: cumulative seconds of the main packages, the ten
    slowest top-level imports, and whether torch was imported at all."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", SERVE_PATH],
                         env=env, capture_output=True, text=True, check=True)  # fmt: skip
    out: dict[str, float | bool | dict[str, float]] = {}
    top: dict[str, float] = {}
    for line in res.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            raw = parts[2]
            name = raw.strip()
            seconds = int(parts[1]) / 1e6
            if name in ("torch", "numpy", "grpc", "safetensors", "ultramem_dist.serving.app",
                        "ultramem_dist.cli", "typer", "rich", "prometheus_client"):  # fmt: skip
                out[name] = max(float(out.get(name, 0.0)), seconds)  # type: ignore[arg-type]
            if raw.startswith(" ") and not raw.startswith("  "):  # imported by the command
                top[name] = max(top.get(name, 0.0), seconds)
    out["slowest_top_level"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:10])
    out["torch_imported"] = res.stdout.strip() == "True"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cold_start.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ultramem-cold-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, ULTRAMEM_VERIFY_CACHE=str(work / "verify-cache"))
        store = make_synthetic_store(work / "store", shards=1, tables={"row": ("row", False)},
                                     n_rows=ROWS, dv=DV, d_model=8, topm=2)  # fmt: skip
        load_before = open("/proc/loadavg").read().split()[:3]
        cold_start(store, "cached", env, work)  # writes the verification record
        results = {m: [cold_start(store, m, env, work) for _ in range(args.runs)]
                   for m in ("always", "cached")}  # fmt: skip
        out = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs, shared; load average before/after "
            f"{' '.join(load_before)} / {' '.join(open('/proc/loadavg').read().split()[:3])}",
            "store_bytes": sum(p.stat().st_size for p in store.rglob("*") if p.is_file()),
            "cold_start_s": {m: {"median": statistics.median(v), "runs": v}
                             for m, v in results.items()},  # fmt: skip
            "import_s": import_profile(env),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
