r"""Choose row-wise or dimension-wise sharding for a table (``export --by auto``).

Cost model
----------
Per query token and per memory layer, with

* ``L = H * m`` selected entries, ``S`` shards, ``h_c`` MCS cores, ``E`` IVE blocks,
* ``W`` output width (``Dv``; ``D`` for a merged table) and ``E' = E`` (``1`` merged),
* ``R`` stored row width (``Dv``; ``h_c * D`` merged) and ``b`` bytes per stored element,
* ``q = 8 + 4 * h_c`` request bytes per entry (int32 row id, int32 block id, fp32 core weights),

the time of one fan-out is the slowest shard plus the client's fan-in::

    row-wise  (each shard gets L/S entries on average, returns a full-width partial sum)
        t_row = c_net * (q*L/S + 4*E'*W) + c_entry * L/S + c_read * b*R*L/S
                + c_fanin * 4*E'*W*S                    # client adds S partial sums
    dim-wise  (every shard gets all L entries, returns W/S columns)
        t_dim = c_net * (q*L + 4*E'*W/S) + c_entry * L + c_read * b*(R/S)*L * p_split
                + c_fanin * 4*E'*W                      # client concatenates

``p_split`` (= ``split_penalty``) applies when the column split cannot align to MCS core
boundaries (a shard straddling a core boundary with unequal segments runs the kernel's
per-segment path). The fixed per-RPC cost is the same for both (the client talks to all ``S``
shards either way) and cancels out. Default constants were measured on the project's 2-core
dev machine (loopback gRPC ~0.55 GB/s of payload -> ``c_net`` 1.8 ns/B; random row reads
~15 GB/s -> ``c_read`` 0.067 ns/B; ~20 ns per entry for validation, sorting and index math;
~0.1 ns/B for client-side adds). Dimension-wise wins when the reply (``E*W``) dominates the
request (``q*L``), i.e. wide values, few entries and many shards; row-wise wins for narrow
values with many entries per token. Ties go to dimension-wise (what production deployments of
UltraMem-style memories use).

UltraMemV2 tables add pre-values ``[N, P]`` (``P = pre_vdim``): every shard gets the token's
``pre_input`` (``4*P`` request bytes) and, per entry it pools, reads that row's pre-values
(``b*P`` bytes) and computes the dot product and GELU (``c_pre``). Row-wise a shard does this
for its ``L/S`` entries; dim-wise every shard keeps the pre-values whole and does it for all
``L`` entries (the GELU needs the complete dot product), so the terms

    row-wise  + c_net * 4*P + (c_read * b*P + c_pre) * L/S
    dim-wise  + c_net * 4*P + (c_read * b*P + c_pre) * L

tilt the choice toward row-wise as ``P`` and ``S`` grow.

A table also has hard limits: row-wise needs ``N >= S`` and dim-wise ``W >= S``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from ultramem_dist.store.layout import column_ranges, is_core_aligned, row_ranges

__all__ = ["CostConstants", "Plan", "TableShape", "plan_table"]

ShardBy = Literal["row", "dim"]


@dataclass(frozen=True)
class CostConstants:
    """Seconds-per-unit constants of the cost model (defaults measured on the dev machine)."""

    c_net: float = 1.8e-9
    """Seconds per byte of request+reply payload through one gRPC call."""
    c_read: float = 0.067e-9
    """Seconds per byte of value rows gathered by the kernel."""
    c_entry: float = 20e-9
    """Seconds per lookup entry a shard validates, sorts and indexes."""
    c_fanin: float = 0.1e-9
    """Seconds per byte the client adds or concatenates."""
    split_penalty: float = 1.5
    """Read-time multiplier when a dim split straddles an MCS core boundary unevenly."""
    c_pre: float = 8e-9
    """Seconds per entry for an UltraMemV2 pre-value dot product and its GELU (beyond the read)."""


@dataclass(frozen=True)
class TableShape:
    """The dimensions of one table that the plan depends on."""

    n_rows: int
    dv: int
    expansion: int
    num_cores: int
    topm: int
    heads: int
    d_model: int
    merged: bool = False
    storage_bytes: int = 4
    pre_vdim: int = 0
    """UltraMemV2 pre-value width ``P`` (0: a v1 table)."""

    @property
    def entries(self) -> int:
        """Entries per token, ``L = H * m``."""
        return self.heads * self.topm

    @property
    def out_width(self) -> int:
        return self.d_model if self.merged else self.dv

    @property
    def row_width(self) -> int:
        return self.num_cores * self.d_model if self.merged else self.dv

    @property
    def out_blocks(self) -> int:
        return 1 if self.merged else self.expansion


def _pre_cost(shape: TableShape, entries: float, k: CostConstants) -> float:
    """Seconds per token one shard spends on pre-values: ``pre_input`` on the wire, and a
    pre-value row read + dot + GELU for each of its ``entries`` (0 for a v1 table)."""
    if not shape.pre_vdim:
        return 0.0
    p = shape.pre_vdim
    return k.c_net * 4 * p + (k.c_read * shape.storage_bytes * p + k.c_pre) * entries


@dataclass(frozen=True)
class Plan:
    """The chosen sharding, each shard's range, and both modelled costs (seconds per token)."""

    by: ShardBy
    ranges: tuple[tuple[int, int], ...]
    cost_row: float | None
    cost_dim: float | None
    core_aligned: bool

    def to_json(self) -> dict:
        d = asdict(self)
        d["ranges"] = [list(r) for r in self.ranges]
        return d


