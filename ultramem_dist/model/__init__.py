"""Pure-torch models: UltraMem, PKM and MoE layers and the decoder LM that wires them."""

from ultramem_dist.model.config import (
    LMConfig,
    MoEConfig,
    PKMConfig,
    UltraMemConfig,
    parse_memory_spec,
    preset,
)
from ultramem_dist.model.io import load_config, load_pretrained, save_pretrained
from ultramem_dist.model.lm import KVCache, MemoryLM
from ultramem_dist.model.moe import MoEFFN
from ultramem_dist.model.pkm import PKMLayer
from ultramem_dist.model.selection import Selection, ValueBackend
from ultramem_dist.model.ultramem import UltraMemLayer

__all__ = [
    "KVCache",
    "LMConfig",
    "MemoryLM",
    "MoEConfig",
    "MoEFFN",
    "PKMConfig",
    "PKMLayer",
    "Selection",
    "UltraMemConfig",
    "UltraMemLayer",
    "ValueBackend",
    "load_config",
    "load_pretrained",
    "parse_memory_spec",
    "preset",
    "save_pretrained",
]
