"""UltraMemV2 gathers on a real shard server: pre-value activation applied on the shard equals
the local layer's pooling (row and dim sharding); bad or missing pre_input is refused."""

from __future__ import annotations

import re

import grpc
import pytest
import torch

from ultramem_dist._private.codec import decode_tensor, encode_tensor
from ultramem_dist.model import MemoryLM, preset, save_pretrained
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store.export import export_checkpoint

SHARDS = 2


@pytest.fixture(scope="module")
def v2_model():
    torch.manual_seed(3)
    model = MemoryLM(preset("micro", "ultramemv2")).eval()
    with torch.no_grad():
        model.shared_table.pre_values.normal_()  # activations well away from zero
    return model


@pytest.fixture(scope="module")
def stubs(v2_model, tmp_path_factory, in_process_shard):
    root = tmp_path_factory.mktemp("v2store")
    ckpt = save_pretrained(v2_model, root / "ckpt")
    out = {}
    for by in ("row", "dim"):
        export_checkpoint(ckpt, root / by, shards=SHARDS, by=by, version="v2a")
        chans = []
        for k in range(SHARDS):
            srv = in_process_shard(
                ServerConfig(store=root / by, shard=k, max_batch=64, max_per_query=64)
            )
            chans.append(pb_grpc.GatherPoolStub(grpc.insecure_channel(srv.target)))
        out[by] = chans
    return out


def _request(idx, w, pre, version="v2a"):
    """CSR request of the entries ``idx`` [nnz] (token order), offsets from per-token counts."""
    req = pb.GatherRequest(table_id="shared", table_version=version)
    encode_tensor(idx["indices"], req.indices)
    encode_tensor(idx["offsets"], req.offsets)
    encode_tensor(torch.zeros_like(idx["indices"]), req.blocks)
    encode_tensor(w, req.weights)
    if pre is not None:
        encode_tensor(pre, req.pre_input)
    return req


def _remote_pool(stubs, by, sel, pre, bounds):
    t = sel.indices.shape[0]
    parts = []
    for k, stub in enumerate(stubs):
        if by == "row":
            lo, hi = bounds[k]
            mask = (sel.indices >= lo) & (sel.indices < hi)
        else:
            mask = torch.ones_like(sel.indices, dtype=torch.bool)
        counts = mask.sum(1)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        req = _request(
            {"indices": sel.indices[mask], "offsets": offsets},
            sel.weights[mask].float().contiguous(),
            pre.float().contiguous(),
        )
        reply = stub.Gather(req, timeout=10)
        parts.append(
            decode_tensor(
                reply.pooled, name="pooled", dtypes=(torch.float32,), max_elements=1 << 20
            ).reshape(t, -1)
        )
    return sum(parts) if by == "row" else torch.cat(parts, 1)