def _dim_ranges(shape: TableShape, shards: int) -> list[tuple[int, int]]:
    cores = 1 if shape.merged else shape.num_cores
    return column_ranges(shape.out_width, shards, cores)


def cost_row(shape: TableShape, shards: int, k: CostConstants) -> float:
    """Modelled seconds per token for row-wise sharding (see the module docstring)."""
    L, S, W, E = shape.entries, shards, shape.out_width, shape.out_blocks
    q = 8 + 4 * shape.num_cores
    return (
        k.c_net * (q * L / S + 4 * E * W)
        + k.c_entry * L / S
        + k.c_read * shape.storage_bytes * shape.row_width * L / S
        + k.c_fanin * 4 * E * W * S
        + _pre_cost(shape, L / S, k)
    )


def cost_dim(shape: TableShape, shards: int, k: CostConstants) -> float:
    """Modelled seconds per token for dimension-wise sharding (see the module docstring)."""
    L, S, W, E = shape.entries, shards, shape.out_width, shape.out_blocks
    q = 8 + 4 * shape.num_cores
    cores = 1 if shape.merged else shape.num_cores
    aligned = is_core_aligned(_dim_ranges(shape, shards), W, cores)
    penalty = 1.0 if aligned else k.split_penalty
    return (
        k.c_net * (q * L + 4 * E * W / S)
        + k.c_entry * L
        + k.c_read * shape.storage_bytes * shape.row_width / S * L * penalty
        + k.c_fanin * 4 * E * W
        + _pre_cost(shape, L, k)  # pre-values whole on every dim shard
    )


def plan_table(
    shape: TableShape,
    shards: int,
    by: Literal["row", "dim", "auto"] = "auto",
    constants: CostConstants | None = None,
) -> Plan:
    """Pick the sharding (or honour a forced one) and compute every shard's range.

    Row ranges are over the ``N`` physical rows; column ranges are over the output width
    (``Dv``, or ``D`` for merged tables).
    """
    k = constants or CostConstants()
    if shards < 1:
        raise ValueError(f"need at least one shard, got {shards}")
    if by not in ("row", "dim", "auto"):
        raise ValueError(f"unknown sharding {by!r}; expected row, dim or auto")
    row_ok = shape.n_rows >= shards
    dim_ok = shape.out_width >= shards
    c_row = cost_row(shape, shards, k) if row_ok else None
    c_dim = cost_dim(shape, shards, k) if dim_ok else None
    if by == "auto":
        if c_dim is None and c_row is None:
            raise ValueError(
                f"a {shape.n_rows}x{shape.out_width} table cannot be split {shards} ways"
            )
        if c_row is None:
            by = "dim"
        elif c_dim is None:
            by = "row"
        else:
            by = "row" if c_row < c_dim else "dim"
    if by == "row":
        ranges = row_ranges(shape.n_rows, shards)
        aligned = True
    else:
        ranges = _dim_ranges(shape, shards)
        aligned = is_core_aligned(ranges, shape.out_width, 1 if shape.merged else shape.num_cores)
    return Plan(by, tuple(ranges), c_row, c_dim, aligned)
