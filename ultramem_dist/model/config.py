"""Configuration dataclasses of the model package; every field has a default and is validated."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

ModelKind = Literal["dense", "pkm", "moe", "ultramem", "ultramemv2"]
MODEL_KINDS: tuple[str, ...] = ("dense", "pkm", "moe", "ultramem", "ultramemv2")


@dataclass
class UltraMemConfig:
    """One UltraMem memory layer (TDQKR + IVE + MCS)."""

    knum: int = 64
    """Base keys per side of the *physical* table; N = knum**2 physical value rows."""
    expansion: int = 4
    """IVE expansion E (a perfect square): E virtual blocks share the physical table."""
    dk: int = 64
    """Width of each query half (row half, column half) and of each key vector."""
    dv: int = 0
    """Value width; 0 means d_model // 2 (the paper's choice)."""
    heads: int = 2
    """Memory heads H; each selects its own top-m."""
    topm: int = 16
    """Rows selected per head (m)."""
    rank: int = 2
    """Tucker rank r of the key scores."""
    num_cores: int = 2
    """MCS cores h_c; core c weights value columns [c*Dv/h_c, (c+1)*Dv/h_c)."""
    shared_query: bool = True
    """One query shared by all heads (official code); False gives every head its own query."""
    aux_alpha: float = 0.0
    """Weight of the singular-value aux loss on non-leading singular values of the cores."""
    aux_tau: float = 0.15
    """Margin tau of the aux loss: alpha * mean(relu(sigma_i - tau)**2)."""
    aux_per_core: bool = False
    """False (official code): the aux loss penalises the non-leading singular values of the
    *summed* cores ``sum_c C_c`` per head; True: of every core separately (the older form)."""
    shared_query_norm: bool = False
    """True (official code): one LayerNorm for the row and the column query halves; False: one
    LayerNorm per half. Imported official checkpoints want True."""
    perm_seed: int = 0
    """Seed of the fixed IVE permutation of the virtual rows."""
    # ---- ablation switches (docs/ablation.md); the defaults are the UltraMem layer ----
    softmax: bool = False
    """True (PKM): the pooling weights are a softmax over each head's top-m scores (per core);
    False (UltraMem): the raw scores are the weights."""
    value_proj: bool = True
    """True: ``Linear(E*Dv -> D)`` after pooling; False (PKM): no projector, the pooled values
    are the output (needs ``E*Dv == d_model``)."""
    qk_norm: bool = True
    """True: LayerNorm on the query halves and on the keys; False (PKM): none."""
    tdqkr: bool = True
    """True: Tucker-decomposed scores of rank ``rank``; False (PKM): additive product-key scores
    ``s_row[i] + s_col[j]`` (one key per side and key, ``rank`` unused), computed as the rank-2
    TDQKR special case ``S_row = [s, 1]``, ``S_col = [1, t]``, ``C = I`` (needs one core)."""
    official_init: bool = True
    """True: the official code's init (see the design brief); False (PKM): PyTorch-default
    Linear/LayerNorm init and values ~ N(0, 1/Dv)."""
    tdqkr_candidates: str = "paper"
    """TDQKR pre-selection: "paper" (top m of u.S_row and of v.S_col) or "two_sided" (half
    from the top, half from the bottom of each, so pairs of large negative factors compete)."""

    @property
    def n_rows(self) -> int:
        return self.knum * self.knum

    @property
    def key_rank(self) -> int:
        """Key vectors per side and key: ``rank`` with TDQKR, 1 for additive product keys."""
        return self.rank if self.tdqkr else 1

    @property
    def side(self) -> int:
        """K = sqrt(E) * knum keys per side; the virtual grid has K*K = E*N cells."""
        return math.isqrt(self.expansion) * self.knum

    def validate(self, d_model: int) -> None:
        if self.knum < 1 or self.dk < 1 or self.heads < 1 or self.rank < 1:
            raise ValueError("ultramem knum, dk, heads and rank must all be >= 1")
        root = math.isqrt(self.expansion)
        if self.expansion < 1 or root * root != self.expansion:
            raise ValueError(
                f"ultramem expansion E={self.expansion} must be a perfect square (1, 4, 9, 16, ...)"
            )
        dv = self.dv or d_model // 2
        if self.num_cores < 1 or dv % self.num_cores:
            raise ValueError(
                f"ultramem value width Dv={dv} is not divisible by num_cores={self.num_cores}"
            )
        if not 1 <= self.topm <= self.side:
            raise ValueError(
                f"ultramem topm m={self.topm} must be between 1 and K=sqrt(E)*knum={self.side}"
            )
        if self.aux_alpha < 0:
            raise ValueError("ultramem aux_alpha must be >= 0")
        if not self.value_proj and self.expansion * dv != d_model:
            raise ValueError(
                f"ultramem without a value projector needs E*Dv == d_model, got "
                f"E={self.expansion} * Dv={dv} != {d_model}"
            )
        if not self.tdqkr and self.num_cores != 1:
            raise ValueError(
                f"ultramem additive product keys (tdqkr=False) have one score per cell: "
                f"num_cores must be 1, got {self.num_cores}"
            )
        if self.tdqkr_candidates not in ("paper", "two_sided"):
            raise ValueError(
                f"ultramem tdqkr_candidates={self.tdqkr_candidates!r} must be 'paper' or "
                f"'two_sided'"
            )


