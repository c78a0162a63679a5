"""UltraMemV2 (arXiv 2508.18756): memory layers that share one value table, with pre-values.

Differences from :mod:`ultramem_dist.model.ultramem` (v1):

- one :class:`SharedValueTable` (``values [L*N, Dv]`` and ``pre_values [L*N, pre_vdim]``)
  serves every memory layer; layer ``l`` reads physical row
  ``((z mod W) + l*N) mod (L*N)`` for a permuted virtual id ``z``, with its window
  ``W = N`` by default or ``floor(sqrt(L*N*share_ratio))**2`` (official rule, windows overlap);
- the IVE virtual blocks are summed (``value_expand_time = 1``): one ``Linear(Dv -> D)``;
- one ``query_norm`` LayerNorm (over Dk) shared by the row and column query halves;
- each selected row's per-core score is multiplied by ``GELU(pre_values[row] . pre_input)``
  with ``pre_input = W_pre x`` (``[T, pre_vdim]``) before pooling.

Selection (TDQKR + MCS) is v1's :func:`~ultramem_dist.model.ultramem.tdqkr_topm`; pooling is the
shared :func:`~ultramem_dist.kernels.gather_pool` kernel with a single block, on the local
shared table or on a value backend's shards (:meth:`UltraMemV2Layer.start` / ``finish``: the
selection goes out with its ``pre_input``, which is ready at the same point as the query).
"""

from __future__ import annotations

import torch
from torch import nn

from ultramem_dist.kernels import gather_pool
from ultramem_dist.kernels.gather_pool import pre_value_activation
from ultramem_dist.model.config import UltraMemV2Config
from ultramem_dist.model.selection import Selection, ValueBackend, done_future
from ultramem_dist.model.ultramem import (
    PendingPool,
    ive_permutation,
    refresh_core_vectors,
    tdqkr_topm,
)


class SharedValueTable(nn.Module):
    """The value (and pre-value) rows of every UltraMemV2 layer, stored once."""

    def __init__(self, cfg: UltraMemV2Config, num_layers: int, dv: int) -> None:
        super().__init__()
        self.rows_per_layer = cfg.n_rows
        self.num_layers = num_layers
        total = cfg.n_rows * num_layers
        self.values = nn.Parameter(torch.empty(total, dv))
        self.pre_values = nn.Parameter(torch.empty(total, cfg.pre_vdim))
        # value_std == 0 (Eq. 26) needs the layers: MemoryLM calls reset_values once they exist
        self.reset_values(cfg.value_std or 0.02)

    @torch.no_grad()
    def reset_values(self, std: float) -> None:
        """Draw the values and pre-values from ``N(0, std**2)``."""
        nn.init.normal_(self.values, std=std)
        nn.init.normal_(self.pre_values, std=std)

    @property
    def total_rows(self) -> int:
        return (
            self.values.shape[0] if self.values.numel() else self.rows_per_layer * self.num_layers
        )


