"""Import state dicts laid out like the official UltraMem / UltraMemV2 code.

The official layers (``olmo/ultramem_layer.py`` v1, ``olmo/ultramem_layer_v2.py`` v2) name their
parameters ``query_proj.weight [2*kdim, D]``, ``keys [head, 2, key_num, kdim, tucker_rank]``,
``query_norm`` (one LayerNorm over ``kdim`` for both query halves), ``keys_norm``,
``tucker_core.<c> [head, r, r]``, the buffers ``shuffle_index [virtual rows]`` and
``tucker_core_u`` / ``tucker_core_v [1, head, 1, r]``, ``values_proj.weight [D, E*vdim]`` and
``values_for_look_up [rows, vdim]``. A v2 model keeps ``values_for_look_up [A, vdim]`` and
``pre_values_for_look_up [A, pre_vdim]`` in ONE value-owning module and gives each layer a
``pre_values_proj.weight [pre_vdim, D]``.

A key is a memory key when its last component(s) are one of those names; what comes before is the
layer's prefix (e.g. ``model.transformer.blocks.3.mem.``). Layers are ordered by the integers in
their prefixes. Every other key is a backbone key and must already carry this project's
:class:`~ultramem_dist.model.MemoryLM` name and shape (the official OLMo backbone — RoPE,
its own block layout — has no counterpart here). A state dict without any backbone key is
imported only in the labelled *memory-only* mode: the backbone is a seeded random init and the
checkpoint's ``config.json`` says ``"imported": {"memory_only": true}``, which
:func:`~ultramem_dist.model.load_pretrained` refuses unless asked (``export`` asks: serving the
value tables needs no backbone).

Not recorded in a state dict and so passed in: ``topm`` (the official ``knn``), for v2
``share_ratio`` (default 1.0, the official default) and ``pre_gelu`` (``mem_use_glu_act``).
Normalisation layers are taken as LayerNorms (OLMo's default ``layer_norm_type``; a missing
``.bias`` means none, i.e. zeros). Not importable (refused with a sentence): per-rank queries
(``mem_q_for_each_tucker_rank``), v2 ``value_expand_time > 1``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ultramem_dist.errors import ImportCheckpointError
from ultramem_dist.model.config import LMConfig, UltraMemConfig, UltraMemV2Config
from ultramem_dist.model.io import save_pretrained
from ultramem_dist.model.lm import MemoryLM

OFFICIAL_NAMES: tuple[str, ...] = (
    "pre_values_for_look_up",
    "values_for_look_up",
    "pre_values_proj.weight",
    "values_proj.weight",
    "query_proj.weight",
    "query_norm.weight",
    "query_norm.bias",
    "keys_norm.weight",
    "keys_norm.bias",
    "shuffle_index",
    "tucker_core_u",
    "tucker_core_v",
    "tucker_core_uv",
    "tucker_core_stacked",
    "keys",
)
"""Parameter/buffer names of the official layers (a ``tucker_core.<c>`` list comes besides).
``tucker_core_uv`` and ``tucker_core_stacked`` are copies the official code makes on NPUs
(``post_load_init``): accepted when they agree with ``tucker_core_u/v`` and the core list."""

_CORE = re.compile(r"^(?P<prefix>(?:.*\.)?)tucker_core\.(?P<c>\d+)$")
_MEMORY_PREFIXES = ("memory_layers.", "v2_layers.", "shared_table.")
"""This project's memory parameter prefixes in a :class:`MemoryLM` state dict."""


