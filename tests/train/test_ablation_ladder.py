"""The PKM → UltraMem ablation ladder (docs/ablation.md): one step per rung, ending at today's
UltraMem, with the paper's numbers."""

from __future__ import annotations

import dataclasses

import pytest

from ultramem_dist.model import MemoryLM, preset
from ultramem_dist.train import TrainConfig
from ultramem_dist.train.ablation import (
    PAPER_TOTAL_DELTA,
    PAPER_VAL_DELTA,
    PAPER_VAL_LOSS,
    ablation_ladder,
)
from ultramem_dist.train.trainer import build_optimizer, value_lr_multiplier


def _flat(rung) -> dict:
    cfg = rung.model.to_dict()
    out = {k: v for k, v in cfg["ultramem"].items()}
    out["memory_spec"] = cfg["memory_spec"]
    train = dataclasses.asdict(TrainConfig(**rung.train_overrides))
    out.update({k: train[k] for k in ("value_lr_start", "value_lr_end")})
    return out


@pytest.fixture(scope="module")
def ladder():
    return ablation_ladder("tiny")


def test_rungs_follow_the_paper_table_in_order(ladder):
    assert [r.name for r in ladder] == list(PAPER_VAL_LOSS)
    assert list(PAPER_VAL_DELTA) == [r.name for r in ladder[1:]]
    # the table's per-step deltas add up to its total (query-conv row: 0.000)
    assert sum(PAPER_VAL_DELTA.values()) == pytest.approx(PAPER_TOTAL_DELTA, abs=1e-9)
    for prev, step in zip(list(PAPER_VAL_LOSS)[:-1], list(PAPER_VAL_LOSS)[1:], strict=True):
        assert PAPER_VAL_LOSS[step] - PAPER_VAL_LOSS[prev] == pytest.approx(
            PAPER_VAL_DELTA[step], abs=1e-9
        )


def test_each_rung_changes_exactly_its_named_fields(ladder):
    for prev, rung in zip(ladder, ladder[1:], strict=False):
        a, b = _flat(prev), _flat(rung)
        diff = tuple(sorted(k for k in a if a[k] != b[k]))
        assert diff == rung.changed, rung.name
        assert diff  # no rung is a no-op


def test_base_rung_is_pkm_like(ladder):
    base = ladder[0]
    u = base.model.ultramem
    assert (u.softmax, u.value_proj, u.shared_query, u.qk_norm) == (True, False, False, False)
    assert (u.expansion, u.tdqkr, u.num_cores, u.official_init) == (1, False, 1, False)
    assert u.dv == base.model.d_model and base.model.memory_pairs() == [(3, 3)]
    cfg = TrainConfig(**base.train_overrides)
    assert {value_lr_multiplier(s, cfg) for s in range(0, cfg.steps, 37)} == {1.0}


def test_last_rung_is_todays_ultramem_with_default_training(ladder):
    final = ladder[-1]
    assert final.model.compute_hash() == preset("tiny", "ultramem").compute_hash()
    assert final.model.to_dict() == preset("tiny", "ultramem").to_dict()
    assert final.train_overrides == {}
    cfg = TrainConfig(**final.train_overrides)
    assert value_lr_multiplier(0, cfg) == 4.0 and value_lr_multiplier(cfg.steps - 1, cfg) == 1.0


def test_sparse_params_and_value_reads_stay_equal_along_the_ladder(ladder):
    def sizes(rung):
        c, u = rung.model, rung.model.ultramem
        dv = u.dv or c.d_model // 2
        layers = len(c.memory_pairs())
        return layers * u.knum**2 * dv, layers * u.heads * u.topm * dv

    sparse0, reads0 = sizes(ladder[0])
    for rung in ladder:
        sparse, reads = sizes(rung)
        assert reads == reads0, rung.name
        assert abs(sparse - sparse0) / sparse0 < 0.02, rung.name  # knum*sqrt(2) rounds down


def test_value_lr_group_holds_exactly_the_value_tables():
    rung = ablation_ladder("micro")[0]
    model = MemoryLM(rung.model)
    groups = {g["name"]: g["params"] for g in build_optimizer(model, TrainConfig()).param_groups}
    assert [id(p) for p in groups["values"]] == [id(m.values) for m in model.memory_layers]
    others = {id(p) for name, ps in groups.items() if name != "values" for p in ps}
    assert not others & {id(p) for p in groups["values"]}


def test_every_rung_builds_and_runs():
    import torch

    tokens = torch.randint(0, 256, (2, 9))
    for rung in ablation_ladder("micro"):
        logits = MemoryLM(rung.model)(tokens)
        assert logits.shape == (2, 9, 256) and torch.isfinite(logits).all(), rung.name


def test_benchmark_pairs_each_step_with_the_previous_rung_per_seed():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "ablation.py"
    spec = importlib.util.spec_from_file_location("ablation_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    ladder = ablation_ladder("micro")[:3]
    losses = {
        ladder[0].name: [3.0, 3.2, 3.1],
        ladder[1].name: [2.9, 3.1, 3.05],  # paired diffs -0.1, -0.1, -0.05
        ladder[2].name: [3.0, 3.0, 3.0],
    }
    steps = bench.summarise(ladder, losses)
    assert [s["name"] for s in steps] == [r.name for r in ladder]
    assert steps[0]["delta_mean"] is None and steps[0]["paper_delta"] is None
    # mean -0.0833, sd 0.02887, t(2) = 4.303: half-width 4.303 * 0.02887 / sqrt(3) = 0.0717
    assert steps[1]["delta_mean"] == pytest.approx(-0.0833, abs=1e-4)
    assert steps[1]["delta_ci95"] == pytest.approx(0.0717, abs=1e-4)
    assert steps[1]["val_loss_std"] == pytest.approx(0.1041, abs=1e-4)
    assert steps[1]["paper_delta"] == PAPER_VAL_DELTA[ladder[1].name]
    assert steps[1]["paper_direction"] == "lower"
    assert bench.verdict(steps[1]) == "agrees"
    assert set(steps[1]) == {
        "name",
        "val_loss_mean",
        "val_loss_std",
        "delta_mean",
        "delta_ci95",
        "paper_delta",
        "paper_direction",
    }