@dataclass
class UltraMemV2Config:
    """UltraMemV2 memory layers (arXiv 2508.18756): one value table shared by every layer.

    Layer ``l`` owns its query, keys, cores, IVE permutation and ``Linear(Dv -> D)``; its
    window of the shared table of ``A = knum**2 * L_mem`` rows starts at ``offset = l * knum**2``
    and holds :meth:`window_rows` rows (``knum**2`` by default; see ``share_ratio``); physical row
    ``((z mod window) + offset) mod A``. The virtual blocks of IVE are summed
    (``value_expand_time = 1``). With ``pre_vdim > 0`` each selected row's score is multiplied by
    ``GELU(pre_values[row] . (W_pre x))`` (PEER-style).
    """

    knum: int = 64
    """Base keys per side; value_num = knum**2 rows per layer."""
    expansion: int = 1
    """Virtual grid factor E (perfect square); K = sqrt(E)*knum keys per side; blocks summed."""
    dk: int = 64
    """Width of each query half and of each key vector."""
    dv: int = 0
    """Value width; 0 means d_model // 2."""
    heads: int = 2
    """Memory heads H (one shared query)."""
    topm: int = 16
    """Rows selected per head (m)."""
    rank: int = 2
    """Tucker rank r."""
    num_cores: int = 2
    """MCS cores h_c; core c weights value columns [c*Dv/h_c, (c+1)*Dv/h_c)."""
    pre_vdim: int = 16
    """Width of the pre-values (0 disables the pre-value activation)."""
    pre_gelu: bool = True
    """Apply GELU to the pre-value dot product (False: use it raw)."""
    every: int = 1
    """A memory layer in every ``every``-th block (1: every block, as in the paper)."""
    value_std: float = 0.02
    """Init std of the shared values (and pre-values); 0 means the paper's Eq. 26 value
    (:func:`eq26_value_std`, with the top-1 score variance measured on the fresh layers)."""
    perm_seed: int = 0
    """Seed of the per-layer IVE permutations (layer l uses perm_seed + l)."""
    share_ratio: float = 0.0
    """Fraction of the shared table each layer addresses, by the official rule: window
    ``knum' = floor(sqrt(A * share_ratio))``, ``knum'**2`` rows, ``sqrt(E)*knum'`` keys per side,
    offsets still ``l * knum**2`` (so windows overlap; 1.0 = every layer sees the whole table,
    the official default). 0 (this project's default): disjoint windows of ``knum**2`` rows,
    which is the official rule at ``share_ratio = 1/L_mem``."""

    @property
    def n_rows(self) -> int:
        return self.knum * self.knum

    @property
    def side(self) -> int:
        return math.isqrt(self.expansion) * self.knum

    def window_knum(self, num_layers: int) -> int:
        """Keys per side of the physical window one layer addresses (before the ``sqrt(E)``
        factor): ``knum`` for ``share_ratio == 0``, else ``floor(sqrt(knum**2 * L * ratio))``."""
        if self.share_ratio == 0:
            return self.knum
        # the epsilon keeps e.g. ratio = 1/L from rounding knum**2 * L * ratio just below knum**2
        return math.isqrt(int(self.n_rows * num_layers * self.share_ratio + 1e-6))

    def window_rows(self, num_layers: int) -> int:
        """Rows of one layer's window of the shared table (``value_num`` of the official code)."""
        return self.window_knum(num_layers) ** 2

    def window_side(self, num_layers: int) -> int:
        """Keys per side of one layer: ``sqrt(E) * window_knum``."""
        return math.isqrt(self.expansion) * self.window_knum(num_layers)

    def validate_layers(self, num_layers: int) -> None:
        """The checks that need the number of memory layers (window size vs top-m)."""
        side = self.window_side(num_layers)
        if side < 1:
            raise ValueError(
                f"ultramemv2 share_ratio={self.share_ratio} leaves no rows per layer with "
                f"{num_layers} memory layers of knum={self.knum}"
            )
        if self.topm > side:
            raise ValueError(
                f"ultramemv2 topm m={self.topm} is larger than the K={side} keys per side that "
                f"share_ratio={self.share_ratio} leaves each of {num_layers} layers"
            )

    def layer_blocks(self, n_layers: int) -> list[int]:
        """Block ids that carry a memory layer (memory is read and added in the same block)."""
        return list(range(self.every - 1, n_layers, self.every))

    def validate(self, d_model: int) -> None:
        if min(self.knum, self.dk, self.heads, self.rank, self.every) < 1:
            raise ValueError("ultramemv2 knum, dk, heads, rank and every must all be >= 1")
        root = math.isqrt(self.expansion)
        if self.expansion < 1 or root * root != self.expansion:
            raise ValueError(f"ultramemv2 expansion E={self.expansion} must be a perfect square")
        dv = self.dv or d_model // 2
        if self.num_cores < 1 or dv % self.num_cores:
            raise ValueError(
                f"ultramemv2 value width Dv={dv} is not divisible by num_cores={self.num_cores}"
            )
        # with share_ratio > 0 the window (so K) depends on L_mem: validate_layers checks it
        top = self.side if self.share_ratio == 0 else self.topm
        if not 1 <= self.topm <= top:
            raise ValueError(f"ultramemv2 topm m={self.topm} must be between 1 and K={self.side}")
        if self.pre_vdim < 0:
            raise ValueError("ultramemv2 pre_vdim must be >= 0")
        if self.value_std < 0:
            raise ValueError("ultramemv2 value_std must be > 0 (or 0 for the paper's Eq. 26)")
        if not 0 <= self.share_ratio <= 1:
            raise ValueError(
                f"ultramemv2 share_ratio={self.share_ratio} must lie in (0, 1] "
                f"(or be 0 for disjoint windows)"
            )


