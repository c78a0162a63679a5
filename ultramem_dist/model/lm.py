"""A small decoder-only LM shared by the dense, MoE, PKM and UltraMem models.

Skip-layer wiring: memory layer i reads block ``a_i``'s post-attention, pre-FFN normalised
activation and its output joins the residual stream after block ``b_i``. The lookup is *started*
at block ``a_i`` and *finished* after block ``b_i``, so a remote backend's gather runs while
blocks ``a_i..b_i`` compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ultramem_dist.model.config import LMConfig, eq26_value_std
from ultramem_dist.model.moe import MoEFFN
from ultramem_dist.model.pkm import PKMLayer
from ultramem_dist.model.ultramem import PendingPool, UltraMemLayer
from ultramem_dist.model.ultramemv2 import (
    SharedValueTable,
    UltraMemV2Layer,
    measure_top1_score_var,
)


@dataclass
class KVCache:
    """Preallocated per-block key/value cache for greedy decoding."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, cfg: LMConfig, batch: int, dtype: torch.dtype = torch.float32) -> KVCache:
        hd = cfg.d_model // cfg.n_heads
        shape = (batch, cfg.n_heads, cfg.max_seq, hd)
        return cls(
            [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)],
            [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)],
        )


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start = cache.length
            cache.keys[layer][:, :, start : start + s] = k
            cache.values[layer][:, :, start : start + s] = v
            k_all = cache.keys[layer][:, :, : start + s]
            v_all = cache.values[layer][:, :, : start + s]
            if start == 0:
                y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
            elif s == 1:
                y = F.scaled_dot_product_attention(q, k_all, v_all)
            else:
                pos_q = torch.arange(start, start + s).unsqueeze(1)
                mask = torch.arange(start + s).unsqueeze(0) <= pos_q
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, d_ff, bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, moe: bool) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn: nn.Module = (
            MoEFFN(cfg.d_model, cfg.d_ff, cfg.moe) if moe else DenseFFN(cfg.d_model, cfg.d_ff)
        )


