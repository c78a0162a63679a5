"""Top-k routed mixture-of-experts FFN baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ultramem_dist.model.config import MoEConfig


class MoEFFN(nn.Module):
    """Softmax router, top-k experts per token (weights renormalised), Switch-style balance loss.

    Only the experts that received tokens run, so decode cost grows with the number of distinct
    experts a batch touches, as in a real MoE server.
    """

    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig) -> None:
        super().__init__()
        cfg.validate(d_model)
        self.cfg = cfg
        self.d_model = d_model
        self.d_expert = cfg.d_expert or max(1, d_ff // cfg.top_k)
        n, de = cfg.n_experts, self.d_expert
        self.router = nn.Linear(d_model, n, bias=False)
        self.w_in = nn.Parameter(torch.randn(n, d_model, de) * d_model**-0.5)
        self.w_out = nn.Parameter(torch.randn(n, de, d_model) * de**-0.5)
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        probs = torch.softmax(self.router(flat), dim=-1)
        top_p, top_e = probs.topk(self.cfg.top_k, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        if self.training:
            frac = F.one_hot(top_e, self.cfg.n_experts).float().sum(1).mean(0) / self.cfg.top_k
            self.last_aux_loss = (
                self.cfg.aux_weight * self.cfg.n_experts * (frac * probs.mean(0)).sum()
            )
        out = torch.zeros_like(flat)
        token_ids = torch.arange(flat.shape[0], device=flat.device).repeat_interleave(
            self.cfg.top_k
        )
        expert_ids = top_e.reshape(-1)
        gate = top_p.reshape(-1)
        order = torch.argsort(expert_ids, stable=True)
        counts = torch.bincount(expert_ids, minlength=self.cfg.n_experts).tolist()
        start = 0
        for e, cnt in enumerate(counts):
            if cnt == 0:
                continue
            sel = order[start : start + cnt]
            start += cnt
            tok = token_ids[sel]
            h = F.gelu(flat[tok] @ self.w_in[e]) @ self.w_out[e]
            out.index_add_(0, tok, h * gate[sel, None])
        return out.reshape(shape)

    @property
    def sparse_param_count(self) -> int:
        return self.w_in.numel() + self.w_out.numel()

    @property
    def activated_param_count(self) -> int:
        return self.router.weight.numel() + self.cfg.top_k * 2 * self.d_model * self.d_expert
