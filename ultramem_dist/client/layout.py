"""The store layout a client learns from the shards' ``Info`` replies."""

from __future__ import annotations

from dataclasses import dataclass

from ultramem_dist.errors import RemoteError
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb

__all__ = ["StoreLayout", "TableLayout"]


@dataclass(frozen=True)
class TableLayout:
    """How one table is split: per shard (in shard order) its row and column ranges."""

    table_id: str
    n_rows: int
    dv: int
    expansion: int
    num_cores: int
    d_model: int
    topm: int
    heads: int
    merged: bool
    sharding: str
    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]
    pre_vdim: int = 0
    """UltraMemV2 pre-value width (0: a v1 table, no ``pre_input``). Every lookup of a table with
    pre-values carries ``pre_input`` float32 ``[T, pre_vdim]``, sent whole to every shard called
    (row shards hold their rows' pre-values, dim shards all of them)."""

    @property
    def out_width(self) -> int:
        return self.d_model if self.merged else self.dv

    def out_shape(self, num_tokens: int, shard: int | None = None) -> tuple[int, ...]:
        """Shape of the full pooled output, or of one shard's reply."""
        width = self.out_width if shard is None else self.cols[shard][1] - self.cols[shard][0]
        return (num_tokens, width) if self.merged else (num_tokens, self.expansion, width)


@dataclass(frozen=True)
class StoreLayout:
    version: str
    num_shards: int
    model_id: str
    config_hash: str
    tables: dict[str, TableLayout]
    max_batch: int
    max_per_query: int

    @classmethod
    def from_infos(cls, infos: list[pb.InfoReply]) -> StoreLayout:
        """Combine one Info reply per shard (index = shard) into a checked layout."""
        first = infos[0]
        ids = [t.table_id for t in first.tables]
        per_table: dict[str, list[pb.TableInfo]] = {tid: [] for tid in ids}
        for k, info in enumerate(infos):
            if info.shard_index != k or info.num_shards != len(infos):
                raise RemoteError(
                    f"shard {k} reports index {info.shard_index} of {info.num_shards}"
                )
            if info.table_version != first.table_version:
                raise RemoteError(
                    f"shard {k} serves version {info.table_version!r}, shard 0 serves "
                    f"{first.table_version!r}"
                )
            if sorted(t.table_id for t in info.tables) != sorted(ids):
                raise RemoteError(f"shard {k} serves tables {[t.table_id for t in info.tables]}")
            for t in info.tables:
                per_table[t.table_id].append(t)
        tables = {}
        for tid, slots in per_table.items():
            t0 = slots[0]
            dims = (
                "n_rows",
                "dv",
                "expansion",
                "num_cores",
                "d_model",
                "merged",
                "sharding",
                "pre_vdim",
            )
            for k, t in enumerate(slots):
                if any(getattr(t, d) != getattr(t0, d) for d in dims):
                    raise RemoteError(
                        f"table {tid!r}: shard {k} disagrees with shard 0 on its shape"
                    )
            layout = TableLayout(
                table_id=tid,
                n_rows=t0.n_rows,
                dv=t0.dv,
                expansion=t0.expansion,
                num_cores=t0.num_cores,
                d_model=t0.d_model,
                topm=t0.topm,
                heads=t0.heads,
                merged=t0.merged,
                sharding="row" if t0.sharding == pb.SHARDING_ROW else "dim",
                rows=tuple((t.row_lo, t.row_hi) for t in slots),
                cols=tuple((t.col_lo, t.col_hi) for t in slots),
                pre_vdim=t0.pre_vdim,
            )
            _check_cover(layout)
            tables[tid] = layout
        return cls(
            version=first.table_version,
            num_shards=len(infos),
            model_id=first.model_id,
            config_hash=first.config_hash,
            tables=tables,
            max_batch=min(i.max_batch for i in infos),
            max_per_query=min(i.max_per_query for i in infos),
        )


def _check_cover(t: TableLayout) -> None:
    ranges, total = (t.rows, t.n_rows) if t.sharding == "row" else (t.cols, t.out_width)
    cursor = 0
    for lo, hi in ranges:
        if lo != cursor or hi <= lo:
            break
        cursor = hi
    if cursor != total:
        raise RemoteError(
            f"table {t.table_id!r}: shard ranges {list(ranges)} do not tile [0, {total})"
        )