class MemoryLM(nn.Module):
    """Decoder-only transformer with optional skip-layer memory (PKM or UltraMem) or MoE FFNs."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq, cfg.d_model)
        moe_blocks = set(cfg.moe_block_ids())
        self.blocks = nn.ModuleList(Block(cfg, i in moe_blocks) for i in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.memory_pairs = cfg.memory_pairs()
        mems: list[nn.Module] = []
        for i, _ in enumerate(self.memory_pairs):
            if cfg.kind == "ultramem":
                mems.append(UltraMemLayer(cfg.d_model, cfg.ultramem, table_id=f"mem{i}"))
            else:
                mems.append(PKMLayer(cfg.d_model, cfg.pkm))
        self.memory_layers = nn.ModuleList(mems)
        self._reads = {a: i for i, (a, _) in enumerate(self.memory_pairs)}
        self._writes = {b: i for i, (_, b) in enumerate(self.memory_pairs)}
        # UltraMemV2: a memory layer beside the FFN of every k-th block, one shared table.
        self.v2_blocks: list[int] = []
        self.shared_table: SharedValueTable | None = None
        self.v2_layers = nn.ModuleList()
        if cfg.kind == "ultramemv2":
            v2 = cfg.ultramemv2
            self.v2_blocks = v2.layer_blocks(cfg.n_layers)
            n_mem = len(self.v2_blocks)
            self.shared_table = SharedValueTable(v2, n_mem, v2.dv or cfg.d_model // 2)
            self.v2_layers.extend(
                UltraMemV2Layer(cfg.d_model, v2, layer_index=li, num_layers=n_mem)
                for li in range(n_mem)
            )
            if v2.value_std == 0:  # the paper's Eq. 26, sigma_s**2 measured on layer 0
                dv = v2.dv or cfg.d_model // 2
                std = eq26_value_std(
                    cfg.d_model,
                    cfg.d_ff,
                    v2.topm,
                    v2.heads,
                    v2.pre_vdim,
                    dv,
                    n_mem,
                    measure_top1_score_var(self.v2_layers[0]),
                )
                self.shared_table.reset_values(std)
        self._v2_at = {b: i for i, b in enumerate(self.v2_blocks)}
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.01)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits ``[B, S, vocab]``; with ``cache`` the tokens continue the cached prefix."""
        b, s = tokens.shape
        start = cache.length if cache is not None else 0
        if start + s > self.cfg.max_seq:
            raise ValueError(
                f"sequence of {start + s} tokens exceeds the model's max_seq={self.cfg.max_seq}"
            )
        pos = torch.arange(start, start + s, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        pending: dict[int, PendingPool | torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = x + block.attn(block.ln_attn(x), cache, i)
            h = block.ln_ffn(x)
            mem_i = self._reads.get(i)
            if mem_i is not None:
                layer = self.memory_layers[mem_i]
                pending[mem_i] = layer.start(h) if isinstance(layer, UltraMemLayer) else layer(h)
            v2_i = self._v2_at.get(i)
            if v2_i is not None:  # lookup issued before this block's FFN, collected after it
                v2 = self.v2_layers[v2_i]
                v2_pending = v2.start(h, self.shared_table)
                ffn_out = block.ffn(h)
                x = x + v2.finish(v2_pending)
                x = x + ffn_out
            else:
                x = x + block.ffn(h)
            mem_o = self._writes.get(i)
            if mem_o is not None:
                layer = self.memory_layers[mem_o]
                result = pending.pop(mem_o)
                x = x + (layer.finish(result) if isinstance(result, PendingPool) else result)
        if cache is not None:
            cache.length = start + s
        return self.tok_emb_logits(self.ln_out(x))

    def tok_emb_logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.tok_emb.weight.t()  # tied embeddings

    def loss(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(language-model loss, loss including aux terms) on ``tokens`` ``[B, S+1]``."""
        logits = self(tokens[:, :-1])
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        total = lm
        for mod in self.modules():
            aux = getattr(mod, "last_aux_loss", None)
            if aux is not None:
                total = total + aux
                mod.last_aux_loss = None
        return lm, total

    # ------------------------------------------------------------------ utilities
    @torch.no_grad()
    def refresh_svd(self) -> None:
        """Refresh the TDQKR singular vectors of every UltraMem layer (after each step)."""
        for layer in self.memory_layers:
            if isinstance(layer, UltraMemLayer):
                layer.refresh_svd()
        for layer in self.v2_layers:
            layer.refresh_svd()

    def ultramem_layers(self) -> list[UltraMemLayer]:
        return [m for m in self.memory_layers if isinstance(m, UltraMemLayer)]

    def set_value_backend(self, backend: object | None) -> None:
        """Route every UltraMem (and UltraMemV2) layer's lookups to ``backend`` (None: the
        local tables)."""
        for layer in self.ultramem_layers():
            layer.set_value_backend(backend)  # type: ignore[arg-type]
        for v2 in self.v2_layers:
            v2.set_value_backend(backend)  # type: ignore[arg-type]

    def drop_value_tables(self) -> None:
        """Free the local value tables (UltraMemV2: the shared values and pre-values); the
        model must then use a remote backend."""
        for layer in self.ultramem_layers():
            layer.values = nn.Parameter(torch.empty(0, layer.dv), requires_grad=False)
        table = self.shared_table
        if table is not None:
            dv, pre_vdim = table.values.shape[1], table.pre_values.shape[1]
            table.values = nn.Parameter(torch.empty(0, dv), requires_grad=False)
            table.pre_values = nn.Parameter(torch.empty(0, pre_vdim), requires_grad=False)

    @torch.no_grad()
    def round_value_tables(self, dtype: torch.dtype) -> None:
        """Round every UltraMem value table (UltraMemV2: the shared values and pre-values) to
        ``dtype`` in place (kept in fp32), exactly as ``export --dtype`` rounds a store: the
        local twin of a remote bf16/fp16 store."""
        tables = [layer.values for layer in self.ultramem_layers()]
        if self.shared_table is not None:
            tables += [self.shared_table.values, self.shared_table.pre_values]
        for values in tables:
            values.copy_(values.to(dtype).float())

    def value_parameters(self) -> list[nn.Parameter]:
        """The sparse value tables (own optimizer group / LR multiplier)."""
        params = [m.values for m in self.memory_layers]
        if self.shared_table is not None:
            params += [self.shared_table.values, self.shared_table.pre_values]
        return params

    def param_counts(self) -> dict[str, int]:
        """Total, sparse (value tables / experts) and activated-per-token parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        sparse = 0
        activated_sparse = 0
        for mod in self.modules():
            if isinstance(mod, UltraMemLayer | PKMLayer | MoEFFN):
                sparse += mod.sparse_param_count
                activated_sparse += mod.activated_param_count
            elif isinstance(mod, UltraMemV2Layer):
                activated_sparse += mod.activated_param_count
            elif isinstance(mod, SharedValueTable):
                sparse += mod.values.numel() + mod.pre_values.numel()
        dense_part = total - sum(
            p.numel()
            for mod in self.modules()
            if isinstance(
                mod, UltraMemLayer | PKMLayer | MoEFFN | UltraMemV2Layer | SharedValueTable
            )
            for p in mod.parameters()
        )
        dense_part -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return {
            "total": total,
            "sparse": sparse,
            "activated": dense_part + activated_sparse,
        }

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a KV cache. ``prompt`` ``[B, S]`` → ``[B, S + new]``."""
        if prompt.shape[1] + max_new_tokens > self.cfg.max_seq:
            raise ValueError(
                f"prompt ({prompt.shape[1]} tokens) + {max_new_tokens} new tokens exceeds "
                f"max_seq={self.cfg.max_seq}"
            )
        cache = KVCache.empty(self.cfg, prompt.shape[0])
        logits = self(prompt, cache)
        out = [prompt]
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(max_new_tokens):
            out.append(nxt)
            if len(out) - 1 == max_new_tokens:
                break
            logits = self(nxt, cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        return torch.cat(out, dim=1)