class UltraMemV2Layer(nn.Module):
    """One UltraMemV2 memory layer; its rows are ``[offset, offset + N)`` of the shared table."""

    def __init__(
        self, d_model: int, cfg: UltraMemV2Config, layer_index: int, num_layers: int
    ) -> None:
        super().__init__()
        cfg.validate(d_model)
        self.cfg = cfg
        self.d_model = d_model
        self.layer_index = layer_index
        self.table_id = "shared"
        self.dv = cfg.dv or d_model // 2
        cfg.validate_layers(num_layers)
        self.n_rows = cfg.window_rows(num_layers)  # this layer's window (value_num)
        self.total_rows = cfg.n_rows * num_layers
        self.offset = layer_index * cfg.n_rows
        self.k_side = cfg.window_side(num_layers)
        h, r, dk = cfg.heads, cfg.rank, cfg.dk
        self.query = nn.Linear(d_model, 2 * dk, bias=False)
        self.query_norm = nn.LayerNorm(dk)
        # official layout: [head, side, key, kdim, tucker_rank]
        self.keys = nn.Parameter(torch.empty(h, 2, self.k_side, dk, r))
        self.key_norm = nn.LayerNorm(dk)
        self.cores = nn.Parameter(torch.empty(h, cfg.num_cores, r, r))
        self.pre_query = nn.Linear(d_model, cfg.pre_vdim, bias=False) if cfg.pre_vdim > 0 else None
        self.out_proj = nn.Linear(self.dv, d_model, bias=False)
        self.register_buffer("u", torch.zeros(h, r))
        self.register_buffer("v", torch.zeros(h, r))
        self.register_buffer(
            "ive_perm",
            ive_permutation(cfg.expansion * self.n_rows, cfg.perm_seed + layer_index),
        )
        self._backend: ValueBackend | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        dk = self.cfg.dk
        for norm in (self.query_norm, self.key_norm):
            nn.init.constant_(norm.weight, dk**-0.33)
            nn.init.zeros_(norm.bias)
        nn.init.normal_(self.query.weight, std=dk**-0.5)
        nn.init.normal_(self.keys, std=dk**-0.5)
        nn.init.normal_(self.out_proj.weight, std=self.dv**-0.5)
        if self.pre_query is not None:
            nn.init.normal_(self.pre_query.weight, std=self.d_model**-0.5)
        nn.init.uniform_(self.cores, 0.0, 1.0)
        self.u.zero_()
        self.v.zero_()
        self.refresh_svd()

    @torch.no_grad()
    def refresh_svd(self) -> None:
        """Leading singular vectors of the summed cores, sign kept closest to the previous."""
        refresh_core_vectors(self.cores, self.u, self.v)

    # ----------------------------------------------------------------- selection
    def key_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-rank row/col scores ``[T, H, r, K]`` for ``x`` ``[T, D]``."""
        dk = self.cfg.dk
        q = self.query(x).view(x.shape[0], 2, dk)
        q = self.query_norm(q)  # one LayerNorm shared by both halves
        keys = self.key_norm(self.keys.transpose(-1, -2))  # [H, 2, K, r, dk]
        s_row = torch.einsum("td,hkrd->thrk", q[:, 0], keys[:, 0])
        s_col = torch.einsum("td,hkrd->thrk", q[:, 1], keys[:, 1])
        return s_row, s_col

    def select(self, x: torch.Tensor) -> Selection:
        """Top-m per head → rows of the *shared* table, block 0, per-core scores."""
        s_row, s_col = self.key_scores(x)
        virtual, scores = tdqkr_topm(s_row, s_col, self.cores, self.u, self.v, self.cfg.topm)
        t = x.shape[0]
        z = self.ive_perm[virtual.reshape(t, -1)]
        rows = (z % self.n_rows + self.offset) % self.total_rows
        return Selection(
            indices=rows,
            blocks=torch.zeros_like(rows),
            weights=scores.reshape(t, -1, self.cfg.num_cores),
        )

    def pre_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """``W_pre x`` ``[T, pre_vdim]`` (None without pre-values)."""
        return None if self.pre_query is None else self.pre_query(x)

    # ----------------------------------------------------------------- pooling
    def pool(
        self,
        table: SharedValueTable,
        sel: Selection,
        pre_input: torch.Tensor | None,
    ) -> torch.Tensor:
        """``[T, Dv]`` pooled values (pre-value activation applied to the weights)."""
        pre = {} if pre_input is None else {"pre_values": table.pre_values, "pre_input": pre_input}
        pooled = gather_pool(
            table.values, sel.indices, sel.blocks, sel.weights, 1, pre_gelu=self.cfg.pre_gelu, **pre
        )
        return pooled[:, 0]

    def set_value_backend(self, backend: ValueBackend | None) -> None:
        """Route lookups to ``backend`` (e.g. a remote store serving the shared table);
        ``None`` pools from the local :class:`SharedValueTable`."""
        self._backend = backend

    @property
    def value_backend(self) -> ValueBackend | None:
        return self._backend

    def start(self, x: torch.Tensor, table: SharedValueTable | None) -> PendingPool:
        """Issue the lookup for ``x`` ``[..., D]`` without waiting for remote values: the
        selection and its ``pre_input`` go to the backend together (local: pooled at once)."""
        shape = tuple(x.shape)
        flat = x.reshape(-1, self.d_model)
        if self._backend is None:
            if table is None:
                raise ValueError("UltraMemV2 layer has no value backend and no shared table")
            fut = done_future(self.pool(table, self.select(flat), self.pre_input(flat)))
        else:
            with torch.no_grad():
                sel = self.select(flat)
                sel.pre_input = self.pre_input(flat)
            fut = self._backend.submit(self.table_id, sel)
        return PendingPool(fut, shape)

    def finish(self, pending: PendingPool, timeout: float | None = None) -> torch.Tensor:
        """Wait for the lookup issued by :meth:`start`; returns ``[..., D]``. A remote reply
        ``[T, 1, Dv]`` (one IVE block) and a local pool ``[T, Dv]`` project alike."""
        pooled = pending.future.result(timeout=timeout)
        pooled = pooled.reshape(pooled.shape[0], self.dv)
        return self.out_proj(pooled.to(self.out_proj.weight.dtype)).reshape(pending.shape)

    def forward(self, x: torch.Tensor, table: SharedValueTable | None) -> torch.Tensor:
        return self.finish(self.start(x, table))

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"layer={self.layer_index}, offset={self.offset}, N={self.n_rows}, K={self.k_side}, "
            f"Dv={self.dv}, pre_vdim={c.pre_vdim}, H={c.heads}, m={c.topm}, r={c.rank}, "
            f"h_c={c.num_cores}"
        )

    @property
    def activated_param_count(self) -> int:
        c = self.cfg
        pre = self.pre_query.weight.numel() if self.pre_query is not None else 0
        return (
            self.query.weight.numel()
            + self.cores.numel()
            + pre
            + c.heads * c.topm * (self.dv + c.pre_vdim)
            + self.out_proj.weight.numel()
            + 4 * c.dk
        )


@torch.no_grad()
def measure_top1_score_var(layer: UltraMemV2Layer, n_samples: int = 2048, seed: int = 0) -> float:
    """``sigma_s**2`` of Eq. 26: the variance of every head's top-1 selection score (summed over
    the cores), normalised to mean 1, for unit-variance inputs ``x ~ N(0, I)`` through ``layer``
    as it is now (call on a freshly initialised layer). A private generator leaves the global
    RNG alone."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, layer.d_model, generator=gen)
    scores = layer.select(x).weights.sum(-1).view(n_samples, layer.cfg.heads, layer.cfg.topm)
    top1 = scores.max(-1).values.double()
    mean = top1.mean().abs().clamp_min(1e-12)
    return float((top1 / mean).var())


__all__ = [
    "SharedValueTable",
    "UltraMemV2Layer",
    "measure_top1_score_var",
    "pre_value_activation",
]
