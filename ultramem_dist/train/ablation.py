"""The UltraMem paper's ablation ladder (arXiv 2411.12364, Table 2) as configs of the one layer.

Rung 0 is a PKM-like :class:`~ultramem_dist.model.UltraMemLayer` (softmax over the top-m scores,
Dv = D, no projector, a query per head, one in-place layer, no LayerNorm, no IVE, additive
product keys, one core, PKM init, no value-LR decay); every later rung turns one of the paper's
steps on, and the last rung is exactly ``preset(name, "ultramem")`` trained with the default
:class:`~ultramem_dist.train.TrainConfig`. See docs/ablation.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any

from ultramem_dist.model import LMConfig, preset

PAPER_SOURCE = "arXiv 2411.12364 (UltraMem, ICLR 2025), Table 2, PKM-151M-x10, C4 validation loss"
PAPER_VAL_LOSS: dict[str, float] = {
    "pkm": 2.828,
    "+rm softmax": 2.822,
    "+half vdim+proj": 2.800,
    "+share query": 2.803,
    "+split big mem&skip": 2.788,
    "+query/key LN": 2.789,
    "+IVE": 2.772,
    "+TDQKR": 2.764,
    "+MCS": 2.761,
    "+improved init": 2.758,
    "+value lr decay": 2.736,
}
"""Validation loss of each row of the paper's Table 2 (its last row, "+query conv", 2.736, is not
part of this ladder: the UltraMem layer here has no query convolution)."""
PAPER_VAL_DELTA: dict[str, float] = {
    "+rm softmax": -0.006,
    "+half vdim+proj": -0.022,
    "+share query": +0.003,
    "+split big mem&skip": -0.015,
    "+query/key LN": +0.001,
    "+IVE": -0.017,
    "+TDQKR": -0.008,
    "+MCS": -0.003,
    "+improved init": -0.003,
    "+value lr decay": -0.022,
}
"""Each step's validation-loss change as printed in the paper's Table 2 (vs the row above)."""
PAPER_TOTAL_DELTA = -0.092
"""The paper's "Total Diff" of validation loss, PKM → UltraMem (its query-conv row adds 0.000)."""


@dataclass
class Rung:
    """One config of the ladder: the model, the TrainConfig fields it overrides, and what the
    step changed relative to the rung before it."""

    name: str
    model: LMConfig
    train_overrides: dict[str, Any] = field(default_factory=dict)
    changed: tuple[str, ...] = ()


def _with(cfg: LMConfig, **ultramem: Any) -> LMConfig:
    """A deep copy of ``cfg`` with UltraMem fields replaced (``memory_spec`` is top-level)."""
    out = copy.deepcopy(cfg)
    spec = ultramem.pop("memory_spec", None)
    if spec is not None:
        out.memory_spec = spec
    out.ultramem = replace(out.ultramem, **ultramem)
    out.validate()
    return out


def ablation_ladder(preset_name: str = "tiny") -> list[Rung]:
    """The 11 rungs PKM → UltraMem for ``preset_name``'s UltraMem model (two skip layers).

    Sizes are kept equal along the ladder: the single PKM layer has the rows of both UltraMem
    layers' value parameters (``knum`` with ``knum**2 * D = 2 * knum_final**2 * D/2``) and reads
    as many value floats per token; halving Dv doubles its rows (``knum * sqrt(2)``, rounded down)
    and its top-m; splitting it returns to the final ``knum`` and ``topm`` per layer.
    """
    final = preset(preset_name, "ultramem")
    fu = final.ultramem
    pairs = final.memory_pairs()
    if len(pairs) != 2 or fu.dv not in (0, final.d_model // 2):
        raise ValueError(f"preset {preset_name!r} is not a two-layer Dv = D/2 UltraMem model")
    mid = final.n_layers // 2
    base = _with(
        final,
        memory_spec=f"{mid}:{mid}",
        softmax=True,
        dv=final.d_model,
        value_proj=False,
        shared_query=False,
        qk_norm=False,
        expansion=1,
        tdqkr=False,
        num_cores=1,
        official_init=False,
    )
    half_knum = math.isqrt(2 * fu.knum * fu.knum)
    steps: list[tuple[str, dict[str, Any]]] = [
        ("+rm softmax", {"softmax": False}),
        (
            "+half vdim+proj",
            {"dv": fu.dv, "value_proj": True, "knum": half_knum, "topm": 2 * fu.topm},
        ),
        ("+share query", {"shared_query": True}),
        (
            "+split big mem&skip",
            {"memory_spec": final.memory_spec, "knum": fu.knum, "topm": fu.topm},
        ),
        ("+query/key LN", {"qk_norm": True}),
        ("+IVE", {"expansion": fu.expansion}),
        ("+TDQKR", {"tdqkr": True}),
        ("+MCS", {"num_cores": fu.num_cores}),
        ("+improved init", {"official_init": True}),
        ("+value lr decay", {}),  # a TrainConfig step: the value LR multiplier decays 4x -> 1x
    ]
    no_decay = {"value_lr_start": 1.0}  # value_lr_end is 1.0 already: a constant 1x
    rungs = [Rung("pkm", base, dict(no_decay))]
    for name, changes in steps:
        overrides = dict(no_decay) if changes else {}
        changed = tuple(sorted(changes)) if changes else tuple(sorted(no_decay))
        rungs.append(Rung(name, _with(rungs[-1].model, **changes), overrides, changed))
    return rungs


__all__ = [
    "PAPER_SOURCE",
    "PAPER_TOTAL_DELTA",
    "PAPER_VAL_DELTA",
    "PAPER_VAL_LOSS",
    "Rung",
    "ablation_ladder",
]
