"""The optional Prometheus endpoint counts Gather calls by status code."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from conftest import InProcessShard, free_port, make_table_spec
from test_bad_requests import request

from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables


def test_metrics_endpoint_counts_requests_by_code(tmp_path):
    export_tables({"row": make_table_spec()}, tmp_path, shards=2, by="row", version="v1")
    port = free_port()
    shard = InProcessShard(ServerConfig(store=tmp_path, shard=1, metrics_port=port))
    try:
        with grpc.insecure_channel(shard.target) as ch:
            stub = pb_grpc.GatherPoolStub(ch)
            stub.Gather(request(), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Gather(request(version="v0"), timeout=10)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        text = text.decode()
        assert 'ultramem_gather_requests_total{code="OK",table="row"} 1.0' in text
        assert 'code="FAILED_PRECONDITION",table="row"} 1.0' in text
        assert 'ultramem_gather_entries_total{table="row"} 24.0' in text
    finally:
        shard.stop()