@dataclass
class PKMConfig:
    """Classic product-key memory (Lample et al. 2019): additive scores, softmax, Dv = d_model."""

    n_keys: int = 128
    """Keys per half; the table has n_keys**2 rows."""
    dk: int = 64
    """Width of each query half."""
    heads: int = 2
    """Memory heads; their pooled outputs are summed."""
    topk: int = 16
    """Rows selected per head."""

    def validate(self, d_model: int) -> None:
        if min(self.n_keys, self.dk, self.heads) < 1:
            raise ValueError("pkm n_keys, dk and heads must be >= 1")
        if not 1 <= self.topk <= self.n_keys:
            raise ValueError(f"pkm topk={self.topk} must be between 1 and n_keys={self.n_keys}")


@dataclass
class MoEConfig:
    """Top-k routed mixture of FFN experts (replaces the FFN of the listed blocks)."""

    n_experts: int = 8
    """Number of experts per MoE block."""
    top_k: int = 2
    """Experts activated per token."""
    d_expert: int = 0
    """Hidden width of each expert; 0 means d_ff // top_k (activated FFN width = d_ff)."""
    aux_weight: float = 0.01
    """Weight of the load-balancing loss (Switch Transformer form)."""

    def validate(self, d_model: int) -> None:
        if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"moe top_k={self.top_k} must be between 1 and n_experts={self.n_experts}"
            )


