"""Lookups against a store of any size, checked against rows read independently from its files.

``python -m ultramem_dist.multihost.bigcheck CONFIG_JSON`` (run inside host 0) connects to the
shard replicas, times the very first Gather (cold: the shards' pages are not resident yet),
verifies ``verify_batches`` batches against the expected pooled values computed from rows read
straight from the safetensors files (``safe_open(...).get_slice``, no server code) with the
shared kernel, then times ``calls`` sequential Gathers (p50) and ``qps_s`` seconds of
``concurrency`` callers (QPS). Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def independent_expected(
    store: str | Path, indices: torch.Tensor, blocks: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Pooled values of a row-sharded, unmerged table computed from the files' own rows."""
    from safetensors import safe_open

    from ultramem_dist.kernels import gather_pool
    from ultramem_dist.store.reader import open_manifest

    vdir, manifest = open_manifest(store)
    entry = manifest.tables[0]
    flat = indices.flatten().tolist()
    rows = torch.empty(len(flat), entry.dv)
    handles = {s.file: safe_open(str(vdir / s.file), "pt") for s in entry.shards}
    for j, r in enumerate(flat):
        slot = next(s for s in entry.shards if s.row_lo <= r < s.row_hi)
        got = handles[slot.file].get_slice(slot.tensor)[r - slot.row_lo : r - slot.row_lo + 1]
        rows[j] = got[0].float()
    local = torch.arange(len(flat)).reshape(indices.shape)
    return gather_pool(rows, local, blocks, weights.float(), entry.expansion)


async def run(cfg: dict[str, Any]) -> dict[str, Any]:
    from ultramem_dist.client import GatherClient

    t0 = time.perf_counter()
    client = await GatherClient.connect(cfg["targets"], deadline_s=cfg.get("deadline_s", 30.0))
    connect_ms = (time.perf_counter() - t0) * 1e3
    async with client:
        table = sorted(client.layout.tables)[0]
        t = client.table(table)
        per = t.heads * t.topm
        g = torch.Generator().manual_seed(cfg.get("seed", 0))
        batch = cfg.get("batch", 64)

        def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return (
                torch.randint(0, t.n_rows, (batch, per), generator=g),
                torch.randint(0, t.expansion, (batch, per), generator=g),
                torch.randn(batch, per, t.num_cores, generator=g),
            )

        first_q = make()
        t1 = time.perf_counter()
        first = await client.gather(table, *first_q)
        first_ms = (time.perf_counter() - t1) * 1e3
        checks = [(first_q, first)]
        for _ in range(cfg.get("verify_batches", 3) - 1):
            q = make()
            checks.append((q, await client.gather(table, *q)))
        wrong = 0
        max_err = 0.0
        for q, out in checks:
            want = independent_expected(cfg["store"], *q)
            err = (out - want).abs().max().item()
            max_err = max(max_err, err)
            wrong += int(not torch.allclose(out, want, atol=1e-5, rtol=1e-4))
        queries = [make() for _ in range(16)]
        lat = []
        for i in range(cfg.get("calls", 100)):
            t2 = time.perf_counter()
            await client.gather(table, *queries[i % len(queries)])
            lat.append((time.perf_counter() - t2) * 1e3)
        calls = 0
        qps_s = cfg.get("qps_s", 0.0)
        t_end = time.monotonic() + qps_s

        async def worker(w: int) -> None:
            nonlocal calls
            i = w
            while time.monotonic() < t_end:
                await client.gather(table, *queries[i % len(queries)])
                calls += 1
                i += 1

        t3 = time.perf_counter()
        if qps_s > 0:
            await asyncio.gather(*(worker(w) for w in range(cfg.get("concurrency", 8))))
        elapsed = time.perf_counter() - t3
    return {
        "connect_ms": round(connect_ms, 2),
        "first_lookup_ms": round(first_ms, 2),
        "verified_batches": len(checks),
        "wrong": wrong,
        "max_abs_err": max_err,
        "p50_ms": round(statistics.median(lat), 3) if lat else None,
        "qps_calls": calls,
        "qps": round(calls / elapsed, 1) if qps_s > 0 else None,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))))
