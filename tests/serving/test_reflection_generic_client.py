"""Server reflection: a generic client with no compiled stubs lists the services, describes
``Gather`` and calls it from JSON — what ``grpcurl -plaintext HOST:PORT list|describe|...`` does —
against a real shard server and a real router."""

from __future__ import annotations

import base64
import json

import grpc
import pytest
import torch
from conftest import REPO, make_table_spec, random_queries, shard_and_router
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from ultramem_dist.kernels import gather_pool
from ultramem_dist.store import export_tables

SPEC = make_table_spec(n_rows=200, dv=16)
SERVICE = "ultramem.v1.GatherPool"


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory, in_process_shard):
    """``{"shard": target, "router": target}``: shard 0 of a 1-shard store, and a router."""
    root = tmp_path_factory.mktemp("reflect")
    export_tables({"mem0": SPEC}, root, shards=1, by="dim", version="v1")
    yield from shard_and_router(root, in_process_shard)


def json_tensor(t: torch.Tensor, dtype: str) -> dict:
    """A ``Tensor`` message as JSON (bytes are base64, int64 shapes are strings in proto3 JSON)."""
    return {
        "dtype": dtype,
        "shape": [str(d) for d in t.shape],
        "data": base64.b64encode(t.contiguous().numpy().tobytes()).decode(),
    }


@pytest.mark.parametrize("kind", ["shard", "router"])
def test_list_describe_and_call_through_reflection_only(endpoints, kind):
    with grpc.insecure_channel(endpoints[kind]) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        # grpcurl -plaintext HOST:PORT list
        services = set(db.get_services())
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= (
            services
        )
        # grpcurl -plaintext HOST:PORT describe ultramem.v1.GatherPool.Gather
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName(SERVICE)
        assert sorted(m.name for m in service.methods) == ["Gather", "GatherStream", "Info"]
        gather = service.methods_by_name["Gather"]
        assert gather.input_type.full_name == "ultramem.v1.GatherRequest"
        assert gather.output_type.full_name == "ultramem.v1.GatherReply"
        fields = {f.name: f.number for f in gather.input_type.fields}
        assert fields == {
            "table_id": 1,
            "table_version": 2,
            "indices": 3,
            "offsets": 4,
            "blocks": 5,
            "weights": 6,
            "pre_input": 7,
        }
        tensor = pool.FindMessageTypeByName("ultramem.v1.Tensor")
        assert [f.name for f in tensor.fields] == ["dtype", "shape", "data"]

        # grpcurl -plaintext HOST:PORT ultramem.v1.GatherPool/Info
        def call(method: str, payload: dict) -> dict:
            desc = service.methods_by_name[method]
            request_cls = message_factory.GetMessageClass(desc.input_type)
            reply_cls = message_factory.GetMessageClass(desc.output_type)
            rpc = channel.unary_unary(
                f"/{SERVICE}/{method}",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=reply_cls.FromString,
            )
            request = json_format.Parse(json.dumps(payload), request_cls())
            reply = rpc(request, timeout=10)
            return json_format.MessageToDict(reply, preserving_proto_field_name=True)

        info = call("Info", {})
        assert info["table_version"] == "v1" and info["tables"][0]["table_id"] == "mem0"
        assert info.get("num_shards") == 1  # (the router presents its 1+ shards as one)
        # grpcurl -plaintext -d @ HOST:PORT ultramem.v1.GatherPool/Gather  < request.json
        idx, blk, w = random_queries(SPEC, 3)
        reply = call(
            "Gather",
            {
                "table_id": "mem0",
                "table_version": "v1",
                "indices": json_tensor(idx.int(), "DTYPE_INT32"),
                "blocks": json_tensor(blk.int(), "DTYPE_INT32"),
                "weights": json_tensor(w, "DTYPE_FLOAT32"),
            },
        )
    pooled = reply["pooled"]
    assert pooled["dtype"] == "DTYPE_FLOAT32"
    shape = [int(d) for d in pooled["shape"]]
    assert shape == [3, SPEC.expansion, 16]
    data = torch.frombuffer(bytearray(base64.b64decode(pooled["data"])), dtype=torch.float32)
    want = gather_pool(SPEC.values, idx, blk, w, SPEC.expansion)
    torch.testing.assert_close(data.view(shape), want, atol=1e-6, rtol=1e-5)


def test_the_documented_grpcurl_request_works(endpoints):
    """The ``request.json`` shown in docs/runtimes.md, sent as-is (version filled in) through
    reflection-only descriptors, pools exactly what the kernel computes."""
    doc = (REPO / "docs" / "runtimes.md").read_text()
    block = doc[doc.index('```json\n{\n  "table_id"') + len("```json\n") :]
    payload = json.loads(block[: block.index("```")].replace("<table_version from Info>", "v1"))
    with grpc.insecure_channel(endpoints["router"]) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName(SERVICE).methods_by_name["Gather"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        reply_cls = message_factory.GetMessageClass(method.output_type)
        rpc = channel.unary_unary(
            f"/{SERVICE}/Gather",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=reply_cls.FromString,
        )
        reply = rpc(json_format.Parse(json.dumps(payload), request_cls()), timeout=10)
    got = torch.frombuffer(bytearray(reply.pooled.data), dtype=torch.float32)
    want = gather_pool(
        SPEC.values,
        torch.tensor([[5, 17]]),
        torch.tensor([[0, 3]]),
        torch.tensor([[[1.0, 0.5], [-1.0, 0.25]]]),
        SPEC.expansion,
    )
    assert list(reply.pooled.shape) == [1, SPEC.expansion, 16]
    torch.testing.assert_close(got.view(want.shape), want, atol=1e-7, rtol=1e-6)