def parse_memory_spec(
    spec: str, n_layers: int, allow_same_block: bool = False
) -> list[tuple[int, int]]:
    """Parse ``"a:b,c:d"`` (``/`` also separates) into ``[(a, b), (c, d)]`` and validate it.

    Memory layer i reads block ``a_i``'s pre-FFN normalised activation and adds its output after
    block ``b_i``. Requires ``a < b`` (``a <= b`` for in-place layers such as PKM), blocks inside
    the model, and ``a_{i+1} > b_i`` (no overlap, in order).
    """
    if not spec.strip():
        return []
    pairs: list[tuple[int, int]] = []
    for part in spec.replace("/", ",").split(","):
        part = part.strip()
        try:
            a_str, b_str = part.split(":")
            a, b = int(a_str), int(b_str)
        except ValueError:
            raise ValueError(
                f"memory spec entry {part!r} is not of the form 'read:write' (e.g. '0:2,3:5')"
            ) from None
        if b < a or (b == a and not allow_same_block):
            raise ValueError(
                f"memory spec entry {part!r} goes backwards: the write block must come after "
                f"the read block"
            )
        if not (0 <= a < n_layers and 0 <= b < n_layers):
            raise ValueError(f"memory spec entry {part!r} names a block outside 0..{n_layers - 1}")
        if pairs and a <= pairs[-1][1]:
            raise ValueError(
                f"memory spec entry {part!r} overlaps the previous one {pairs[-1][0]}:"
                f"{pairs[-1][1]}: each read block must come after the previous write block"
            )
        pairs.append((a, b))
    return pairs


@dataclass
class LMConfig:
    """The decoder-only LM shared by all four model kinds."""

    kind: str = "ultramem"
    """Model kind: dense | pkm | moe | ultramem | ultramemv2."""
    vocab_size: int = 256
    """Vocabulary size (byte-level tokenizer: 256)."""
    d_model: int = 256
    """Model width D."""
    n_layers: int = 6
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads."""
    d_ff: int = 1024
    """Hidden width of each dense FFN."""
    max_seq: int = 256
    """Longest sequence (learned positions and KV cache size)."""
    memory_spec: str = "0:2,3:5"
    """Skip-layer wiring 'read:write,...' for pkm/ultramem ("a:a" is in place, no skip)."""
    moe_blocks: str = ""
    """Comma-separated block ids whose FFN is an MoE (moe kind); empty means every block."""
    ultramem: UltraMemConfig = field(default_factory=UltraMemConfig)
    """UltraMem layer settings (kind ultramem)."""
    pkm: PKMConfig = field(default_factory=PKMConfig)
    """PKM layer settings (kind pkm)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE settings (kind moe)."""
    ultramemv2: UltraMemV2Config = field(default_factory=UltraMemV2Config)
    """UltraMemV2 settings (kind ultramemv2; memory_spec is not used by that kind)."""
    model_id: str = "ultramem-tiny"
    """Free-form identifier stored with checkpoints and value stores."""

    def __post_init__(self) -> None:
        for name, cls in (
            ("ultramem", UltraMemConfig),
            ("pkm", PKMConfig),
            ("moe", MoEConfig),
            ("ultramemv2", UltraMemV2Config),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                known = {f.name for f in fields(cls)}
                unknown = set(value) - known
                if unknown:
                    raise ValueError(f"unknown {name} config fields: {sorted(unknown)}")
                setattr(self, name, cls(**value))
        self.validate()

    def validate(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind {self.kind!r} is not one of {', '.join(MODEL_KINDS)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if min(self.vocab_size, self.d_model, self.n_layers, self.d_ff, self.max_seq) < 1:
            raise ValueError("vocab_size, d_model, n_layers, d_ff and max_seq must be >= 1")
        if self.kind == "ultramem":
            self.ultramem.validate(self.d_model)
            self.memory_pairs()
        elif self.kind == "pkm":
            self.pkm.validate(self.d_model)
            self.memory_pairs()
        elif self.kind == "moe":
            self.moe.validate(self.d_model)
            self.moe_block_ids()
        elif self.kind == "ultramemv2":
            self.ultramemv2.validate(self.d_model)
            self.ultramemv2.validate_layers(len(self.ultramemv2.layer_blocks(self.n_layers)))

    def memory_pairs(self) -> list[tuple[int, int]]:
        if self.kind not in ("pkm", "ultramem"):
            return []
        return parse_memory_spec(self.memory_spec, self.n_layers, allow_same_block=True)

    def moe_block_ids(self) -> list[int]:
        if self.kind != "moe":
            return []
        if not self.moe_blocks.strip():
            return list(range(self.n_layers))
        ids = sorted({int(x) for x in self.moe_blocks.split(",")})
        if ids[0] < 0 or ids[-1] >= self.n_layers:
            raise ValueError(f"moe_blocks {self.moe_blocks!r} names a block outside the model")
        return ids

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**data)

    def compute_hash(self) -> str:
        """Hash of every field that changes the model's math (model_id is ignored)."""
        data = self.to_dict()
        data.pop("model_id")
        if self.kind != "ultramemv2":
            data.pop("ultramemv2")  # older configs' hashes stay what they were
        else:
            for name, default in _LATER_ULTRAMEMV2_FIELDS.items():
                if data["ultramemv2"].get(name) == default:
                    data["ultramemv2"].pop(name)
        for name, default in _LATER_ULTRAMEM_FIELDS.items():
            if data["ultramem"].get(name) == default:  # likewise for fields added later
                data["ultramem"].pop(name)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


