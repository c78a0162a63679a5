"""``ultramem-dist serve-router`` as a real process in front of real shard servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import grpc
import pytest
import torch
from conftest import CLI, REPO, free_port, make_table_spec, random_queries
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ultramem_dist._private.codec import decode_tensor, encode_tensor
from ultramem_dist.kernels import gather_pool
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables

pytestmark = pytest.mark.integration
SPEC = make_table_spec(n_rows=500, dv=16)


def start_router(targets: str, workdir, *extra: str) -> tuple[subprocess.Popen, dict]:
    ready = workdir / f"router-{time.monotonic_ns()}.json"
    log = open(workdir / "router.log", "ab")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [*CLI, "serve-router", "--targets", targets, "--ready-file", str(ready), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    deadline = time.monotonic() + 90
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError((workdir / "router.log").read_text()[-2000:])
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def test_router_process_serves_health_gather_and_metrics(tmp_path, in_process_shard):
    export_tables({"mem0": SPEC}, tmp_path / "store", shards=2, by="row", version="v7")
    shards = [in_process_shard(ServerConfig(store=tmp_path / "store", shard=k)) for k in (0, 1)]
    metrics_port = free_port()
    targets = ",".join(s.target for s in shards)
    proc, ready = start_router(targets, tmp_path, "--metrics-port", str(metrics_port))
    try:
        assert ready["version"] == "v7" and ready["num_shards"] == 2
        target = f"127.0.0.1:{ready['port']}"
        idx, blk, w = random_queries(SPEC, 6)
        req = pb.GatherRequest(table_id="mem0", table_version="v7")
        encode_tensor(idx, req.indices)
        encode_tensor(blk, req.blocks)
        encode_tensor(w, req.weights)
        with grpc.insecure_channel(target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="ultramem.v1.GatherPool"), timeout=10
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            reply = pb_grpc.GatherPoolStub(ch).Gather(req, timeout=10)
        pooled = decode_tensor(
            reply.pooled, name="pooled", dtypes=(torch.float32,), max_elements=10**6, ndims=(3,)
        )
        want = gather_pool(SPEC.values, idx, blk, w, SPEC.expansion)
        torch.testing.assert_close(pooled, want, atol=1e-6, rtol=1e-5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        text = text.read().decode()
        assert 'ultramem_gather_requests_total{code="OK",table="mem0"} 1.0' in text
        assert 'role="router"' in text and 'version="v7"' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
    assert code == 0, (tmp_path / "router.log").read_text()[-2000:]
