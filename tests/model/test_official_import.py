"""``import-official``: state dicts generated here in the official v1/v2 layout (names and
shapes of ``olmo/ultramem_layer.py`` / ``olmo/ultramem_layer_v2.py``) are imported, and the
imported layers' forward is checked against a numpy forward written from the papers on the
*official* tensors (TDQKR with the stored ``tucker_core_u/v``, MCS, IVE, shared-table offsets,
pre-values), not against this project's layer code. The exported store is then gathered
through the shard's own decode + kernel path (no server) and compared with the layer's pool."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.cli import load_commands
from ultramem_dist.errors import ImportCheckpointError
from ultramem_dist.model import load_pretrained
from ultramem_dist.model.official_import import import_official
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.serving.servicer import run_kernel
from ultramem_dist.serving.validate import Limits, decode_request
from ultramem_dist.store.export import export_checkpoint
from ultramem_dist.store.reader import load_shard

D, DK, H, R, HC, M = 24, 8, 2, 2, 2, 3
V1_BLOCKS = [1, 5, 12]  # natural order 1, 5, 12 (a string sort would put 12 before 5)
V2_LAYERS = 4
_erf = np.vectorize(math.erf)


# ----------------------------------------------------------------------------- generators
def _layer_common(g: torch.Generator, key_num: int, n_virtual: int) -> dict[str, torch.Tensor]:
    def unit(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=g)
        return t / t.norm(dim=-1, keepdim=True)

    out = {
        "query_proj.weight": torch.randn(2 * DK, D, generator=g) / math.sqrt(D),
        "keys": torch.randn(H, 2, key_num, DK, R, generator=g),
        "query_norm.weight": 1 + 0.2 * torch.randn(DK, generator=g),
        "keys_norm.weight": 1 + 0.2 * torch.randn(DK, generator=g),
        "keys_norm.bias": 0.1 * torch.randn(DK, generator=g),  # query_norm: no bias (OLMo)
        "shuffle_index": torch.randperm(n_virtual, generator=g),
        "tucker_core_u": unit(1, H, 1, R),
        "tucker_core_v": unit(1, H, 1, R),
    }
    for c in range(HC):
        out[f"tucker_core.{c}"] = torch.rand(H, R, R, generator=g)
    return out


def official_v1(seed: int = 0, knum: int = 4, key_expand: int = 2, dv: int = 12) -> dict:
    """UltraMemLayerV1 tensors of three layers under an OLMo-like prefix."""
    g = torch.Generator().manual_seed(seed)
    n, e = knum * knum, key_expand * key_expand
    state = {}
    for b in V1_BLOCKS:
        layer = _layer_common(g, key_expand * knum, e * n)
        layer["values_for_look_up"] = torch.randn(n, dv, generator=g)
        layer["values_proj.weight"] = torch.randn(D, e * dv, generator=g) / math.sqrt(e * dv)
        state.update({f"model.transformer.blocks.{b}.memory.{k}": v for k, v in layer.items()})
    return state


def official_window_knum(total: int, share_ratio: float) -> int:
    """The official rule, as the official code computes it."""
    return int((total * share_ratio) ** 0.5)


def official_v2(
    seed: int = 0,
    knum: int = 4,
    key_expand: int = 2,
    dv: int = 12,
    pre_vdim: int = 6,
    share_ratio: float = 1.0,
) -> dict:
    """UltraMemLayerV2 tensors: V2_LAYERS layers + the one value-owning module."""
    g = torch.Generator().manual_seed(seed)
    total = knum * knum * V2_LAYERS
    knum_w = official_window_knum(total, share_ratio)
    key_num = key_expand * knum_w
    state = {
        "model.transformer.memory_values.values_for_look_up": torch.randn(total, dv, generator=g),
        "model.transformer.memory_values.pre_values_for_look_up": torch.randn(
            total, pre_vdim, generator=g
        ),
    }
    for b in range(V2_LAYERS):
        layer = _layer_common(g, key_num, key_num * key_num)
        layer["values_proj.weight"] = torch.randn(D, dv, generator=g) / math.sqrt(dv)
        layer["pre_values_proj.weight"] = torch.randn(pre_vdim, D, generator=g) / math.sqrt(D)
        state.update({f"model.transformer.blocks.{b}.mem.{k}": v for k, v in layer.items()})
    return state


# ----------------------------------------------------------------------------- numpy forward
def _ln(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, axis: int = -1) -> np.ndarray:
    mu = x.mean(axis, keepdims=True)
    var = ((x - mu) ** 2).mean(axis, keepdims=True)
    y = (x - mu) / np.sqrt(var + 1e-5)
    shape = [1] * x.ndim
    shape[axis] = -1
    return y * w.reshape(shape) + (0 if b is None else b.reshape(shape))


def _np(state: dict, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v.double().numpy() for k, v in state.items() if k.startswith(prefix)}


def paper_selection(p: dict[str, np.ndarray], x: np.ndarray, m: int):
    """TDQKR (UltraMem paper): rank-1 row/col approximation with the stored u, v, top-m rows and
    columns, exact Tucker scores per core on the m x m candidates, top-m by their sum.
    Yields ``(token, virtual id, [per-core scores])``."""
    q = x @ p["query_proj.weight"].T  # [T, 2*kdim]
    qn = _ln(q.reshape(len(x), 2, DK), p["query_norm.weight"], p.get("query_norm.bias"))
    keys = _ln(p["keys"], p["keys_norm.weight"], p.get("keys_norm.bias"), axis=3)
    key_num = keys.shape[2]
    cores = [p[f"tucker_core.{c}"] for c in range(HC)]
    u, v = p["tucker_core_u"].reshape(H, R), p["tucker_core_v"].reshape(H, R)
    for t in range(len(x)):
        for h in range(H):
            s_row = np.einsum("d,kdr->kr", qn[t, 0], keys[h, 0])  # [key_num, r]
            s_col = np.einsum("d,kdr->kr", qn[t, 1], keys[h, 1])
            rows = np.argsort(-(s_row @ u[h]))[:m]
            cols = np.argsort(-(s_col @ v[h]))[:m]
            cand = [
                (i * key_num + j, [s_row[i] @ core[h] @ s_col[j] for core in cores])
                for i in rows
                for j in cols
            ]
            cand.sort(key=lambda c: -sum(c[1]))
            for virtual, scores in cand[:m]:
                yield t, virtual, scores


def paper_v1_forward(p: dict[str, np.ndarray], x: np.ndarray, m: int) -> np.ndarray:
    values = p["values_for_look_up"]
    n, dv = values.shape
    e = p["shuffle_index"].shape[0] // n
    seg = dv // HC
    pooled = np.zeros((len(x), e, dv))
    for t, virtual, scores in paper_selection(p, x, m):
        z = int(p["shuffle_index"][virtual])
        row, block = z % n, z // n  # IVE: physical row and virtual block
        for c in range(HC):  # MCS: core c weights value columns [c*seg, (c+1)*seg)
            pooled[t, block, c * seg : (c + 1) * seg] += (
                scores[c] * values[row, c * seg : (c + 1) * seg]
            )
    return pooled.reshape(len(x), -1) @ p["values_proj.weight"].T


def paper_v2_forward(
    p: dict[str, np.ndarray],
    shared: dict[str, np.ndarray],
    x: np.ndarray,
    m: int,
    layer: int,
    window: int,
) -> np.ndarray:
    """UltraMemV2: physical row ((z mod window) + layer*knum^2) mod A; the score times
    GELU(pre_values[row] . W_pre x); virtual blocks summed before the single projection."""
    values, pre_values = shared["values_for_look_up"], shared["pre_values_for_look_up"]
    total, dv = values.shape
    offset = layer * (total // V2_LAYERS)
    seg = dv // HC
    pooled = np.zeros((len(x), dv))
    pre_in = x @ p["pre_values_proj.weight"].T
    for t, virtual, scores in paper_selection(p, x, m):
        z = int(p["shuffle_index"][virtual])
        row = ((z % window) + offset) % total
        dot = pre_values[row] @ pre_in[t]
        act = 0.5 * dot * (1 + _erf(dot / math.sqrt(2)))
        for c in range(HC):
            pooled[t, c * seg : (c + 1) * seg] += (
                scores[c] * act * values[row, c * seg : (c + 1) * seg]
            )
    return pooled @ p["values_proj.weight"].T


# ----------------------------------------------------------------------------- shard gather
def _shard_pool(store, version, table_id, sel, pre, shards):
    """Gather through each shard's own validation + kernel (what a server runs), summed over
    row shards or concatenated over dim shards."""
    parts, by = [], None
    for k in range(shards):
        shard = load_shard(store, k, version)
        table = shard.tables[table_id]
        by = table.entry.sharding
        if by == "row":
            lo, hi = table.slot.row_lo, table.slot.row_hi
            mask = (sel.indices >= lo) & (sel.indices < hi)
        else:
            mask = torch.ones_like(sel.indices, dtype=torch.bool)
        counts = mask.sum(1)
        req = pb.GatherRequest(table_id=table_id, table_version=version)
        encode_tensor(sel.indices[mask], req.indices)
        encode_tensor(torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]), req.offsets)
        encode_tensor(sel.blocks[mask], req.blocks)
        encode_tensor(sel.weights[mask].float().contiguous(), req.weights)
        if pre is not None:
            encode_tensor(pre.float().contiguous(), req.pre_input)
        q = decode_request(req, shard, Limits(max_batch=64, max_per_query=64))
        parts.append(torch.from_numpy(np.asarray(run_kernel(q))))
    return sum(parts) if by == "row" else torch.cat(parts, -1)


# ----------------------------------------------------------------------------- tests
def test_v1_import_matches_the_paper_forward(tmp_path) -> None:
    state = official_v1()
    model = import_official(state, tmp_path / "ckpt", topm=M, memory_only=True).double()
    assert model.cfg.kind == "ultramem" and model.cfg.ultramem.shared_query_norm
    assert len(model.memory_layers) == len(V1_BLOCKS)
    x = torch.randn(6, D, dtype=torch.float64)
    for i, b in enumerate(V1_BLOCKS):
        p = _np(state, f"model.transformer.blocks.{b}.memory.")
        with torch.no_grad():
            got = model.memory_layers[i](x).numpy()
        np.testing.assert_allclose(got, paper_v1_forward(p, x.numpy(), M), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("share_ratio", "window"), [(1.0, 64), (0.25, 16), (0.6, 36)])
def test_v2_import_matches_the_paper_forward(tmp_path, share_ratio, window) -> None:
    state = official_v2(seed=1, share_ratio=share_ratio)
    model = import_official(
        state, tmp_path / "ckpt", topm=M, share_ratio=share_ratio, memory_only=True
    ).double()
    assert official_window_knum(64, share_ratio) ** 2 == window
    assert [m.n_rows for m in model.v2_layers] == [window] * V2_LAYERS
    shared = _np(state, "model.transformer.memory_values.")
    x = torch.randn(6, D, dtype=torch.float64)
    for i in range(V2_LAYERS):
        p = _np(state, f"model.transformer.blocks.{i}.mem.")
        with torch.no_grad():
            got = model.v2_layers[i](x, model.shared_table).numpy()
        want = paper_v2_forward(p, shared, x.numpy(), M, i, window)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("by", ["row", "dim"])
def test_exported_v1_import_gathers_the_layers_pool(tmp_path, by) -> None:
    import_official(official_v1(seed=2), tmp_path / "ckpt", topm=M, memory_only=True)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "store", shards=2, by=by, version="o1")
    model = load_pretrained(tmp_path / "ckpt", allow_memory_only=True)
    x = torch.randn(5, D)
    with torch.no_grad():
        for i, layer in enumerate(model.memory_layers):
            sel = layer.select(x)
            got = _shard_pool(tmp_path / "store", "o1", f"mem{i}", sel, None, 2)
            torch.testing.assert_close(got, layer.pool_local(sel), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("by", ["row", "dim"])
def test_exported_v2_import_gathers_the_layers_pool(tmp_path, by) -> None:
    state = official_v2(seed=3, share_ratio=0.6)
    import_official(state, tmp_path / "ckpt", topm=M, share_ratio=0.6, memory_only=True)
    manifest = export_checkpoint(
        tmp_path / "ckpt", tmp_path / "store", shards=2, by=by, version="o2"
    )
    assert [(x.offset, x.n_rows) for x in manifest.tables[0].shared_layers] == [
        (16 * i, 36) for i in range(V2_LAYERS)
    ]
    model = load_pretrained(tmp_path / "ckpt", allow_memory_only=True)
    x = torch.randn(5, D)
    with torch.no_grad():
        for layer in model.v2_layers:
            sel, pre = layer.select(x), layer.pre_input(x)
            got = _shard_pool(tmp_path / "store", "o2", "shared", sel, pre, 2)
            want = layer.pool(model.shared_table, sel, pre)
            # unit-scale random values: float32 partial sums over 2 row shards differ by ~1e-6
            torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)


def test_backbone_keys_in_this_projects_names_are_imported(tmp_path) -> None:
    from ultramem_dist.model import MemoryLM

    first = import_official(official_v2(), tmp_path / "a", topm=M, memory_only=True)
    torch.manual_seed(7)
    donor = MemoryLM(first.cfg).state_dict()
    backbone = {k: v for k, v in donor.items() if not k.startswith(("v2_layers.", "shared_table."))}
    model = import_official({**official_v2(), **backbone}, tmp_path / "b", topm=M)
    assert torch.equal(model.tok_emb.weight, backbone["tok_emb.weight"])
    again = load_pretrained(tmp_path / "b")  # a full import loads everywhere
    assert json.loads((tmp_path / "b" / "config.json").read_text())["imported"] == {
        "format": "official-v2",
        "memory_only": False,
        "source": "",
    }
    assert torch.equal(again.shared_table.values, model.shared_table.values)


def test_memory_only_checkpoints_are_refused_outside_export(tmp_path) -> None:
    import_official(official_v1(), tmp_path / "ckpt", topm=M, memory_only=True)
    with pytest.raises(ValueError, match="memory-only import"):
        load_pretrained(tmp_path / "ckpt")


def _drop(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def _with(state: dict, key: str, value: torch.Tensor) -> dict:
    return {**state, key: value}


L1 = "model.transformer.blocks.5.memory."
L2 = "model.transformer.blocks.2.mem."
OWNER = "model.transformer.memory_values."
BAD = [
    (official_v1, lambda s: _drop(s, L1 + "shuffle_index"), [L1 + "shuffle_index", "[64]"]),
    (
        official_v1,
        lambda s: _with(s, L1 + "keys", torch.zeros(2, 2, 8, 8, 3)),
        [L1 + "keys", "[2, 2, 8, 8, 2]"],
    ),
    (
        official_v1,
        lambda s: _with(s, L1 + "values_proj.weight", torch.zeros(24, 12)),
        ["values_proj.weight", "[24, 48]"],
    ),
    (
        official_v1,
        lambda s: _with(s, L1 + "tucker_core_u", torch.zeros(2, 2)),
        ["tucker_core_u", "[1, 2, 1, 2]"],
    ),
    (
        official_v1,
        lambda s: _with(s, L1 + "shuffle_index", torch.zeros(64, dtype=torch.long)),
        ["not a permutation"],
    ),
    (official_v1, lambda s: _drop(s, L1 + "tucker_core.1"), [L1 + "tucker_core.1", "[2, 2, 2]"]),
    (
        official_v1,
        lambda s: _with(s, L1 + "pre_values_proj.weight", torch.zeros(6, 24)),
        ["unexpected key", "v1 layer"],
    ),
    (official_v1, lambda s: _with(s, "foo.bar", torch.zeros(3)), ["unknown key 'foo.bar'"]),
    (
        official_v1,
        lambda s: _with(s, L1 + "query_proj.weight", torch.zeros(32, 24)),
        ["per-rank queries"],
    ),
    (
        official_v2,
        lambda s: _drop(s, L2 + "pre_values_proj.weight"),
        [L2 + "pre_values_proj.weight", "[6, 24]"],
    ),
    (
        official_v2,
        lambda s: _with(s, L2 + "values_proj.weight", torch.zeros(24, 48)),
        ["value_expand_time=4"],
    ),
    (
        official_v2,
        lambda s: _with(s, OWNER + "pre_values_for_look_up", torch.zeros(64, 6, 1)),
        ["pre_values_for_look_up"],
    ),
    (
        official_v2,
        lambda s: _drop(s, OWNER + "values_for_look_up"),
        [OWNER + "values_for_look_up", "missing"],
    ),
    (
        official_v2,
        lambda s: {
            **s,
            **{"x." + k[len(L1) :]: v for k, v in official_v1().items() if k.startswith(L1)},
        },
        ["mixes v1 layers"],
    ),
    (
        official_v2,
        lambda s: _with(s, "other.values_for_look_up", torch.zeros(64, 12)),
        ["exactly one value module"],
    ),
    (
        official_v1,
        lambda s: _drop(s, "model.transformer.blocks.1.memory.tucker_core.0"),
        ["tucker_core.0 .. tucker_core", "found ['tucker_core.1']"],
    ),
    (
        official_v2,
        lambda s: _with(s, OWNER + "values_for_look_up", torch.full((64, 12), float("nan"))),
        [OWNER + "values_for_look_up", "NaN"],
    ),
    (lambda: {}, lambda s: s, ["no official memory-layer keys"]),
]


@pytest.mark.parametrize(("make", "edit", "words"), BAD)
def test_bad_state_dicts_are_refused_with_a_sentence(tmp_path, make, edit, words) -> None:
    with pytest.raises(ImportCheckpointError) as err:
        import_official(edit(make()), tmp_path / "ckpt", topm=M, memory_only=True)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "ckpt").exists()  # nothing written


def test_npu_copies_of_the_cores_are_accepted_when_they_agree(tmp_path) -> None:
    state = official_v2(seed=4)
    pre = "model.transformer.blocks.0.mem."
    u, v = state[pre + "tucker_core_u"], state[pre + "tucker_core_v"]
    state[pre + "tucker_core_uv"] = torch.stack([u.flatten(), v.flatten()], -1)
    state[pre + "tucker_core_stacked"] = torch.stack(
        [state[pre + f"tucker_core.{c}"] for c in range(HC)], 0
    )
    plain = import_official(official_v2(seed=4), tmp_path / "a", topm=M, memory_only=True)
    model = import_official(state, tmp_path / "b", topm=M, memory_only=True)
    assert torch.equal(model.v2_layers[0].cores, plain.v2_layers[0].cores)
    state[pre + "tucker_core_stacked"] = state[pre + "tucker_core_stacked"] + 1
    with pytest.raises(ImportCheckpointError, match="tucker_core_stacked.*disagrees"):
        import_official(state, tmp_path / "c", topm=M, memory_only=True)


def test_other_keys_are_dropped_only_when_asked(tmp_path) -> None:
    olmo = {
        "model.transformer.wte.weight": torch.zeros(50, D),
        "model.transformer.blocks.0.att_proj.weight": torch.zeros(3 * D, D),
    }
    state = {**official_v1(seed=5), **olmo}
    with pytest.raises(ImportCheckpointError, match="unknown key .*--drop-other-keys"):
        import_official(state, tmp_path / "a", topm=M, memory_only=True)
    with pytest.raises(ImportCheckpointError, match="needs --memory-only"):
        import_official(state, tmp_path / "b", topm=M, drop_other_keys=True)
    model = import_official(state, tmp_path / "c", topm=M, memory_only=True, drop_other_keys=True)
    plain = import_official(official_v1(seed=5), tmp_path / "d", topm=M, memory_only=True)
    for a, b in zip(model.memory_layers, plain.memory_layers, strict=True):
        assert torch.equal(a.values, b.values) and torch.equal(a.keys, b.keys)
    info = json.loads((tmp_path / "c" / "config.json").read_text())["imported"]
    assert info["memory_only"] and info["dropped_keys"] == 2


def test_a_share_ratio_the_keys_do_not_fit_is_refused(tmp_path) -> None:
    with pytest.raises(ImportCheckpointError, match="pass the share_ratio"):
        import_official(
            official_v2(share_ratio=1.0), tmp_path / "c", topm=M, share_ratio=0.6, memory_only=True
        )


# ----------------------------------------------------------------------------- CLI
app = load_commands()


def _cli(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_error_line(res, code: int, *words: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in res.stderr


def test_cli_imports_then_export_serves_it(tmp_path) -> None:
    torch.save(official_v2(), tmp_path / "official.pt")
    res = _cli(
        [
            "import-official",
            tmp_path / "official.pt",
            "--out",
            tmp_path / "ckpt",
            "--topm",
            M,
            "--memory-only",
        ]
    )
    assert res.exit_code == 0, res.stderr
    res = _cli(
        [
            "export",
            tmp_path / "ckpt",
            "--out",
            tmp_path / "store",
            "--shards",
            2,
            "--dtype",
            "float32",
            "--version",
            "v1",
        ]
    )
    assert res.exit_code == 0, res.stderr
    assert load_shard(tmp_path / "store", 1, "v1").tables["shared"].entry.pre_vdim == 6
    # the memory-only checkpoint is refused by generate with one sentence
    res = _cli(["generate", "--checkpoint", tmp_path / "ckpt", "--prompt", "x"])
    _one_error_line(res, 2, "memory-only")


@pytest.mark.parametrize(
    ("setup", "extra", "words"),
    [
        ("missing-key", ["--memory-only"], ["shuffle_index", "expected shape [64]"]),
        ("ok", [], ["--memory-only"]),  # no backbone keys and no --memory-only
        ("ok", ["--memory-only", "--share-ratio", "0.6"], ["share_ratio"]),
        ("text", ["--memory-only"], ["not a torch state-dict file"]),
        ("nope", ["--memory-only"], ["does not exist"]),
        ("ok", ["--memory-only", "--every", "2", "--n-layers", "4"], ["places 2"]),
    ],
)
def test_cli_bad_input_exits_2_with_one_sentence(tmp_path, setup, extra, words) -> None:
    path = tmp_path / "official.pt"
    if setup == "ok":
        torch.save(official_v2(), path)
    elif setup == "missing-key":
        torch.save(_drop(official_v1(), L1 + "shuffle_index"), path)
    elif setup == "text":
        path.write_text("not a pickle\n")
    res = _cli(["import-official", path, "--out", tmp_path / "ckpt", "--topm", M, *extra])
    _one_error_line(res, 2, *words)


def test_cli_refuses_to_overwrite_a_checkpoint(tmp_path) -> None:
    torch.save(official_v1(), tmp_path / "o.pt")
    args = [
        "import-official",
        tmp_path / "o.pt",
        "--out",
        tmp_path / "ckpt",
        "--topm",
        M,
        "--memory-only",
    ]
    assert _cli(args).exit_code == 0
    _one_error_line(_cli(args), 2, "already holds a checkpoint")
