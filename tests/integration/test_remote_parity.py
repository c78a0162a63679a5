"""Remote == local with real ``ultramem-dist serve-shard`` processes on loopback.

One store per shard count S in {1, 2, 3}; each holds synthetic row/dim, merged/unmerged tables
and the two memory layers of a tiny random-init ``MemoryLM`` (6 server processes in all).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import CLI, REPO, make_table_spec, random_queries
from typer.testing import CliRunner

from ultramem_dist.cli import load_commands
from ultramem_dist.client import GatherClient, RemoteValueStore
from ultramem_dist.kernels import gather_pool
from ultramem_dist.model import MemoryLM, preset
from ultramem_dist.store import TableSpec, export_tables

pytestmark = pytest.mark.integration
app = load_commands()

SYNTH = make_table_spec(n_rows=900, dv=48, d_model=40, topm=6, heads=2, seed=3)
TABLES = {  # table id -> (sharding, merged)
    "row": ("row", False),
    "dim": ("dim", False),
    "row_m": ("row", True),
    "dim_m": ("dim", True),
}
# How the model's memory tables are sharded in each store.
MODEL_LAYOUT = {1: ("auto", False), 2: ("row", False), 3: ("dim", True)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MemoryLM(preset("micro")).eval()
    return m


def _model_specs(model) -> dict[str, TableSpec]:
    specs = {}
    for i, layer in enumerate(model.ultramem_layers()):
        c = layer.cfg
        specs[layer.table_id] = TableSpec(
            values=layer.values.detach().clone(),
            expansion=c.expansion,
            num_cores=c.num_cores,
            topm=c.topm,
            heads=c.heads,
            d_model=layer.d_model,
            out_proj=layer.out_proj.weight.detach(),
            ive_perm=layer.ive_perm,
            layer=i,
        )
    return specs


@pytest.fixture(scope="module")
def clusters(model, tmp_path_factory, spawn_shards):
    """S -> comma-separated targets of the running shards of that store."""
    specs = _model_specs(model)
    stores = {}
    for s in (1, 2, 3):
        root = tmp_path_factory.mktemp(f"store{s}")
        by = {tid: b for tid, (b, _) in TABLES.items()}
        merged = {tid: m for tid, (_, m) in TABLES.items()}
        for tid in specs:
            by[tid], merged[tid] = MODEL_LAYOUT[s]
        export_tables(
            {**dict.fromkeys(TABLES, SYNTH), **specs},
            root,
            shards=s,
            by=by,
            merged=merged,
            version=f"s{s}",
        )
        stores[s] = root
    procs = (
        spawn_shards(stores[1], [0])
        + spawn_shards(stores[2], [0, 1])
        + spawn_shards(stores[3], [0, 1, 2])
    )
    by_store: dict[int, list[str]] = {1: [], 2: [], 3: []}
    for p in procs:
        by_store[int(p.extra["version"][1:])].append(p.target)
    return {s: ",".join(t) for s, t in by_store.items()}


def _local(tid, idx, blk, w):
    pooled = gather_pool(SYNTH.values, idx, blk, w, SYNTH.expansion)
    if TABLES[tid][1]:
        return pooled.reshape(idx.shape[0], -1) @ SYNTH.out_proj.T
    return pooled


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("table", list(TABLES))
async def test_remote_gather_equals_local(clusters, shards, table):
    async with await GatherClient.connect(clusters[shards]) as client:
        t = client.table(table)
        assert (t.sharding, t.merged, client.layout.num_shards) == (*TABLES[table], shards)
        for T in (1, 33):
            idx, blk, w = random_queries(SYNTH, T, seed=T)
            got = await client.gather(table, idx, blk, w)
            want = _local(table, idx, blk, w)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_memory_lm_with_remote_tables_gives_the_same_logits(clusters, model, shards):
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        local = model(tokens)
    remote_model = MemoryLM(model.cfg).eval()
    remote_model.load_state_dict(model.state_dict())
    remote_model.drop_value_tables()
    assert all(layer.values.numel() == 0 for layer in remote_model.ultramem_layers())
    with RemoteValueStore(clusters[shards]) as backend:
        remote_model.set_value_backend(backend)
        with torch.no_grad():
            remote = remote_model(tokens)
    assert (remote - local).abs().max().item() <= 1e-5


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_lookup_cli_against_running_shards(clusters):
    res = _cli("lookup", "--target", clusters[3], "--table", "dim", "--random", "8")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["shape"] == [8, 4, 48] and summary["version"] == "s3"
    assert summary["shards"] == 3 and summary["finite"] and summary["abs_max"] > 0


def test_lookup_cli_failures_are_one_clear_sentence(clusters):
    runner = CliRunner()
    res = runner.invoke(app, ["lookup", "--target", clusters[2], "--table", "nope"])
    assert res.exit_code == 1
    err = " ".join(res.output.split())
    assert err.startswith("error: lookup failed: table 'nope' is not in store version 's2'")
    res = runner.invoke(
        app, ["lookup", "--target", clusters[2], "--table", "row", "--version", "s9"]
    )
    assert res.exit_code == 1
    assert "no target serves table version 's9'" in " ".join(res.output.split())
    res = runner.invoke(
        app, ["lookup", "--target", "127.0.0.1:1", "--table", "row", "--timeout", "1"]
    )
    assert res.exit_code == 1 and "no target answered Info" in " ".join(res.output.split())


def test_info_cli_lists_every_shard(clusters):
    res = _cli("info", "--target", clusters[2])
    assert res.returncode == 0, res.stderr
    infos = [json.loads(line) for line in res.stdout.splitlines()]
    assert sorted(i.get("shard_index", 0) for i in infos) == [0, 1]
    assert {t["table_id"] for t in infos[0]["tables"]} == {*TABLES, "mem0", "mem1"}
