"""The streaming synthetic store writer: a regular, checksummed store whose rows are what the
files say, served correctly by a real shard server (no root needed)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors import safe_open

from ultramem_dist.errors import ExportError
from ultramem_dist.store.reader import verify_store
from ultramem_dist.store.synth import rows_for_bytes, synthetic_rows, write_synthetic_store


def test_rows_follow_the_seed_whatever_the_chunking(tmp_path):
    a = write_synthetic_store(tmp_path / "a", n_rows=70_001, dv=32, shards=3, chunk_rows=5000)
    b = write_synthetic_store(tmp_path / "b", n_rows=70_001, dv=32, shards=3)
    assert a["manifest"].files == b["manifest"].files  # same bytes, same checksums
    m = verify_store(tmp_path / "a")
    assert m.dtype == "bfloat16" and m.tables[0].sharding == "row"
    for slot in m.tables[0].shards:
        with safe_open(str(tmp_path / "a" / m.version / slot.file), "pt") as f:
            got = f.get_slice("mem0")[0:7]
        want = synthetic_rows(0, slot.row_lo, slot.row_lo + 7, 32).to(torch.bfloat16)
        assert torch.equal(got, want)
    assert a["store_bytes"] == 70_001 * 32 * 2 and rows_for_bytes(64 << 20, 256) == 1 << 17


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(ExportError, match="dtype"):
        write_synthetic_store(tmp_path, n_rows=10, dtype="int8")
    with pytest.raises(ExportError, match="divisible"):
        write_synthetic_store(tmp_path, n_rows=10, dv=33, shards=1)


def test_shard_server_answers_from_the_written_rows(tmp_path, spawn_shards):
    from ultramem_dist.client import GatherClient
    from ultramem_dist.kernels import gather_pool

    write_synthetic_store(tmp_path / "s", n_rows=9000, dv=32, shards=3, topm=4)
    procs = spawn_shards(tmp_path / "s", [0, 1, 2])
    targets = [p.target for p in procs]
    idx = torch.randint(0, 9000, (5, 8))
    blk = torch.randint(0, 4, (5, 8))
    w = torch.randn(5, 8, 2)

    async def call():
        async with await GatherClient.connect(targets) as client:
            return await client.gather("mem0", idx, blk, w)

    out = asyncio.run(call())
    rows = torch.stack([synthetic_rows(0, int(i), int(i) + 1, 32)[0] for i in idx.flatten()])
    rows = rows.to(torch.bfloat16).float()
    local = torch.arange(idx.numel()).reshape(idx.shape)
    torch.testing.assert_close(out, gather_pool(rows, local, blk, w, 4), atol=1e-5, rtol=1e-4)