@dataclass
class OfficialModule:
    """The official keys sharing one prefix (one layer, or v2's value-owning module)."""

    prefix: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _expect(group: OfficialModule, name: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """``group``'s ``name`` with exactly ``shape``, else an error naming key and shape."""
    t = group.tensors.get(name)
    if t is None:
        raise ImportCheckpointError(
            f"missing key {group.key(name)!r} ({what}, expected shape {_shape(shape)})"
        )
    if tuple(t.shape) != tuple(shape):
        raise ImportCheckpointError(
            f"key {group.key(name)!r} ({what}) has shape {_shape(t.shape)}, expected "
            f"{_shape(shape)}"
        )
    if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
        raise ImportCheckpointError(f"key {group.key(name)!r} ({what}) holds NaN or Inf values")
    return t


def _natural(prefix: str) -> tuple[Any, ...]:
    """Sort key: the prefix's integers compared as numbers (``blocks.10`` after ``blocks.2``)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", prefix))


def split_official(
    state: Mapping[str, torch.Tensor],
) -> tuple[list[OfficialModule], dict[str, Any]]:
    """Official memory keys grouped by prefix (natural order), and the remaining keys."""
    groups: dict[str, OfficialModule] = {}
    rest: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ImportCheckpointError(f"state dict key {key!r} is not a string")
        m = _CORE.match(key)
        prefix, name = (m["prefix"], f"tucker_core.{m['c']}") if m else (None, None)
        if prefix is None:
            for cand in OFFICIAL_NAMES:
                if key == cand or key.endswith("." + cand):
                    prefix, name = key[: len(key) - len(cand)], cand
                    break
        if prefix is None or name is None:
            rest[key] = value
            continue
        if not isinstance(value, torch.Tensor):
            raise ImportCheckpointError(f"key {key!r} is not a tensor")
        groups.setdefault(prefix, OfficialModule(prefix)).tensors[name] = value
    return sorted(groups.values(), key=lambda g: _natural(g.prefix)), rest


@dataclass
class _Dims:
    """Sizes read off the first layer; every layer must have the same."""

    d_model: int
    dk: int
    heads: int
    k_side: int
    rank: int
    num_cores: int


def _layer_dims(group: OfficialModule) -> _Dims:
    keys = group.tensors.get("keys")
    if keys is None or keys.dim() != 5 or keys.shape[1] != 2:
        got = "missing" if keys is None else f"of shape {_shape(keys.shape)}"
        raise ImportCheckpointError(
            f"key {group.key('keys')!r} is {got}; the official layout is "
            "[head, 2, key_num, kdim, tucker_rank]"
        )
    heads, _, k_side, dk, rank = (int(d) for d in keys.shape)
    q = group.tensors.get("query_proj.weight")
    if q is None or q.dim() != 2:
        raise ImportCheckpointError(
            f"missing key {group.key('query_proj.weight')!r} (query projection, expected shape "
            f"[{2 * dk}, D])"
        )
    cores = sorted(int(n.split(".")[1]) for n in group.tensors if n.startswith("tucker_core."))
    if not cores or cores != list(range(len(cores))):
        raise ImportCheckpointError(
            f"layer {group.prefix!r} needs tucker_core.0 .. tucker_core.<h_c - 1> "
            f"(each [{heads}, {rank}, {rank}]), found {[f'tucker_core.{c}' for c in cores]}"
        )
    return _Dims(int(q.shape[1]), dk, heads, k_side, rank, len(cores))


def _check_common(group: OfficialModule, d: _Dims, n_virtual: int) -> dict[str, torch.Tensor]:
    """The keys v1 and v2 layers share, checked and converted to this project's layout."""
    h, r, dk = d.heads, d.rank, d.dk
    q = group.tensors.get("query_proj.weight")
    if q is not None and r > 1 and tuple(q.shape) == (2 * dk * r, d.d_model):
        raise ImportCheckpointError(
            f"key {group.key('query_proj.weight')!r} has {q.shape[0]} = 2*kdim*tucker_rank rows: "
            "per-rank queries (mem_q_for_each_tucker_rank) are not supported, only [2*kdim, D]"
        )
    keys = _expect(group, "keys", (h, 2, d.k_side, dk, r), "keys [head, 2, key_num, kdim, rank]")
    q = _expect(group, "query_proj.weight", (2 * dk, d.d_model), "query projection")
    cores = [
        _expect(group, f"tucker_core.{c}", (h, r, r), "Tucker core [head, rank, rank]")
        for c in range(d.num_cores)
    ]
    u = _expect(group, "tucker_core_u", (1, h, 1, r), "leading left singular vectors")
    v = _expect(group, "tucker_core_v", (1, h, 1, r), "leading right singular vectors")
    perm = _expect(group, "shuffle_index", (n_virtual,), "IVE shuffle index")
    if perm.dtype.is_floating_point or not torch.equal(
        torch.sort(perm.long()).values, torch.arange(n_virtual)
    ):
        raise ImportCheckpointError(
            f"key {group.key('shuffle_index')!r} is not a permutation of 0..{n_virtual - 1}"
        )
    norms = {}
    for name in ("query_norm", "keys_norm"):
        norms[f"{name}.weight"] = _expect(group, f"{name}.weight", (dk,), "LayerNorm weight")
        bias = group.tensors.get(f"{name}.bias")
        if bias is not None:
            _expect(group, f"{name}.bias", (dk,), "LayerNorm bias")
        norms[f"{name}.bias"] = torch.zeros(dk) if bias is None else bias
    _check_copy(group, "tucker_core_uv", torch.stack([u.flatten(), v.flatten()], -1), "u, v")
    _check_copy(group, "tucker_core_stacked", torch.stack(cores, 0), "the tucker_core list")
    return {
        "query.weight": q,
        "keys": keys,
        "cores": torch.stack(cores, dim=1),  # [H, h_c, r, r]
        "u": u.reshape(h, r),
        "v": v.reshape(h, r),
        "ive_perm": perm.long(),
        **norms,
    }


def _check_copy(group: OfficialModule, name: str, want: torch.Tensor, of: str) -> None:
    """An optional derived copy (NPU layout) must equal what it is derived from."""
    got = group.tensors.get(name)
    if got is None:
        return
    _expect(group, name, tuple(want.shape), f"NPU copy of {of}")
    if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-3):
        raise ImportCheckpointError(
            f"key {group.key(name)!r} (the NPU copy of {of}) disagrees with {of}"
        )


