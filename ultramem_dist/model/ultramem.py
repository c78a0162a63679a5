"""The UltraMem memory layer: TDQKR top-m over a virtual grid, IVE, MCS, skip-layer ready.

The forward pass has three explicit stages, which is the seam the distributed store plugs into:

1. :meth:`UltraMemLayer.select` — query, Tucker-decomposed key scores, top-m → :class:`Selection`
   (physical rows, IVE blocks, per-core weights);
2. gather-pool — :func:`ultramem_dist.kernels.gather_pool` on the local table, or a remote
   backend's future (:meth:`UltraMemLayer.start` / :meth:`UltraMemLayer.finish`);
3. :meth:`UltraMemLayer.project` — one ``Linear(E*Dv -> D)`` over the per-block pools.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ultramem_dist.kernels import gather_pool
from ultramem_dist.model.config import UltraMemConfig
from ultramem_dist.model.selection import Selection, ValueBackend, done_future


def ive_permutation(n_virtual: int, seed: int) -> torch.Tensor:
    """The fixed, seeded permutation pi of [0, E*N) used by implicit value expansion."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_virtual, generator=gen)


TDQKR_CANDIDATES: tuple[str, ...] = ("paper", "two_sided")
"""Candidate rules of :func:`tdqkr_topm` (see there)."""


