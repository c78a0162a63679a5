"""The V2 parts of benchmarks/gather.py and benchmarks/overlap.py that are plain arithmetic: the
DRAM floor counts pre-value bytes (once per dim shard), v1 rows keep their floor, and the
overlap benchmark's v2 shape is the tiny UltraMemV2 with one lookup per block."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("gather"), importlib.import_module("overlap")
    finally:
        sys.path.remove(str(BENCH))


def _row(sharding: str, shards: int) -> dict:
    return {"batch": 4, "shards": shards, "sharding": sharding, "echo_p50_ms": 1.0, "p50_ms": 2.0}


def test_floor_counts_value_and_pre_value_rows(bench):
    gather, _ = bench
    v1, row, dim = _row("row", 2), _row("row", 2), _row("dim", 2)
    gather.add_bandwidth_floor([v1], 1.0, rows_per_token=160, dv=256)
    gather.add_bandwidth_floor([row, dim], 1.0, rows_per_token=160, dv=256, pre_vdim=64)
    values = 4 * 160 * 256 * 4
    pre = 4 * 160 * 64 * 4
    assert "pre_values_read_bytes" not in v1 and v1["rows_read_bytes"] == values
    assert v1["floor_ms"] == round(1.0 + values / 1e9 * 1e3, 3)
    assert row["pre_values_read_bytes"] == pre and row["rows_read_bytes"] == values + pre
    assert dim["pre_values_read_bytes"] == 2 * pre  # every dim shard reads the pre-values
    assert dim["floor_ms"] == round(1.0 + (values + 2 * pre) / 1e9 * 1e3, 3)
    assert row["ratio_to_floor"] == pytest.approx(2.0 / row["floor_ms"], abs=2e-3)


def test_overlap_v2_shape_is_the_tiny_ultramemv2(bench):
    _, overlap = bench
    cfg = overlap.shape_config("v2")
    assert cfg.kind == "ultramemv2" and cfg.n_layers == 6
    assert overlap.lookups_per_token(cfg) == 6  # a memory layer beside every block's FFN
    assert overlap.lookups_per_token(overlap.shape_config("span2")) == 2
    assert overlap.memory_layout(overlap.shape_config("span3")) == "0:3,4:7"
