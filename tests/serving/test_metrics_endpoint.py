"""Prometheus ``/metrics`` of a real shard server, scraped over HTTP before and after traffic:
every counter moves by exactly what the good and the refused calls account for."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
import torch
from conftest import InProcessShard, free_port, make_table_spec
from prometheus_client.parser import text_string_to_metric_families

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables

N, E, HC = 600, 4, 2


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap: dict, name: str, **labels: str) -> float:
    return snap.get((name, tuple(sorted(labels.items()))), 0.0)


def gather_request(table: str, version: str, lo: int, hi: int, T: int, L: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    req = pb.GatherRequest(table_id=table, table_version=version)
    encode_tensor(torch.randint(lo, hi, (T, L), generator=g, dtype=torch.int32), req.indices)
    encode_tensor(torch.randint(0, E, (T, L), generator=g, dtype=torch.int32), req.blocks)
    encode_tensor(torch.randn(T, L, HC, generator=g), req.weights)
    return req


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics-store")
    spec = make_table_spec(n_rows=N)
    export_tables(
        {"row": spec, "dim": spec}, root, shards=2, by={"row": "row", "dim": "dim"}, version="v1"
    )
    port = free_port()
    server = InProcessShard(ServerConfig(store=root, shard=0, metrics_port=port))
    yield server, port
    server.stop()


def test_counters_move_by_exactly_the_traffic(shard):
    server, port = shard
    good = [
        gather_request("row", "v1", 0, N // 2, 3, 8, seed=1),  # shard 0 owns rows [0, 300)
        gather_request("dim", "v1", 0, N, 5, 16, seed=2),
        gather_request("dim", "v1", 0, N, 1, 4, seed=3),
    ]
    bad = {
        "FAILED_PRECONDITION": gather_request("row", "v0", 0, N // 2, 2, 8, seed=4),
        "NOT_FOUND": gather_request("nope", "v1", 0, N // 2, 2, 8, seed=5),
        "INVALID_ARGUMENT": gather_request("row", "v1", N // 2, N, 2, 8, seed=6),  # not owned
    }
    before = scrape(port)
    sent = 0
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GatherPoolStub(ch)
        for req in good:
            sent += stub.Gather(req, timeout=10).ByteSize()
        for code, req in bad.items():
            with pytest.raises(grpc.RpcError) as err:
                stub.Gather(req, timeout=10)
            assert err.value.code().name == code
        info = stub.Info(pb.InfoRequest(), timeout=10)
        stub.Info(pb.InfoRequest(), timeout=10)
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # rows gathered and per-table request counters (pre-existing metrics keep their names)
    assert delta("ultramem_gather_entries_total", table="row") == 3 * 8
    assert delta("ultramem_gather_entries_total", table="dim") == 5 * 16 + 1 * 4
    assert delta("ultramem_gather_requests_total", table="row", code="OK") == 1
    assert delta("ultramem_gather_requests_total", table="dim", code="OK") == 2
    assert delta("ultramem_gather_requests_total", table="?", code="NOT_FOUND") == 1
    # latency histogram by method and status code
    assert delta("ultramem_request_seconds_count", method="Gather", code="OK") == 3
    assert delta("ultramem_request_seconds_bucket", method="Gather", code="OK", le="+Inf") == 3
    assert delta("ultramem_request_seconds_sum", method="Gather", code="OK") > 0
    assert delta("ultramem_request_seconds_count", method="Info", code="OK") == 2
    for code in bad:
        assert delta("ultramem_request_seconds_count", method="Gather", code=code) == 1
        assert delta("ultramem_request_errors_total", method="Gather", code=code) == 1
    assert delta("ultramem_request_errors_total", method="Gather", code="OK") == 0
    errors = sum(v for (n, _), v in after.items() if n == "ultramem_request_errors_total")
    assert errors - sum(
        v for (n, _), v in before.items() if n == "ultramem_request_errors_total"
    ) == len(bad)
    # message bytes in and out, exactly the serialized sizes
    received = sum(r.ByteSize() for r in [*good, *bad.values()])
    assert delta("ultramem_received_bytes_total", method="Gather") == received
    assert delta("ultramem_sent_bytes_total", method="Gather") == sent
    assert delta("ultramem_received_bytes_total", method="Info") == 0  # an empty message
    assert delta("ultramem_sent_bytes_total", method="Info") == 2 * info.ByteSize()
    # nothing left in flight; the served version is published
    assert value(after, "ultramem_inflight_requests", method="Gather") == 0
    assert value(after, "ultramem_inflight_requests", method="Info") == 0
    versions = [lbl for (n, lbl), v in after.items() if n == "ultramem_table_version_info"]
    assert len(versions) == 1
    labels = dict(versions[0])
    assert labels["version"] == "v1" and labels["shard"] == "0" and labels["num_shards"] == "2"
    assert labels["role"] == "shard"
    assert value(after, "ultramem_table_version_info", **labels) == 1


def test_metrics_property_reads_what_the_endpoint_serves(shard):
    server, port = shard
    with grpc.insecure_channel(server.target) as ch:
        pb_grpc.GatherPoolStub(ch).Gather(gather_request("dim", "v1", 0, N, 2, 4, 7), timeout=10)
    metrics = server.server.servicer.metrics
    snap = metrics.snapshot("Gather")
    scraped = scrape(port)
    ok = value(scraped, "ultramem_request_seconds_count", method="Gather", code="OK")
    assert snap["latency_count"] == ok
    total = sum(
        v
        for (n, lbl), v in scraped.items()
        if n == "ultramem_request_seconds_count" and dict(lbl)["method"] == "Gather"
    )
    assert snap["requests"] == total and snap["errors"] == total - ok
    assert snap["latency_buckets"][-1] == [float("inf"), ok]
