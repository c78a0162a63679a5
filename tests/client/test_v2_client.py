"""UltraMemV2 lookups through the Python clients, against real in-process shard servers: the
pooled values equal ``UltraMemV2Layer.pool`` on the local shared table for every transport
(asyncio client unary and on streams, thread store, lookup-process store, the router), row and
dim sharding; a bad or missing ``pre_input`` is a clear client exception, whether the client or
the shard catches it."""

from __future__ import annotations

import json
import re

import grpc
import pytest
import torch
from conftest import micro_v2_model, running_router

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.client import ChannelOptions, GatherClient, ProcessValueStore, RemoteValueStore
from ultramem_dist.errors import InvalidRequestError
from ultramem_dist.model import MemoryLM, preset, save_pretrained
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store.export import export_checkpoint

SHARDS = 2
VERSION = "v2c"


@pytest.fixture(scope="module")
def v2_model():
    return micro_v2_model(11)


@pytest.fixture(scope="module")
def targets(v2_model, tmp_path_factory, in_process_shard):
    """``row``/``dim`` -> comma-separated targets of 2 shard servers; ``v1`` -> a v1 store."""
    root = tmp_path_factory.mktemp("v2client")
    ckpt = save_pretrained(v2_model, root / "ckpt")
    out = {}
    for by in ("row", "dim"):
        export_checkpoint(ckpt, root / by, shards=SHARDS, by=by, version=VERSION)
        servers = [in_process_shard(ServerConfig(store=root / by, shard=k)) for k in range(SHARDS)]
        out[by] = ",".join(s.target for s in servers)
    v1 = save_pretrained(MemoryLM(preset("micro", "ultramem")), root / "v1ckpt")
    export_checkpoint(v1, root / "v1", shards=1, version="v1c")
    out["v1"] = in_process_shard(ServerConfig(store=root / "v1", shard=0)).target
    return out


