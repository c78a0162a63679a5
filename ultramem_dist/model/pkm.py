"""Product-key memory baseline (Lample et al. 2019): additive half scores, softmax, Dv = D."""

from __future__ import annotations

import torch
from torch import nn

from ultramem_dist.kernels import gather_pool
from ultramem_dist.model.config import PKMConfig


class PKMLayer(nn.Module):
    """Classic PKM: top-k per half, k*k candidate sums, final top-k, softmax, weighted value sum
    (heads summed). Uses the shared gather-pool kernel with one block and one core."""

    def __init__(self, d_model: int, cfg: PKMConfig) -> None:
        super().__init__()
        cfg.validate(d_model)
        self.cfg = cfg
        self.d_model = d_model
        self.query = nn.Linear(d_model, cfg.heads * 2 * cfg.dk, bias=False)
        self.keys = nn.Parameter(torch.randn(cfg.heads, 2, cfg.n_keys, cfg.dk) * cfg.dk**-0.5)
        self.values = nn.Parameter(torch.randn(cfg.n_keys**2, d_model) * d_model**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        t, c = flat.shape[0], self.cfg
        q = self.query(flat).view(t, c.heads, 2, c.dk)
        s1 = torch.einsum("thd,hnd->thn", q[:, :, 0], self.keys[:, 0])
        s2 = torch.einsum("thd,hnd->thn", q[:, :, 1], self.keys[:, 1])
        v1, i1 = s1.topk(c.topk, dim=-1)
        v2, i2 = s2.topk(c.topk, dim=-1)
        cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).reshape(t, c.heads, -1)
        best_v, best = cand.topk(c.topk, dim=-1)
        rows = i1.gather(-1, best // c.topk) * c.n_keys + i2.gather(-1, best % c.topk)
        weights = torch.softmax(best_v, dim=-1)
        pooled = gather_pool(
            self.values,
            rows.reshape(t, -1),
            torch.zeros_like(rows).reshape(t, -1),
            weights.reshape(t, -1, 1),
            1,
        )
        return pooled.reshape(shape)

    @property
    def sparse_param_count(self) -> int:
        return self.values.numel()

    @property
    def activated_param_count(self) -> int:
        return self.query.weight.numel() + self.cfg.heads * self.cfg.topk * self.d_model