def _refuse_extra(group: OfficialModule, allowed: set[str], what: str) -> None:
    for name in sorted(group.tensors):
        if name not in allowed and not name.startswith("tucker_core."):
            raise ImportCheckpointError(f"unexpected key {group.key(name)!r} in an official {what}")


_V1_NAMES = {
    "query_proj.weight",
    "keys",
    "values_for_look_up",
    "values_proj.weight",
    "query_norm.weight",
    "query_norm.bias",
    "keys_norm.weight",
    "keys_norm.bias",
    "shuffle_index",
    "tucker_core_u",
    "tucker_core_v",
    "tucker_core_uv",
    "tucker_core_stacked",
}
_V2_NAMES = (_V1_NAMES - {"values_for_look_up"}) | {"pre_values_proj.weight"}


@dataclass
class ImportedMemory:
    """The memory half of an import: the config pieces and this project's memory tensors."""

    kind: str
    d_model: int
    n_mem: int
    ultramem: UltraMemConfig | None
    ultramemv2: UltraMemV2Config | None
    tensors: dict[str, torch.Tensor]


def convert_v1(groups: list[OfficialModule], topm: int) -> ImportedMemory:
    """Official v1 layers (each with its own ``values_for_look_up``) → ``memory_layers.<i>``."""
    d = _layer_dims(groups[0])
    vals = groups[0].tensors.get("values_for_look_up")
    if vals is None or vals.dim() != 2:
        raise ImportCheckpointError(
            f"missing key {groups[0].key('values_for_look_up')!r} (value table [knum**2, vdim])"
        )
    n, dv = (int(x) for x in vals.shape)
    knum = math.isqrt(n)
    if knum * knum != n:
        raise ImportCheckpointError(
            f"key {groups[0].key('values_for_look_up')!r} has {n} rows, not a square knum**2"
        )
    key_expand = d.k_side // knum
    if key_expand * knum != d.k_side:
        raise ImportCheckpointError(
            f"key {groups[0].key('keys')!r} has key_num={d.k_side}, not a multiple of "
            f"knum={knum} (sqrt of the value rows)"
        )
    expansion = key_expand * key_expand
    cfg = UltraMemConfig(
        knum=knum,
        expansion=expansion,
        dk=d.dk,
        dv=dv,
        heads=d.heads,
        topm=topm,
        rank=d.rank,
        num_cores=d.num_cores,
        shared_query=True,
        shared_query_norm=True,
    )
    try:
        cfg.validate(d.d_model)
    except ValueError as exc:
        raise ImportCheckpointError(f"the official v1 layers do not fit: {exc}") from None
    out: dict[str, torch.Tensor] = {}
    for i, g in enumerate(groups):
        _refuse_extra(g, _V1_NAMES, "v1 layer")
        common = _check_common(g, d, expansion * n)
        p = f"memory_layers.{i}."
        out[p + "query.weight"] = common["query.weight"]
        out[p + "q_norm_row.weight"] = common["query_norm.weight"]
        out[p + "q_norm_row.bias"] = common["query_norm.bias"]
        out[p + "k_norm.weight"] = common["keys_norm.weight"]
        out[p + "k_norm.bias"] = common["keys_norm.bias"]
        out[p + "keys"] = common["keys"].transpose(-1, -2)  # this project: [H, 2, K, r, dk]
        for name in ("cores", "u", "v", "ive_perm"):
            out[p + name] = common[name]
        out[p + "values"] = _expect(g, "values_for_look_up", (n, dv), "value table")
        out[p + "out_proj.weight"] = _expect(
            g, "values_proj.weight", (d.d_model, expansion * dv), "value projection [D, E*vdim]"
        )
    return ImportedMemory("ultramem", d.d_model, len(groups), cfg, None, out)