def _cases(model, num_tokens: int = 5, seed: int = 0):
    """Per V2 layer: (selection with pre_input, the local layer's pooled values [T, Dv])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, model.cfg.d_model, generator=g)
    out = []
    with torch.no_grad():
        for layer in model.v2_layers:
            sel = layer.select(x)
            sel.pre_input = layer.pre_input(x)
            out.append((sel, layer.pool(model.shared_table, sel, sel.pre_input)))
    return out


def _check(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == (want.shape[0], 1, want.shape[1])  # one IVE block, unmerged
    torch.testing.assert_close(got[:, 0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("by", ["row", "dim"])
@pytest.mark.parametrize("streaming", [False, True])
async def test_gather_client_pools_v2_lookups_like_the_local_layer(
    v2_model, targets, by, streaming
):
    opts = ChannelOptions(streaming=streaming)
    async with await GatherClient.connect(targets[by], options=opts) as client:
        t = client.table("shared")
        assert t.pre_vdim == v2_model.shared_table.pre_values.shape[1] == 8
        assert t.sharding == by and t.expansion == 1
        if streaming:
            assert await client.wait_streams_ready(10)
        for sel, want in _cases(v2_model):
            got = await client.gather(
                "shared", sel.indices, sel.blocks, sel.weights, pre_input=sel.pre_input
            )
            _check(got, want)
        if streaming:  # the stream path really carried the pre_input (no unary re-sends)
            assert sum(s.sent for s in client.streams) > 0
            assert sum(s.resent for s in client.streams) == 0
        # the activation is applied remotely: dropping it changes the answer
        sel, want = _cases(v2_model)[0]
        plain = v2_model.v2_layers[0].pool(v2_model.shared_table, sel, None)
        assert not torch.allclose(plain, want, atol=1e-4)


@pytest.mark.parametrize("by", ["row", "dim"])
@pytest.mark.parametrize("store_cls", [RemoteValueStore, ProcessValueStore])
def test_value_stores_carry_pre_input(v2_model, targets, by, store_cls):
    with store_cls(targets[by]) as store:
        assert store.layout.tables["shared"].pre_vdim == 8
        futures = [(store.submit("shared", sel), want) for sel, want in _cases(v2_model, 7, 3)]
        for fut, want in futures:  # several in flight at once
            _check(fut.result(10), want)


@pytest.mark.parametrize("store_cls", [RemoteValueStore, ProcessValueStore])
def test_shard_refusal_of_pre_input_is_a_clear_client_exception(v2_model, targets, store_cls):
    sel, want = _cases(v2_model)[0]
    bad = torch.clone(sel.pre_input)
    bad[1, 2] = float("nan")
    with store_cls(targets["row"]) as store:
        sel_bad = type(sel)(sel.indices, sel.blocks, sel.weights, bad)
        with pytest.raises(InvalidRequestError, match=r"shard \d .*INVALID_ARGUMENT.*NaN"):
            store.lookup("shared", sel_bad, timeout=10)
        _check(store.lookup("shared", sel, timeout=10), want)  # the store keeps working


async def test_client_refuses_missing_misshapen_or_misplaced_pre_input(v2_model, targets):
    sel, _ = _cases(v2_model)[0]
    async with await GatherClient.connect(targets["dim"]) as client:
        with pytest.raises(InvalidRequestError, match=r"must carry pre_input float32 \[T, 8\]"):
            await client.gather("shared", sel.indices, sel.blocks, sel.weights)
        with pytest.raises(InvalidRequestError, match=r"expected \[5, 8\]"):
            await client.gather(
                "shared", sel.indices, sel.blocks, sel.weights, pre_input=sel.pre_input[:, :3]
            )
        # other float dtypes are widened to the wire's float32, not refused
        got = await client.gather(
            "shared", sel.indices, sel.blocks, sel.weights, pre_input=sel.pre_input.double()
        )
        assert got.shape == (5, 1, 32)
    async with await GatherClient.connect(targets["v1"]) as client:
        assert client.table("mem0").pre_vdim == 0
        idx = torch.zeros(2, 8, dtype=torch.int64)
        w = torch.ones(2, 8, 2)
        with pytest.raises(InvalidRequestError, match="has no pre-values"):
            await client.gather("mem0", idx, idx, w, pre_input=torch.ones(2, 8))
        assert (await client.gather("mem0", idx, idx, w)).shape[0] == 2


@pytest.fixture(scope="module")
def router(targets):
    """A router in front of the 2 row shards."""
    with running_router(targets["row"].split(",")) as target:
        yield target


async def test_router_forwards_pre_input_to_the_shards(v2_model, router):
    async with await GatherClient.connect(router) as client:
        assert client.layout.num_shards == 1
        assert client.table("shared").pre_vdim == 8
        for sel, want in _cases(v2_model, 4, 5):
            got = await client.gather(
                "shared", sel.indices, sel.blocks, sel.weights, pre_input=sel.pre_input
            )
            _check(got, want)
        sel, _ = _cases(v2_model)[0]
        bad = torch.full_like(sel.pre_input, float("inf"))
        with pytest.raises(InvalidRequestError, match=r"router: pre_input: contains NaN or Inf"):
            await client.gather("shared", sel.indices, sel.blocks, sel.weights, pre_input=bad)
    # a generic caller (no client-side checks) gets the shard's own refusals from the router
    stub = pb_grpc.GatherPoolStub(grpc.insecure_channel(router))
    req = pb.GatherRequest(table_id="shared", table_version=VERSION)
    encode_tensor(sel.indices, req.indices)
    encode_tensor(sel.blocks, req.blocks)
    encode_tensor(sel.weights, req.weights)
    for pre, match in ((None, "must carry pre_input"), (sel.pre_input[:2], r"expected \[5, 8\]")):
        req.ClearField("pre_input")
        if pre is not None:
            encode_tensor(pre.contiguous(), req.pre_input)
        with pytest.raises(grpc.RpcError) as err:
            stub.Gather(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(match, err.value.details() or "")
    encode_tensor(sel.pre_input, req.pre_input)
    reply = stub.Gather(req, timeout=10)
    assert reply.table_version == VERSION


@pytest.mark.parametrize("by", ["row", "dim"])
def test_memory_lm_with_a_remote_shared_table_gives_the_same_logits(v2_model, targets, by):
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        local = v2_model(tokens)
    remote = MemoryLM(v2_model.cfg).eval()
    remote.load_state_dict(v2_model.state_dict())
    remote.drop_value_tables()
    assert remote.shared_table.values.numel() == remote.shared_table.pre_values.numel() == 0
    with RemoteValueStore(targets[by]) as store:
        remote.set_value_backend(store)
        with torch.no_grad():
            got = remote(tokens)
    torch.testing.assert_close(got, local, rtol=1e-5, atol=1e-5)


def test_lookup_cli_sends_a_random_pre_input_to_a_v2_table(targets):
    from typer.testing import CliRunner

    from ultramem_dist.cli import load_commands

    for by in ("row", "dim"):
        res = CliRunner().invoke(
            load_commands(), ["lookup", "--target", targets[by], "--table", "shared"]
        )
        assert res.exit_code == 0, res.output
        summary = json.loads(res.output)
        assert summary["pre_vdim"] == 8 and summary["shape"] == [4, 1, 32]
        assert summary["sharding"] == by and summary["finite"] and summary["abs_max"] > 0
    res = CliRunner().invoke(
        load_commands(), ["lookup", "--target", targets["v1"], "--table", "mem0"]
    )
    assert res.exit_code == 0, res.output
    assert "pre_vdim" not in json.loads(res.output)  # v1 output unchanged
