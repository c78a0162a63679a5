"""What a memory layer hands to a value backend: rows, IVE blocks and pooling weights."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Selection:
    """Top-m selection of one memory layer for T tokens.

    ``indices`` ``[T, H*m]`` int64 physical rows, ``blocks`` ``[T, H*m]`` int64 IVE block ids,
    ``weights`` ``[T, H*m, h_c]`` float pooling weights (one per MCS core; raw scores, no softmax).
    ``pre_input`` ``[T, pre_vdim]`` (UltraMemV2 with pre-values only, else ``None``): each token's
    ``W_pre x``; the backend multiplies every entry's weights by
    ``GELU(pre_values[row] . pre_input[t])`` before pooling.
    """

    indices: torch.Tensor
    blocks: torch.Tensor
    weights: torch.Tensor
    pre_input: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    def detach(self) -> Selection:
        pre = None if self.pre_input is None else self.pre_input.detach()
        return Selection(self.indices, self.blocks, self.weights.detach(), pre)


class ValueBackend(Protocol):
    """Where a memory layer's pooled values come from (local table, remote shards, ...).

    ``submit`` must return at once; the future resolves to ``[T, E, Dv]`` pooled values (or
    ``[T, D]`` when the backend serves projector-merged tables). A selection with a
    ``pre_input`` (UltraMemV2) must be pooled with the pre-value activation.
    """

    def submit(self, table_id: str, sel: Selection) -> Future[torch.Tensor]: ...


def done_future(value: torch.Tensor) -> Future[torch.Tensor]:
    """A future that is already resolved (the local backend's answer)."""
    fut: Future[torch.Tensor] = Future()
    fut.set_result(value)
    return fut