@pytest.mark.parametrize("by", ["row", "dim"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shard_pool_with_pre_values_equals_the_local_layer(v2_model, stubs, by, seed):
    torch.manual_seed(seed)
    table = v2_model.shared_table
    info = stubs[by][0].Info(pb.InfoRequest(), timeout=10)
    assert info.tables[0].pre_vdim == table.pre_values.shape[1]
    bounds = []
    for stub in stubs[by]:
        ti = stub.Info(pb.InfoRequest(), timeout=10).tables[0]
        bounds.append((ti.row_lo, ti.row_hi))
    x = torch.randn(5, v2_model.cfg.d_model)
    with torch.no_grad():
        for layer in v2_model.v2_layers:
            sel = layer.select(x)
            pre = layer.pre_input(x)
            want = layer.pool(table, sel, pre)
            got = _remote_pool(stubs[by], by, sel, pre, bounds)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            # the activation matters: without it the answer differs
            plain = layer.pool(table, sel, None)
            assert not torch.allclose(plain, want, atol=1e-4)


def _one_entry_request(pre):
    return _request(
        {"indices": torch.tensor([3]), "offsets": torch.tensor([0, 1])},
        torch.ones(1, 2),
        pre,
    )


@pytest.mark.parametrize(
    "pre, match",
    [
        (None, "must carry pre_input"),
        (torch.ones(1, 3), "expected \\[1, 8\\]"),
        (torch.full((1, 8), float("nan")), "NaN"),
        (torch.ones(1, 8, dtype=torch.float16), "pre_input"),
    ],
)
def test_bad_pre_input_is_refused_and_the_server_keeps_serving(stubs, pre, match):
    stub = stubs["dim"][0]
    with pytest.raises(grpc.RpcError) as err:
        stub.Gather(_one_entry_request(pre), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(match, err.value.details() or "")
    reply = stub.Gather(_one_entry_request(torch.ones(1, 8)), timeout=10)
    assert reply.table_version == "v2a"


def test_pre_input_on_a_v1_table_is_refused(tmp_path, in_process_shard):
    ckpt = save_pretrained(MemoryLM(preset("micro", "ultramem")), tmp_path / "ckpt")
    export_checkpoint(ckpt, tmp_path / "s", shards=1, version="v1a")
    srv = in_process_shard(ServerConfig(store=tmp_path / "s", shard=0))
    stub = pb_grpc.GatherPoolStub(grpc.insecure_channel(srv.target))
    assert stub.Info(pb.InfoRequest(), timeout=10).tables[0].pre_vdim == 0
    req = pb.GatherRequest(table_id="mem0", table_version="v1a")
    encode_tensor(torch.tensor([[3]]), req.indices)
    encode_tensor(torch.tensor([[0]]), req.blocks)
    encode_tensor(torch.ones(1, 1, 2), req.weights)
    encode_tensor(torch.ones(1, 8), req.pre_input)
    with pytest.raises(grpc.RpcError) as err:
        stub.Gather(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has no pre-values" in (err.value.details() or "")
    req.ClearField("pre_input")
    assert stub.Gather(req, timeout=10).table_version == "v1a"


@pytest.mark.parametrize("by", ["row", "dim"])
def test_native_and_torch_shard_paths_agree(v2_model, tmp_path, by):
    """The shard's one-pass native kernel and its torch path (a GPU shard, or no compiler)
    answer the same V2 query alike."""
    from ultramem_dist.serving.servicer import kernel_plan, run_kernel
    from ultramem_dist.serving.validate import Limits, decode_request
    from ultramem_dist.store.reader import load_shard

    ckpt = save_pretrained(v2_model, tmp_path / "ckpt")
    export_checkpoint(ckpt, tmp_path / "s", shards=2, by=by, version="v2a")
    shard = load_shard(tmp_path / "s", 1)
    table = shard.tables["shared"]
    lo, hi = table.slot.row_lo, table.slot.row_hi
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(lo, hi, (9,), generator=gen)
    req = _request(
        {"indices": idx, "offsets": torch.tensor([0, 4, 4, 9])},
        torch.randn(9, 2, generator=gen),
        torch.randn(3, table.entry.pre_vdim, generator=gen),
    )
    q = decode_request(req, shard, Limits(max_batch=64, max_per_query=64))
    plan = kernel_plan(table)
    assert plan is not None and plan.pre is not None
    np_native = run_kernel(q, plan)
    np_torch = run_kernel(q, None)
    torch.testing.assert_close(torch.from_numpy(np_native), torch.from_numpy(np_torch))


def test_a_model_without_pre_gelu_is_served_with_the_plain_dot_product(tmp_path):
    """``pre_gelu=False`` (optional in the official config) is exported as manifest
    ``pre_activation: none`` and the shard scales by the dot product itself; an unknown
    activation in a manifest is refused."""
    import json
    from dataclasses import replace

    from ultramem_dist.serving.servicer import kernel_plan, run_kernel
    from ultramem_dist.serving.validate import Limits, decode_request
    from ultramem_dist.store.manifest import Manifest, ManifestError
    from ultramem_dist.store.reader import load_shard

    cfg = preset("micro", "ultramemv2")
    cfg.ultramemv2 = replace(cfg.ultramemv2, pre_gelu=False)
    torch.manual_seed(4)
    model = MemoryLM(cfg).eval()
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    export_checkpoint(ckpt, tmp_path / "s", shards=1, version="v2a")
    raw = json.loads((tmp_path / "s" / "v2a" / "manifest.json").read_text())
    assert raw["tables"][0]["pre_activation"] == "none"
    shard = load_shard(tmp_path / "s", 0)
    layer, table = model.v2_layers[1], model.shared_table
    x = torch.randn(4, cfg.d_model)
    with torch.no_grad():
        sel, pre = layer.select(x), layer.pre_input(x)
        want = layer.pool(table, sel, pre)
    t, n = sel.indices.shape
    req = _request(
        {"indices": sel.indices.reshape(-1), "offsets": torch.arange(t + 1) * n},
        sel.weights.reshape(t * n, -1).float().contiguous(),
        pre.float().contiguous(),
    )
    q = decode_request(req, shard, Limits(max_batch=64, max_per_query=64))
    got = run_kernel(q, kernel_plan(shard.tables["shared"]))
    torch.testing.assert_close(torch.from_numpy(got).reshape(t, -1), want, rtol=1e-5, atol=1e-6)
    raw["tables"][0]["pre_activation"] = "relu"
    with pytest.raises(ManifestError, match="pre_activation"):
        Manifest.from_json(raw)
