"""The Node.js client (``clients/node``) against real servers: its own ``node --test`` suite runs
with endpoints of live shard servers (a row, a dim and a merged table, and two UltraMemV2 shared
tables with pre-values, row and dim) and a router, and compares its lookups with values computed
here by the shared kernel on the full tables (V2: ``UltraMemV2Layer.pool``).

Plain ``npm test`` starts its own servers (``clients/node/test/fixture.py``); here the
endpoints are handed in, and ``examples/lookup.js`` is run against the router too.
``npm ci`` runs once (``clients/node/node_modules`` is kept, git-ignored); skipped only if
``node`` is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_table_spec, micro_v2_model, random_queries

from ultramem_dist.kernels import gather_pool
from ultramem_dist.router import RouterConfig, build_router
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables
from ultramem_dist.store.export import shared_table_spec

NODE_DIR = REPO / "clients" / "node"
SPEC = make_table_spec(n_rows=700, dv=32, d_model=24)
TABLES = {"row": ("row", False), "dim": ("dim", False), "mrg": ("row", True)}
V2_TABLES = {"v2row": "row", "v2dim": "dim"}
"""UltraMemV2 shared tables (with pre-values) in the same store: a micro model's table twice."""

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
]


def npm_install() -> None:
    """``npm ci`` into clients/node/node_modules unless it is already there (file-locked so
    parallel test runs do not install over each other)."""
    marker = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    lock_file = Path(tempfile.gettempdir()) / f"ultramem-npm-{os.getuid()}.lock"
    with open(lock_file, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime:
            return
        npm = shutil.which("npm")
        assert npm is not None, "node is installed but npm is not: cannot install clients/node"
        res = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{res.stdout}\n{res.stderr}"


class BackgroundRouter:
    """A router on its own event loop thread."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            server, port = await build_router(cfg)
            await server.start()
            return server, port

        self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.stop(0.5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def v2_model():
    """The micro UltraMemV2 model whose shared table the V2 tables serve (seeded)."""
    return micro_v2_model(21)


def export_store(out: Path) -> None:
    """The 2-shard store of the Node tests: the v1 tables and the V2 tables, version v1."""
    spec = shared_table_spec(v2_model())
    export_tables(
        {**{tid: SPEC for tid in TABLES}, **{tid: spec for tid in V2_TABLES}},
        out,
        shards=2,
        by={**{tid: by for tid, (by, _) in TABLES.items()}, **V2_TABLES},
        merged={
            **{tid: merged for tid, (_, merged) in TABLES.items()},
            **dict.fromkeys(V2_TABLES, False),
        },
        version="v1",
    )


def expected_v2_outputs(num_tokens: int) -> dict:
    """Queries of a V2 layer and their pooled values by ``UltraMemV2Layer.pool`` on the local
    shared table, ``[T, 1, Dv]`` as the shards answer; ``pre_input`` flat for v2row and as
    ``[T][pre_vdim]`` rows for v2dim (the client takes both)."""
    model = v2_model()
    layer = model.v2_layers[1]
    tables = {}
    for seed, (tid, by) in enumerate(V2_TABLES.items()):
        x = torch.randn(
            num_tokens, model.cfg.d_model, generator=torch.Generator().manual_seed(seed)
        )
        with torch.no_grad():
            sel = layer.select(x)
            pre = layer.pre_input(x)
            out = layer.pool(model.shared_table, sel, pre).unsqueeze(1)
        tables[tid] = {
            "sharding": by,
            "num_tokens": num_tokens,
            "indices": sel.indices.reshape(-1).tolist(),
            "blocks": sel.blocks.reshape(-1).tolist(),
            "weights": sel.weights.reshape(-1).tolist(),
            "pre_vdim": pre.shape[1],
            "pre_input": pre.reshape(-1).tolist() if by == "row" else pre.tolist(),
            "expected": {"shape": list(out.shape), "values": out.reshape(-1).tolist()},
        }
    return tables


def expected_outputs(num_tokens: int = 5) -> dict:
    tables = {}
    for seed, (tid, (by, merged)) in enumerate(TABLES.items()):
        idx, blk, w = random_queries(SPEC, num_tokens, seed=10 + seed)
        out = gather_pool(SPEC.values, idx, blk, w, SPEC.expansion)  # [T, E, Dv]
        if merged:  # the IVE projectors folded in: [T, D]
            out = out.reshape(num_tokens, -1) @ SPEC.out_proj.T
        tables[tid] = {
            "sharding": by,
            "num_tokens": num_tokens,
            "indices": idx.reshape(-1).tolist(),
            "blocks": blk.reshape(-1).tolist(),
            "weights": w.reshape(-1).tolist(),
            "expected": {"shape": list(out.shape), "values": out.reshape(-1).tolist()},
        }
    tables.update(expected_v2_outputs(num_tokens))
    return {"version": "v1", "num_shards": 2, "tables": tables}


def test_node_client_through_router_and_direct(tmp_path, in_process_shard):
    npm_install()
    store = tmp_path / "store"
    export_store(store)
    shards = [in_process_shard(ServerConfig(store=store, shard=k)) for k in (0, 1)]
    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps(expected_outputs()))
    router = BackgroundRouter(RouterConfig(targets=[s.target for s in shards]))
    try:
        env = {
            **os.environ,
            "ULTRAMEM_ROUTER": f"127.0.0.1:{router.port}",
            "ULTRAMEM_SHARDS": ",".join(s.target for s in reversed(shards)),
            "ULTRAMEM_EXPECTED": str(expected),
            "NODE_OPTIONS": "",
        }
        res = subprocess.run(
            ["node", "--test", "--test-reporter=tap", "test/"],
            cwd=NODE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        example = subprocess.run(
            ["node", "examples/lookup.js", f"127.0.0.1:{router.port}", "dim"],
            cwd=NODE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        dead = subprocess.run(
            ["node", "examples/lookup.js", "127.0.0.1:1"],
            cwd=NODE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        router.stop()
    assert example.returncode == 0, example.stderr
    assert "table dim (dim): shape [2,4,32]" in example.stdout, example.stdout
    assert dead.returncode == 1 and "(gRPC code 14)" in dead.stderr, dead.stderr
    report = res.stdout + res.stderr
    assert res.returncode == 0, report[-6000:]
    # every test ran: none skipped for lack of endpoints
    assert "# fail 0" in report and "# skipped 0" in report, report[-3000:]
    assert "# pass 9" in report, report[-3000:]


def test_expected_outputs_are_not_trivial():
    """Guards the comparison itself: the tables' outputs differ from each other and from 0."""
    data = expected_outputs(num_tokens=2)["tables"]
    values = {tid: torch.tensor(t["expected"]["values"]) for tid, t in data.items()}
    assert all(v.abs().max() > 1e-3 for v in values.values())
    assert not torch.allclose(values["row"], values["dim"])
    # the V2 expectations include the pre-value activation (without it they would differ)
    model, q = v2_model(), data["v2row"]
    idx = torch.tensor(q["indices"]).reshape(2, -1)
    w = torch.tensor(q["weights"]).reshape(*idx.shape, -1)
    plain = gather_pool(model.shared_table.values, idx, torch.zeros_like(idx), w, 1)
    assert not torch.allclose(plain.reshape(-1), values["v2row"], atol=1e-4)