_LATER_ULTRAMEM_FIELDS = {
    "aux_per_core": False,
    "shared_query_norm": False,
    "softmax": False,
    "value_proj": True,
    "qk_norm": True,
    "tdqkr": True,
    "official_init": True,
    "tdqkr_candidates": "paper",
}
"""UltraMemConfig fields added after checkpoints were first written, with the default that
reproduces the older behaviour: left out of the hash at that default, so a checkpoint written
before they existed keeps its hash (and ``--resume`` still accepts it)."""

_LATER_ULTRAMEMV2_FIELDS = {"share_ratio": 0.0}
"""The same for UltraMemV2Config fields added after V2 checkpoints were first written."""


def eq26_value_std(
    d_model: int,
    d_ff: int,
    topm: int,
    heads: int,
    pre_vdim: int,
    dv: int,
    num_layers: int,
    score_var: float,
) -> float:
    """UltraMemV2's principled value init (paper appendix, Eq. 26): the std ``sigma_V`` that
    makes a memory layer's output variance at init match one FFN layer's,

    ``sigma_V = (0.2 * k_inner * D / (m * H * (1 + sigma_s**2) * d_pre * Dv * L)) ** (1/4)``

    with ``k_inner = d_ff / D`` (the FFN's width ratio), ``m`` rows per head, ``H`` heads,
    ``d_pre = max(pre_vdim, 1)``, ``L`` memory layers and ``sigma_s**2`` the variance of the
    top-1 score normalised to mean 1 (``score_var``)."""
    if min(d_model, d_ff, topm, heads, dv, num_layers) < 1 or score_var < 0:
        raise ValueError("eq26_value_std needs positive sizes and score_var >= 0")
    k_inner = d_ff / d_model
    denom = topm * heads * (1.0 + score_var) * max(pre_vdim, 1) * dv * num_layers
    return (0.2 * k_inner * d_model / denom) ** 0.25


def preset(name: str, kind: str = "ultramem") -> LMConfig:
    """Named model sizes. ``tiny`` keeps every UltraMem mechanism and trains on 2 CPU cores."""
    if name == "tiny":
        return LMConfig(
            kind=kind,
            d_model=256,
            n_layers=6,
            n_heads=4,
            d_ff=768,
            max_seq=128,
            memory_spec="0:2,3:5" if kind == "ultramem" else "2:2,5:5",
            ultramem=UltraMemConfig(
                knum=64, expansion=4, dk=64, heads=2, topm=16, rank=2, num_cores=2
            ),
            pkm=PKMConfig(n_keys=128, dk=64, heads=2, topk=16),
            moe=MoEConfig(n_experts=8, top_k=2),
            ultramemv2=UltraMemV2Config(
                knum=32, expansion=4, dk=64, heads=2, topm=16, rank=2, num_cores=2, pre_vdim=32
            ),
            model_id=f"{kind}-tiny",
        )
    if name == "micro":  # for tests: seconds to build and run
        return LMConfig(
            kind=kind,
            d_model=64,
            n_layers=4,
            n_heads=2,
            d_ff=128,
            max_seq=64,
            memory_spec="0:1,2:3" if kind == "ultramem" else "1:1,3:3",
            ultramem=UltraMemConfig(
                knum=8, expansion=4, dk=16, heads=2, topm=4, rank=2, num_cores=2
            ),
            pkm=PKMConfig(n_keys=16, dk=16, heads=2, topk=4),
            moe=MoEConfig(n_experts=4, top_k=2),
            ultramemv2=UltraMemV2Config(
                knum=4, expansion=4, dk=16, heads=2, topm=4, rank=2, num_cores=2, pre_vdim=8
            ),
            model_id=f"{kind}-micro",
        )
    raise ValueError(f"unknown preset {name!r}; choose tiny or micro")
