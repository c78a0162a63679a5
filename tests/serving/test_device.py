"""The shard kernel's device: CPU everywhere, CUDA when the machine (or Ray actor) has a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_table_spec, random_queries

from ultramem_dist.kernels.gather_pool import dense_offsets
from ultramem_dist.serving.app import shard_to_device
from ultramem_dist.serving.servicer import kernel_plan, run_kernel
from ultramem_dist.serving.validate import GatherQuery
from ultramem_dist.store import export_tables
from ultramem_dist.store.reader import load_shard


@pytest.fixture
def shard(tmp_path):
    spec = make_table_spec(n_rows=64, dv=8)
    export_tables({"mem0": spec}, tmp_path, shards=1, by="row", version="v1")
    return spec, load_shard(tmp_path, 0, "v1")


def _query(spec, shard) -> GatherQuery:
    idx, blk, w = random_queries(spec, 3)
    return GatherQuery(
        table=shard.tables["mem0"],
        indices=idx.reshape(-1).numpy(),
        blocks=blk.reshape(-1).numpy(),
        weights=w.reshape(-1, w.shape[-1]).numpy(),
        offsets=dense_offsets(3, idx.shape[1]),
        num_tokens=3,
        num_blocks=spec.expansion,
    )


def test_cpu_device_keeps_the_memory_mapped_tables(shard):
    _, sl = shard
    assert shard_to_device(sl, "cpu") is sl


def test_cuda_without_a_gpu_is_a_clear_error(shard):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        shard_to_device(shard[1], "cuda")


@pytest.mark.gpu
def test_cuda_kernel_matches_cpu(shard):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    spec, sl = shard
    q = _query(spec, sl)
    cpu = torch.from_numpy(run_kernel(q, kernel_plan(q.table)))
    q_gpu = dataclasses.replace(q, table=shard_to_device(sl, "cuda").tables["mem0"])
    assert kernel_plan(q_gpu.table) is None  # a GPU table goes through gather_pool on cuda
    torch.testing.assert_close(torch.from_numpy(run_kernel(q_gpu)), cpu, atol=1e-5, rtol=1e-5)
