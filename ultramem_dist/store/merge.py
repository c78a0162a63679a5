"""Fold IVE projectors into value rows ("merged" tables).

For physical row ``j``, IVE block ``p`` and MCS core ``c`` (value columns ``cols(c)``)::

    M[p, j, c, :] = W[:, p*Dv + cols(c)] @ V[j, cols(c)]          # a D-wide row

so a layer's output ``sum_p W_p o_p`` equals ``sum_l sum_c w[l, c] * M[block(l), row(l), c]``: a
gather-pool over a ``[E*N, h_c*D]`` table with ``h_c`` segments of width ``D`` that are *summed*
(``gather_pool(..., sum_segments=True)``), one output bin per token. A shard holding rows
``[lo, hi)`` and output columns ``[d_lo, d_hi)`` stores ``[E*(hi-lo), h_c*(d_hi-d_lo)]`` with row
``p*(hi-lo) + (j-lo)`` and core-major columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ultramem_dist.kernels import ColumnSegment

if TYPE_CHECKING:
    import torch

__all__ = ["fold_projector", "merged_segments"]


def fold_projector(
    values: torch.Tensor,
    out_proj: torch.Tensor,
    expansion: int,
    num_cores: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> torch.Tensor:
    """Merged slice for physical rows ``rows`` and output columns ``cols`` (fp32).

    Args:
        values: ``[N, Dv]`` value table.
        out_proj: ``[D, E*Dv]`` weight of the layer's ``Linear(E*Dv -> D)``.
    """
    import torch  # export-time only: a shard reads merged_segments without torch

    n, dv = values.shape
    d_model = out_proj.shape[0]
    if out_proj.shape[1] != expansion * dv:
        raise ValueError(f"out_proj is {list(out_proj.shape)}, expected [D, {expansion * dv}]")
    if dv % num_cores:
        raise ValueError(f"Dv={dv} is not divisible by h_c={num_cores}")
    lo, hi = rows
    d_lo, d_hi = cols
    if not (0 <= lo < hi <= n and 0 <= d_lo < d_hi <= d_model):
        raise ValueError(f"rows {rows} / cols {cols} outside [0, {n}) x [0, {d_model})")
    cw = dv // num_cores
    width = d_hi - d_lo
    v = values[lo:hi].float()
    w = out_proj[d_lo:d_hi].float()
    out = torch.empty(expansion * (hi - lo), num_cores * width, dtype=torch.float32)
    for p in range(expansion):
        for c in range(num_cores):
            w_pc = w[:, p * dv + c * cw : p * dv + (c + 1) * cw]  # [width, cw]
            block = out[p * (hi - lo) : (p + 1) * (hi - lo), c * width : (c + 1) * width]
            block.copy_(v[:, c * cw : (c + 1) * cw] @ w_pc.T)
    return out


def merged_segments(width: int, num_cores: int) -> tuple[ColumnSegment, ...]:
    """The kernel segments of a merged slice: core ``c`` owns columns ``[c*width, (c+1)*width)``."""
    return tuple(ColumnSegment(c * width, (c + 1) * width, c) for c in range(num_cores))