def convert_v2(
    groups: list[OfficialModule],
    owner: OfficialModule,
    topm: int,
    share_ratio: float,
    pre_gelu: bool,
    every: int,
) -> ImportedMemory:
    """Official v2 layers + the one value-owning module → ``v2_layers.<i>``, ``shared_table``."""
    _refuse_extra(owner, {"values_for_look_up", "pre_values_for_look_up"}, "v2 value module")
    vals = owner.tensors.get("values_for_look_up")
    if vals is None or vals.dim() != 2:
        raise ImportCheckpointError(
            f"missing key {owner.key('values_for_look_up')!r} (shared value table [A, vdim])"
        )
    total, dv = (int(x) for x in vals.shape)
    n_mem = len(groups)
    knum = math.isqrt(total // n_mem)
    if knum * knum * n_mem != total:
        raise ImportCheckpointError(
            f"key {owner.key('values_for_look_up')!r} has {total} rows, not knum**2 * {n_mem} "
            f"for the {n_mem} memory layers found"
        )
    pre = owner.tensors.get("pre_values_for_look_up")
    pre_vdim = 0 if pre is None else int(pre.shape[-1]) if pre.dim() == 2 else -1
    if pre is not None:
        _expect(owner, "pre_values_for_look_up", (total, max(pre_vdim, 0)), "shared pre-values")
    if not 0 < share_ratio <= 1:
        raise ImportCheckpointError(f"share_ratio={share_ratio} must lie in (0, 1]")
    d = _layer_dims(groups[0])
    base = UltraMemV2Config(knum=knum, share_ratio=share_ratio)
    knum_w = base.window_knum(n_mem)
    key_expand = d.k_side // knum_w if knum_w else 0
    if knum_w < 1 or key_expand * knum_w != d.k_side:
        raise ImportCheckpointError(
            f"key {groups[0].key('keys')!r} has key_num={d.k_side}, not a multiple of the "
            f"window's knum'={knum_w} that share_ratio={share_ratio} gives over {total} rows; "
            "pass the share_ratio the checkpoint was trained with"
        )
    expansion = key_expand * key_expand
    cfg = UltraMemV2Config(
        knum=knum,
        expansion=expansion,
        dk=d.dk,
        dv=dv,
        heads=d.heads,
        topm=topm,
        rank=d.rank,
        num_cores=d.num_cores,
        pre_vdim=pre_vdim,
        pre_gelu=pre_gelu,
        every=every,
        share_ratio=share_ratio,
    )
    try:
        cfg.validate(d.d_model)
        cfg.validate_layers(n_mem)
    except ValueError as exc:
        raise ImportCheckpointError(f"the official v2 layers do not fit: {exc}") from None
    window = cfg.window_rows(n_mem)
    out: dict[str, torch.Tensor] = {
        "shared_table.values": _expect(owner, "values_for_look_up", (total, dv), "shared values"),
        "shared_table.pre_values": pre if pre is not None else torch.zeros(total, 0),
    }
    for i, g in enumerate(groups):
        _refuse_extra(g, _V2_NAMES, "v2 layer")
        common = _check_common(g, d, expansion * window)
        p = f"v2_layers.{i}."
        out[p + "query.weight"] = common["query.weight"]
        out[p + "query_norm.weight"] = common["query_norm.weight"]
        out[p + "query_norm.bias"] = common["query_norm.bias"]
        out[p + "key_norm.weight"] = common["keys_norm.weight"]
        out[p + "key_norm.bias"] = common["keys_norm.bias"]
        for name in ("keys", "cores", "u", "v", "ive_perm"):
            out[p + name] = common[name]  # keys: the same [H, 2, K, dk, r] layout
        proj = g.tensors.get("values_proj.weight")
        if proj is not None and proj.dim() == 2 and proj.shape[1] != dv and proj.shape[1] % dv == 0:
            raise ImportCheckpointError(
                f"key {g.key('values_proj.weight')!r} has shape {_shape(proj.shape)}: "
                f"value_expand_time={proj.shape[1] // dv} > 1 is not supported for v2 "
                f"(expected [{d.d_model}, {dv}])"
            )
        out[p + "out_proj.weight"] = _expect(
            g, "values_proj.weight", (d.d_model, dv), "value projection [D, vdim]"
        )
        if pre_vdim > 0:
            out[p + "pre_query.weight"] = _expect(
                g, "pre_values_proj.weight", (pre_vdim, d.d_model), "pre-value projection"
            )
        elif "pre_values_proj.weight" in g.tensors:
            raise ImportCheckpointError(
                f"key {g.key('pre_values_proj.weight')!r} has no pre-values to project: "
                f"{owner.key('pre_values_for_look_up')!r} is missing"
            )
    return ImportedMemory("ultramemv2", d.d_model, n_mem, None, cfg, out)


def classify(
    groups: list[OfficialModule],
) -> tuple[str, list[OfficialModule], OfficialModule | None]:
    """``("v1", layers, None)`` or ``("v2", layers, value_owner)``; mixed layouts are refused."""
    if not groups:
        raise ImportCheckpointError(
            "the state dict has no official memory-layer keys (query_proj.weight, keys, "
            "values_for_look_up, tucker_core.<c>, shuffle_index, ...)"
        )
    layers = [g for g in groups if "keys" in g.tensors or "query_proj.weight" in g.tensors]
    owners = [g for g in groups if g not in layers]
    with_values = [g for g in layers if "values_for_look_up" in g.tensors]
    if with_values and (owners or len(with_values) != len(layers)):
        raise ImportCheckpointError(
            f"the state dict mixes v1 layers (own values_for_look_up, e.g. "
            f"{with_values[0].prefix!r}) with v2 layers or a v2 value module; import one kind"
        )
    if with_values:
        return "v1", layers, None
    if len(owners) != 1 or not layers:
        found = [g.prefix for g in owners]
        raise ImportCheckpointError(
            "an official v2 state dict has memory layers and exactly one value module holding "
            f"values_for_look_up (+ pre_values_for_look_up); found value modules {found} and "
            f"{len(layers)} layer(s)"
        )
    return "v2", layers, owners[0]


@dataclass
class Backbone:
    """LM sizes that the memory layers do not determine."""

    n_layers: int | None = None
    n_heads: int = 4
    d_ff: int | None = None
    vocab_size: int | None = None
    max_seq: int | None = None
    memory_spec: str | None = None


def _lm_config(
    mem: ImportedMemory, bb: Backbone, rest: Mapping[str, Any], model_id: str
) -> LMConfig:
    d = mem.d_model
    tok, pos = rest.get("tok_emb.weight"), rest.get("pos_emb.weight")
    blocks = {int(m[1]) for k in rest if (m := re.match(r"blocks\.(\d+)\.", k))}
    w_in = rest.get("blocks.0.ffn.w_in.weight")
    sizes = {
        "d_ff": int(w_in.shape[0]) if isinstance(w_in, torch.Tensor) else 4 * d,
        "vocab_size": int(tok.shape[0]) if isinstance(tok, torch.Tensor) else 256,
        "max_seq": int(pos.shape[0]) if isinstance(pos, torch.Tensor) else 256,
    }
    every = mem.ultramemv2.every if mem.ultramemv2 else 1
    n_layers = bb.n_layers or (max(blocks) + 1 if blocks else 0)
    if not n_layers:
        n_layers = mem.n_mem * every if mem.kind == "ultramemv2" else 2 * mem.n_mem
    spec = bb.memory_spec
    if spec is None and mem.kind == "ultramem":
        spec = ",".join(f"{2 * i}:{2 * i + 1}" for i in range(mem.n_mem))
    data: dict[str, Any] = {
        "kind": mem.kind,
        "d_model": d,
        "n_layers": n_layers,
        "n_heads": bb.n_heads,
        "d_ff": bb.d_ff or sizes["d_ff"],
        "vocab_size": bb.vocab_size or sizes["vocab_size"],
        "max_seq": bb.max_seq or sizes["max_seq"],
        "memory_spec": spec or "",
        "model_id": model_id,
    }
    if mem.ultramem is not None:
        data["ultramem"] = mem.ultramem
    if mem.ultramemv2 is not None:
        data["ultramemv2"] = mem.ultramemv2
    try:
        cfg = LMConfig(**data)
    except ValueError as exc:
        raise ImportCheckpointError(
            f"the imported model's configuration is invalid: {exc}"
        ) from None
    n_found = (
        len(cfg.memory_pairs())
        if mem.kind == "ultramem"
        else len(cfg.ultramemv2.layer_blocks(cfg.n_layers))
    )
    if n_found != mem.n_mem:
        raise ImportCheckpointError(
            f"the state dict has {mem.n_mem} memory layers but n_layers={cfg.n_layers} with "
            + (f"memory_spec {cfg.memory_spec!r}" if mem.kind == "ultramem" else f"every={every}")
            + f" places {n_found}"
        )
    return cfg


def load_state_file(path: str | Path) -> dict[str, Any]:
    """A ``torch.save``'d state dict (or ``{"model"|"state_dict": state_dict}``), tensors only."""
    path = Path(path)
    if not path.is_file():
        raise ImportCheckpointError(f"{path} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is "not a state dict"
        raise ImportCheckpointError(
            f"{path} is not a torch state-dict file: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and set(obj) == {wrapper} and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ImportCheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def import_official(
    state: Mapping[str, Any],
    out: str | Path,
    *,
    topm: int,
    share_ratio: float = 1.0,
    pre_gelu: bool = True,
    every: int = 1,
    memory_only: bool = False,
    drop_other_keys: bool = False,
    backbone: Backbone | None = None,
    model_id: str = "official-import",
    seed: int = 0,
    source: str = "",
) -> MemoryLM:
    """Convert an official-layout state dict into this project's checkpoint directory ``out``.

    ``topm`` is the official ``knn``; ``share_ratio``, ``pre_gelu`` (``mem_use_glu_act``) and
    ``every`` apply to v2. ``drop_other_keys`` (memory-only imports only) discards every key
    that is not an official memory name — an official OLMo backbone, say — and records how many
    in ``config.json``. Raises :class:`ImportCheckpointError` naming any unknown, missing or
    misshaped key. Returns the model that was written."""
    if topm < 1:
        raise ImportCheckpointError(f"topm={topm} must be >= 1")
    if drop_other_keys and not memory_only:
        raise ImportCheckpointError(
            "--drop-other-keys (drop_other_keys) discards the backbone: it needs --memory-only"
        )
    groups, rest = split_official(state)
    dropped = len(rest) if drop_other_keys else 0
    if drop_other_keys:
        rest = {}
    kind, layers, owner = classify(groups)
    if kind == "v1":
        mem = convert_v1(layers, topm)
    else:
        assert owner is not None
        mem = convert_v2(layers, owner, topm, share_ratio, pre_gelu, every)
    cfg = _lm_config(mem, backbone or Backbone(), rest, model_id)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        model = MemoryLM(cfg)
    target = model.state_dict()
    expected_backbone = [k for k in target if not k.startswith(_MEMORY_PREFIXES)]
    for key in rest:
        if key not in target or key.startswith(_MEMORY_PREFIXES):
            raise ImportCheckpointError(
                f"unknown key {key!r}: neither an official memory-layer parameter nor one of this "
                f"project's backbone parameters ({', '.join(expected_backbone[:4])}, ...); "
                "with --memory-only, --drop-other-keys discards such keys"
            )
    if rest:
        missing = [k for k in expected_backbone if k not in rest]
        if missing:
            raise ImportCheckpointError(
                f"missing backbone key {missing[0]!r} (expected shape "
                f"{_shape(target[missing[0]].shape)}; {len(missing)} missing in all)"
            )
        if memory_only:
            raise ImportCheckpointError(
                "memory-only import was asked for, but the state dict has backbone keys "
                f"(e.g. {next(iter(rest))!r}): drop --memory-only to import them"
            )
    elif not memory_only:
        raise ImportCheckpointError(
            "the state dict has no backbone keys in this project's names (tok_emb.weight, "
            "blocks.<i>..., ln_out.*): pass --memory-only (memory_only=True) to import just the "
            "memory layers (the backbone is then a random init that only `export` accepts)"
        )
    new = {**mem.tensors, **rest}
    for key, value in new.items():
        want = target[key]
        if not isinstance(value, torch.Tensor):
            raise ImportCheckpointError(f"key {key!r} is not a tensor")
        if tuple(value.shape) != tuple(want.shape):
            raise ImportCheckpointError(
                f"key {key!r} has shape {_shape(value.shape)}, expected {_shape(want.shape)}"
            )
        if value.dtype.is_floating_point and not torch.isfinite(value).all():
            raise ImportCheckpointError(f"key {key!r} holds NaN or Inf values")
        target[key] = value.detach().to(want.dtype).contiguous()
    model.load_state_dict(target, strict=True)
    model.eval()
    info: dict[str, Any] = {
        "format": f"official-{kind}",
        "memory_only": memory_only,
        "source": source,
    }
    if drop_other_keys:
        info["dropped_keys"] = dropped
    save_pretrained(model, out, extra={"imported": info})
    return model


__all__ = [
    "OFFICIAL_NAMES",
    "Backbone",
    "OfficialModule",
    "ImportedMemory",
    "classify",
    "convert_v1",
    "convert_v2",
    "import_official",
    "load_state_file",
    "split_official",
]