def _candidates(approx: torch.Tensor, m: int, rule: str) -> torch.Tensor:
    """``[T, H, m]`` candidate ids along one side of the grid from its rank-1 scores."""
    if rule == "paper":
        return approx.topk(m, dim=-1).indices
    if rule == "two_sided":
        top = approx.topk(m - m // 2, dim=-1).indices
        bottom = approx.topk(m // 2, dim=-1, largest=False).indices
        return torch.cat([top, bottom], dim=-1)
    raise ValueError(f"unknown TDQKR candidate rule {rule!r}; choose one of {TDQKR_CANDIDATES}")


def tdqkr_topm(
    s_row: torch.Tensor,
    s_col: torch.Tensor,
    cores: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    m: int,
    candidates: str = "paper",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tucker-decomposed query-key retrieval.

    Args:
        s_row, s_col: ``[T, H, r, K]`` per-rank row and column key scores.
        cores: ``[H, h_c, r, r]`` Tucker cores (MCS).
        u, v: ``[H, r]`` leading singular vectors of ``cores.sum(1)``.
        m: top-m.
        candidates: ``"paper"``: the top m rows of ``u . S_row`` and the top m columns of
            ``v . S_col``; ``"two_sided"``: ``ceil(m/2)`` from the top and ``floor(m/2)``
            from the bottom of each, so pairs whose rank-1 factors are both large and negative
            (a large positive product) are candidates too. Either way ``m x m`` cells are
            scored exactly.

    Returns:
        ``virtual`` ``[T, H, m]`` virtual ids ``row*K + col`` and ``scores`` ``[T, H, m, h_c]``:
        the exact per-core scores ``S_row[:, i]^T C_c S_col[:, j]`` of the selected cells.

    The selection (no gradient) scores the whole ``m x m`` candidate grid; the differentiable
    scores are recomputed for the m selected cells only, so the backward pass never touches
    the grid.
    """
    k_side, r = s_row.shape[-1], s_row.shape[2]
    with torch.no_grad():
        approx_row = torch.einsum("thri,hr->thi", s_row, u)
        approx_col = torch.einsum("thri,hr->thi", s_col, v)
        row_idx = _candidates(approx_row, m, candidates)  # [T, H, m]
        col_idx = _candidates(approx_col, m, candidates)
        sr = s_row.gather(-1, row_idx.unsqueeze(2).expand(-1, -1, r, -1))  # [T,H,r,m]
        sc = s_col.gather(-1, col_idx.unsqueeze(2).expand(-1, -1, r, -1))
        exact = torch.einsum("thai,hcab,thbj->thijc", sr, cores, sc)  # [T, H, m, m, h_c]
        # sum over the cores one add at a time: the grid is a strided view whose .sum(-1)
        # is ~10x slower, and these adds give the same bits as that sum
        total = exact[..., 0]
        for c in range(1, exact.shape[-1]):
            total = total + exact[..., c]
        t, h = exact.shape[:2]
        best = total.reshape(t, h, m * m).topk(m, dim=-1).indices  # [T, H, m]
        rows = row_idx.gather(-1, best // m)
        cols = col_idx.gather(-1, best % m)
    sr_sel = s_row.gather(-1, rows.unsqueeze(2).expand(-1, -1, r, -1))  # [T, H, r, m]
    sc_sel = s_col.gather(-1, cols.unsqueeze(2).expand(-1, -1, r, -1))
    scores = torch.einsum("thak,hcab,thbk->thkc", sr_sel, cores, sc_sel)  # [T, H, m, h_c]
    return rows * k_side + cols, scores


def brute_force_topm(
    s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor, m: int
) -> torch.Tensor:
    """Exact top-m over the whole K*K grid (reference for tests; materialises the grid)."""
    grid = torch.einsum("thai,hab,thbj->thij", s_row, cores.sum(1), s_col)
    t, h, k, _ = grid.shape
    return grid.reshape(t, h, k * k).topk(m, dim=-1).indices


@dataclass
class PendingPool:
    """A lookup issued by :meth:`UltraMemLayer.start` and collected by :meth:`finish`; the
    future resolves to the pooled values (projection happens on the caller's thread)."""

    future: Future[torch.Tensor]
    shape: tuple[int, ...]


@torch.no_grad()
def refresh_core_vectors(cores: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    """Write into ``u, v`` ``[H, r]`` the leading left/right singular vectors of the summed
    Tucker cores ``cores [H, h_c, r, r]``, each sign kept closest to the previous vector; on the
    first call (``u`` all zero) ``u`` is made to sum >= 0, so non-negative row/col scores are
    ranked from the top. Shared by the UltraMem and UltraMemV2 layers."""
    left, _, right_h = torch.linalg.svd(cores.detach().float().sum(1))
    u_new, v_new = left[:, :, 0], right_h[:, 0, :]
    had_prev = u.abs().sum(-1) > 0
    flip = torch.where(had_prev, (u_new * u).sum(-1) < 0, u_new.sum(-1) < 0)
    sign = torch.where(flip, -1.0, 1.0).unsqueeze(-1)
    u.copy_(u_new * sign)
    v.copy_(v_new * sign)


class UltraMemLayer(nn.Module):
    """UltraMem memory layer (Huang et al., ICLR 2025) with a pluggable value backend."""

    def __init__(self, d_model: int, cfg: UltraMemConfig, table_id: str = "mem0") -> None:
        super().__init__()
        cfg.validate(d_model)
        self.cfg = cfg
        self.d_model = d_model
        self.table_id = table_id
        self.dv = cfg.dv or d_model // 2
        cfg.dv = self.dv
        self.n_rows = cfg.n_rows
        self.k_side = cfg.side
        h, r, dk = cfg.heads, cfg.key_rank, cfg.dk
        n_query = 1 if cfg.shared_query else h
        self.query = nn.Linear(d_model, n_query * 2 * dk, bias=False)
        self.q_norm_row = nn.LayerNorm(dk) if cfg.qk_norm else None
        # official form: one LayerNorm shared by both query halves (no q_norm_col parameters)
        shared_norm = cfg.shared_query_norm or not cfg.qk_norm
        self.q_norm_col = None if shared_norm else nn.LayerNorm(dk)
        self.keys = nn.Parameter(torch.empty(h, 2, self.k_side, r, dk))
        self.k_norm = nn.LayerNorm(dk) if cfg.qk_norm else None
        if cfg.tdqkr:
            self.cores = nn.Parameter(torch.empty(h, cfg.num_cores, r, r))
        else:
            # additive product keys as the rank-2 TDQKR special case: the scores are augmented
            # to S_row = [s, 1], S_col = [1, t] (see select), the core is the fixed identity
            # (s*1 + 1*t = s + t) and u = e0, v = e1 rank rows by s and columns by t exactly.
            self.register_buffer("cores", torch.eye(2).expand(h, 1, 2, 2).clone())
        self.values = nn.Parameter(torch.empty(self.n_rows, self.dv))
        self.out_proj = (
            nn.Linear(cfg.expansion * self.dv, d_model, bias=False) if cfg.value_proj else None
        )
        n_uv = r if cfg.tdqkr else 2
        self.register_buffer("u", torch.zeros(h, n_uv))
        self.register_buffer("v", torch.zeros(h, n_uv))
        self.register_buffer(
            "ive_perm", ive_permutation(cfg.expansion * self.n_rows, cfg.perm_seed)
        )
        self._backend: ValueBackend | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    # ----------------------------------------------------------------- init & buffers
    def reset_parameters(self) -> None:
        """Initialisation of the official code (see the design brief); with
        ``official_init=False`` the PKM baseline's: PyTorch-default Linear and LayerNorm,
        keys ~ N(0, 1/Dk) as in the official code, values ~ N(0, 1/Dv)."""
        cfg, dk = self.cfg, self.cfg.dk
        norms = [n for n in (self.q_norm_row, self.q_norm_col, self.k_norm) if n is not None]
        # the random draws keep the order of the code before the ablation switches (query,
        # keys, projector, values, cores), so a seed gives the same default layer as before
        if cfg.official_init:
            for norm in norms:
                nn.init.constant_(norm.weight, dk**-0.33)
                nn.init.zeros_(norm.bias)
            nn.init.normal_(self.query.weight, std=dk**-0.5)
            nn.init.normal_(self.keys, std=dk**-0.5)
            if self.out_proj is not None:
                nn.init.normal_(self.out_proj.weight, std=(cfg.expansion * self.dv) ** -0.5)
            nn.init.normal_(self.values, std=0.02)
        else:
            for mod in (*norms, self.query):
                mod.reset_parameters()
            nn.init.normal_(self.keys, std=dk**-0.5)
            if self.out_proj is not None:
                self.out_proj.reset_parameters()
            nn.init.normal_(self.values, std=self.dv**-0.5)
        if cfg.tdqkr:
            nn.init.uniform_(self.cores, 0.0, 1.0)
            self.u.zero_()
            self.v.zero_()
            self.refresh_svd()
        else:
            self.u.copy_(torch.tensor([1.0, 0.0]).expand_as(self.u))
            self.v.copy_(torch.tensor([0.0, 1.0]).expand_as(self.v))

    @torch.no_grad()
    def refresh_svd(self) -> None:
        """Recompute u, v (leading singular vectors of the summed cores), keeping their sign
        closest to the previous ones. Call once per optimizer step. Additive product keys
        (``tdqkr=False``) keep their fixed identity core and u = e0, v = e1."""
        if self.cfg.tdqkr:
            refresh_core_vectors(self.cores, self.u, self.v)

    def aux_loss(self) -> torch.Tensor:
        """alpha * mean(relu(sigma_i - tau)^2) over the non-leading singular values of the summed
        cores per head (official form), or of every core separately with ``aux_per_core``;
        zero for additive product keys (no trained core)."""
        if not self.cfg.tdqkr:
            return self.values.new_zeros(())
        cores = self.cores.float()
        if not self.cfg.aux_per_core:
            cores = cores.sum(1)  # [H, r, r]: the matrix whose rank-1 part TDQKR uses
        sigma = torch.linalg.svdvals(cores)[..., 1:]
        if sigma.numel() == 0:
            return self.cores.new_zeros(())
        return self.cfg.aux_alpha * F.relu(sigma - self.cfg.aux_tau).pow(2).mean()

    # ----------------------------------------------------------------- stage 1: select
    def key_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-rank row/col scores ``[T, H, r, K]`` for ``x`` ``[T, D]``."""
        cfg = self.cfg
        q = self.query(x).view(x.shape[0], -1, 2, cfg.dk)  # [T, Hq, 2, dk]
        if self.q_norm_row is None:
            q_row, q_col = q[:, :, 0], q[:, :, 1]
        elif self.q_norm_col is None:
            qn = self.q_norm_row(q)
            q_row, q_col = qn[:, :, 0], qn[:, :, 1]
        else:
            q_row, q_col = self.q_norm_row(q[:, :, 0]), self.q_norm_col(q[:, :, 1])
        keys = self._normed_keys()  # [H, 2, K, r, dk]
        if cfg.shared_query:
            # one matmul per side: [T, dk] @ [dk, H*K*r] -> [T, H, K, r] -> [T, H, r, K]
            h, _, k, r, dk = keys.shape
            s_row = (q_row[:, 0] @ keys[:, 0].reshape(-1, dk).t()).view(-1, h, k, r)
            s_col = (q_col[:, 0] @ keys[:, 1].reshape(-1, dk).t()).view(-1, h, k, r)
            s_row, s_col = s_row.transpose(2, 3), s_col.transpose(2, 3)
        else:
            s_row = torch.einsum("thd,hkrd->thrk", q_row, keys[:, 0])
            s_col = torch.einsum("thd,hkrd->thrk", q_col, keys[:, 1])
        return s_row, s_col

    def _normed_keys(self) -> torch.Tensor:
        """LayerNorm'd keys; cached while no gradient is recorded (inference), keyed on the
        parameters' versions so an in-place update invalidates the cache."""
        if self.k_norm is None:
            return self.keys
        if torch.is_grad_enabled():
            self._key_cache = None
            return self.k_norm(self.keys)
        stamp = (
            self.keys._version,
            self.k_norm.weight._version,
            self.k_norm.bias._version,
            self.keys.data_ptr(),
        )
        cache = getattr(self, "_key_cache", None)
        if cache is None or cache[0] != stamp:
            cache = (stamp, self.k_norm(self.keys).contiguous())
            self._key_cache = cache
        return cache[1]

    def select(self, x: torch.Tensor) -> Selection:
        """Top-m selection for ``x`` ``[T, D]`` → physical rows, IVE blocks, per-core weights."""
        s_row, s_col = self.key_scores(x)
        if not self.cfg.tdqkr:  # additive keys: S_row = [s, 1], S_col = [1, t] (see __init__)
            ones = torch.ones_like(s_row)
            s_row, s_col = torch.cat([s_row, ones], 2), torch.cat([ones, s_col], 2)
        virtual, scores = tdqkr_topm(
            s_row, s_col, self.cores, self.u, self.v, self.cfg.topm, self.cfg.tdqkr_candidates
        )
        if self.cfg.softmax:  # PKM: normalise each head's top-m scores (per core)
            scores = scores.softmax(dim=2)
        t = x.shape[0]
        z = self.ive_perm[virtual.reshape(t, -1)]
        return Selection(
            indices=z % self.n_rows,
            blocks=z // self.n_rows,
            weights=scores.reshape(t, -1, self.cfg.num_cores),
        )

    # ----------------------------------------------------------------- stage 2: gather-pool
    def pool_local(self, sel: Selection) -> torch.Tensor:
        """``[T, E, Dv]`` pooled values from this layer's own table."""
        return gather_pool(self.values, sel.indices, sel.blocks, sel.weights, self.cfg.expansion)

    def set_value_backend(self, backend: ValueBackend | None) -> None:
        """Route lookups to ``backend`` (e.g. a remote store); ``None`` uses the local table."""
        self._backend = backend

    @property
    def value_backend(self) -> ValueBackend | None:
        return self._backend

    # ----------------------------------------------------------------- stage 3: project
    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[T, E, Dv]`` → ``[T, D]``; a ``[T, D]`` result of a merged table passes through, and
        without a projector (``value_proj=False``, E*Dv = D) the pooled blocks are the output."""
        if pooled.dim() == 2:
            return pooled
        flat = pooled.reshape(pooled.shape[0], -1)
        return flat if self.out_proj is None else self.out_proj(flat)

    # ----------------------------------------------------------------- skip-layer API
    def start(self, x: torch.Tensor) -> PendingPool:
        """Issue the lookup for ``x`` ``[..., D]`` without waiting for remote values."""
        shape = tuple(x.shape)
        flat = x.reshape(-1, self.d_model)
        if self.training and self.cfg.aux_alpha > 0:
            self.last_aux_loss = self.aux_loss()
        if self._backend is None:
            fut = done_future(self.pool_local(self.select(flat)))
        else:
            with torch.no_grad():
                sel = self.select(flat)
            fut = self._backend.submit(self.table_id, sel)
        return PendingPool(fut, shape)

    def finish(self, pending: PendingPool, timeout: float | None = None) -> torch.Tensor:
        """Wait for the lookup issued by :meth:`start`; returns ``[..., D]``."""
        pooled = pending.future.result(timeout=timeout)
        dtype = (self.out_proj.weight if self.out_proj is not None else self.query.weight).dtype
        return self.project(pooled.to(dtype)).reshape(pending.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(x))

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"N={self.n_rows}, K={self.k_side}, E={c.expansion}, Dv={self.dv}, H={c.heads}, "
            f"m={c.topm}, r={c.rank}, h_c={c.num_cores}"
        )

    @property
    def sparse_param_count(self) -> int:
        return self.values.numel() if self.values.numel() else self.n_rows * self.dv

    @property
    def activated_param_count(self) -> int:
        """Parameters touched per token: query, the cores, m*H value rows, projector, norms."""
        c = self.cfg
        n_norms = 0 if not c.qk_norm else 2 if c.shared_query_norm else 3
        return (
            self.query.weight.numel()
            + (self.cores.numel() if c.tdqkr else 0)
            + c.heads * c.topm * self.dv
            + (self.out_proj.weight.numel() if self.out_proj is not None else 0)
            + 2 * n_norms * c.dk
        )


def key_recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of the exact top-m ids that the approximate selection found."""
    hits = (approx.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).float()
    return float(hits.mean())


__all__ = [
    "TDQKR_CANDIDATES",
    "PendingPool",
    "UltraMemLayer",
    "brute_force_topm",
    "ive_permutation",
    "key_recall",
    "tdqkr_topm",
]
