"""The native CPU gather-pool against the torch path, and how it is built, chosen and refused."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultramem_dist.kernels import column_segments, gather_pool, native
from ultramem_dist.kernels.gather_pool import native_plan

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler here")


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 50),
    tokens=st.integers(1, 6),
    length=st.integers(0, 12),
    blocks=st.integers(1, 5),
    cores=st.sampled_from([1, 2, 4]),
    width=st.sampled_from([1, 3, 8, 16, 24, 72]),
    ragged=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    extra_cols=st.integers(0, 3),
    data=st.data(),
)
def test_native_equals_torch_path(
    rows, tokens, length, blocks, cores, width, ragged, dtype, extra_cols, data
):
    """Dense or ragged queries, any column slice of an MCS table (dimension shards), half
    storage and row strides wider than the slice: both paths give the same pools."""
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    dv = cores * width
    lo = data.draw(st.integers(0, dv - 1))
    hi = data.draw(st.integers(lo + 1, dv))
    wide = torch.randn(rows, dv + extra_cols, generator=gen).to(dtype)
    table = wide[:, lo:hi]  # rows are dv + extra_cols apart in memory
    segs = column_segments(lo, hi, dv, cores)
    if ragged:
        lengths = torch.randint(0, length + 1, (tokens,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        nnz = int(offsets[-1])
        idx = torch.randint(0, rows, (nnz,), generator=gen)
        blk = torch.randint(0, blocks, (nnz,), generator=gen)
        w = torch.randn(nnz, cores, generator=gen)
    else:
        offsets = None
        idx = torch.randint(0, rows, (tokens, length), generator=gen)
        blk = torch.randint(0, blocks, (tokens, length), generator=gen)
        w = torch.randn(tokens, length, cores, generator=gen)
    kw = dict(segments=segs, offsets=offsets)
    ref = gather_pool(table, idx, blk, w, blocks, backend="torch", **kw)
    out = gather_pool(table, idx, blk, w, blocks, backend="native", **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 40),
    tokens=st.integers(1, 5),
    length=st.integers(0, 10),
    blocks=st.integers(1, 4),
    cores=st.sampled_from([1, 2]),
    width=st.sampled_from([1, 8, 24]),
    pre_dim=st.sampled_from([1, 7, 8, 32, 33]),
    ragged=st.booleans(),
    gelu=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    data=st.data(),
)
def test_native_pre_values_equal_torch_path(
    rows, tokens, length, blocks, cores, width, pre_dim, ragged, gelu, dtype, data
):
    """UltraMemV2 pre-values: the native single pass (pre-value row . pre_input, GELU or not,
    scale, pool) equals the torch path (activation, then pooling) for every dtype, dense and
    ragged queries, a column slice of the values (a dim shard keeps the pre-values whole) and
    pre-value rows strided wider than pre_vdim."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    dv = cores * width
    lo = data.draw(st.integers(0, dv - 1))
    hi = data.draw(st.integers(lo + 1, dv))
    table = torch.randn(rows, dv, generator=gen).to(dtype)[:, lo:hi]
    pre = torch.randn(rows, pre_dim + 2, generator=gen).to(dtype)[:, :pre_dim]
    pre_in = torch.randn(tokens, pre_dim, generator=gen)
    if ragged:
        lengths = torch.randint(0, length + 1, (tokens,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        shape: tuple[int, ...] = (int(offsets[-1]),)
    else:
        offsets, shape = None, (tokens, length)
    idx = torch.randint(0, rows, shape, generator=gen)
    blk = torch.randint(0, blocks, shape, generator=gen)
    w = torch.randn(*shape, cores, generator=gen)
    kw = dict(
        segments=column_segments(lo, hi, dv, cores), offsets=offsets, pre_values=pre,
        pre_input=pre_in, pre_gelu=gelu,
    )  # fmt: skip
    ref = gather_pool(table, idx, blk, w, blocks, backend="torch", **kw)
    out = gather_pool(table, idx, blk, w, blocks, backend="native", **kw)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    # and the activation really is applied: without it the pools differ (unless all zero)
    plain = gather_pool(table, idx, blk, w, blocks, segments=kw["segments"], offsets=offsets)
    if idx.numel() and ref.abs().max() > 1e-3:
        assert not torch.allclose(plain, ref, atol=1e-5)


def test_native_pre_value_plan_refuses_what_it_would_misread():
    """A pre-value plan needs pre_input of [T, pre_vdim] float32; pre-values must cover the
    table's rows in its dtype; a plain plan refuses a pre_input."""
    lib = native.library()
    table = np.ones((10, 8), dtype=np.float32)
    segs = column_segments(0, 8, 8, 1)
    args = (np.zeros(2, np.int64), np.zeros(2, np.int64), np.ones((2, 1), np.float32))
    tok = np.array([0, 2], dtype=np.int64)
    plan = native_plan(table, segs, 1, pre=np.ones((10, 4), np.float32))
    with pytest.raises(ValueError, match="required"):
        plan.run(*args, tok, 1, 1)
    with pytest.raises(TypeError, match="pre_input"):
        plan.run(*args, tok, 1, 1, pre_input=np.ones((1, 3), np.float32))
    out = plan.run(*args, tok, 1, 1, pre_input=np.full((1, 4), 0.5, np.float32))
    gelu2 = 2.0 * 0.5 * (1 + torch.erf(torch.tensor(2.0) / 2**0.5)).item()  # GELU(4 * .5)
    np.testing.assert_allclose(out, np.full((1, 1, 8), 2 * gelu2, np.float32), rtol=1e-6)
    with pytest.raises(ValueError, match="cover"):
        native.NativePlan(lib, table, plan.segments, 1, False, 8, pre=np.ones((9, 4), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        native.NativePlan(lib, table, plan.segments, 1, False, 8, pre=np.ones((10, 4), np.float16))
    plain = native_plan(table, segs, 1)
    with pytest.raises(ValueError, match="no pre-values"):
        plain.run(*args, tok, 1, 1, pre_input=np.ones((1, 4), np.float32))


@pytest.mark.parametrize("ragged", [False, True])
def test_native_sum_segments_equals_torch_path(ragged):
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(30, 3 * 16, generator=gen)  # merged rows: 3 segments of D = 16
    idx = torch.randint(0, 30, (5, 7), generator=gen)
    blk = torch.zeros_like(idx)
    w = torch.randn(5, 7, 3, generator=gen)
    kw = {}
    if ragged:
        kw["offsets"] = torch.arange(0, 36, 7)
        idx, blk, w = idx.reshape(-1), blk.reshape(-1), w.reshape(-1, 3)
    ref = gather_pool(table, idx, blk, w, 1, sum_segments=True, backend="torch", **kw)
    out = gather_pool(table, idx, blk, w, 1, sum_segments=True, backend="native", **kw)
    assert out.shape == (5, 1, 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_auto_uses_native_for_inference_and_torch_for_autograd():
    table = torch.randn(20, 8, requires_grad=True)
    idx = torch.randint(0, 20, (3, 4))
    blk = torch.randint(0, 2, (3, 4))
    w = torch.randn(3, 4, 2, requires_grad=True)
    out = gather_pool(table, idx, blk, w, 2)  # grad enabled: the torch path, differentiable
    out.sum().backward()
    assert table.grad is not None and w.grad is not None
    with pytest.raises(RuntimeError, match="autograd needs the torch path"):
        gather_pool(table, idx, blk, w, 2, backend="native")
    with torch.no_grad():
        torch.testing.assert_close(
            gather_pool(table, idx, blk, w, 2), gather_pool(table, idx, blk, w, 2, backend="torch")
        )


def test_native_refuses_out_of_range_rows_and_blocks():
    table = torch.randn(10, 4)
    w = torch.ones(1, 2, 1)
    with pytest.raises(IndexError, match="row index 10 at entry 1"):
        gather_pool(
            table,
            torch.tensor([[0, 10]]),
            torch.zeros(1, 2, dtype=torch.long),
            w,
            1,
            backend="native",
        )
    with pytest.raises(IndexError, match="block id -1 at entry 0"):
        gather_pool(table, torch.tensor([[0, 1]]), torch.tensor([[-1, 0]]), w, 1, backend="native")
    with pytest.raises(RuntimeError, match="table dtype float64 is not supported"):
        gather_pool(
            table.double(),
            torch.tensor([[0, 1]]),
            torch.zeros(1, 2, dtype=torch.long),
            w,
            1,
            backend="native",
        )


def test_build_is_cached_and_reports_compiler_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("ULTRAMEM_NATIVE_DIR", str(tmp_path))
    first = native.build()
    assert first.parent == tmp_path and native.build() == first  # same source+flags: reused
    monkeypatch.setenv("ULTRAMEM_NATIVE_CFLAGS", "-DUM_TEST_KEY=1")
    assert native.build() != first  # flags are part of the key
    monkeypatch.setenv("ULTRAMEM_NATIVE_CFLAGS", "-fno-such-flag-anywhere")
    names = " + ".join(src.name for src in native.SOURCES)  # gather_pool.c + ...
    with pytest.raises(RuntimeError, match=f"compiling {re.escape(names)} failed"):
        native.build()
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="no C compiler found"):
        native.build()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".so", ".so"]  # no partial files


def _run(code: str, **env: str) -> str:
    full = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_disabled_or_unbuildable_falls_back_to_torch(tmp_path):
    code = (
        "import torch; from ultramem_dist.kernels import gather_pool, native\n"
        "t = torch.randn(6, 4); i = torch.tensor([[1, 2, 5]]); b = torch.tensor([[0, 1, 0]])\n"
        "w = torch.randn(1, 3, 2)\n"
        "out = gather_pool(t, i, b, w, 2)\n"
        "ref = gather_pool(t, i, b, w, 2, backend='torch')\n"
        "print(native.library() is None, bool(torch.allclose(out, ref)))"
    )
    assert _run(code, ULTRAMEM_NATIVE="0") == "True True"
    assert _run(code, CC="no-such-compiler-xyz", ULTRAMEM_NATIVE_DIR=str(tmp_path)) == "True True"


def test_cli_builds_the_library(tmp_path):
    out = tmp_path / "lib.so"
    assert _run(f"from ultramem_dist.kernels.native import main; main(['--out', '{out}'])")
    assert out.stat().st_size > 0


def test_a_plan_refuses_arrays_it_would_misread():
    """The plan reads its inputs by address: a wrong dtype, shape, layout or CSR end is refused
    before the C call, never read as garbage."""
    plan = native_plan(torch.arange(40.0).view(10, 4), column_segments(0, 4, 4, 1), 1)
    assert plan is not None
    idx = np.array([1, 2], dtype=np.int64)
    blk = np.zeros(2, dtype=np.int64)
    w = np.ones((2, 1), dtype=np.float32)
    off = np.array([0, 2], dtype=np.int64)
    out = plan.run(idx, blk, w, off, 1, 1)
    np.testing.assert_array_equal(out, [[[12.0, 14.0, 16.0, 18.0]]])
    with pytest.raises(TypeError, match="idx: expected a C-contiguous int64"):
        plan.run(idx.astype(np.int32), blk, w, off, 1, 1)
    with pytest.raises(TypeError, match="blk"):
        plan.run(idx, np.zeros(4, dtype=np.int64)[::2], w, off, 1, 1)
    with pytest.raises(TypeError, match="weights"):
        plan.run(idx, blk, np.ones((2, 2), dtype=np.float32), off, 1, 1)
    with pytest.raises(ValueError, match="tok_off must run from 0 to nnz=2"):
        plan.run(idx, blk, w, np.array([0, 3], dtype=np.int64), 1, 1)
    with pytest.raises(IndexError, match="row index 10 at entry 1"):
        plan.run(np.array([0, 10], dtype=np.int64), blk, w, off, 1, 1)


def _cpu_has_avx2_fma_f16c() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def test_isa_is_chosen_at_run_time():
    """The vector kernel runs where the CPU has AVX2/FMA/F16C, whatever the build flags, and
    ``ULTRAMEM_NATIVE_ISA=generic`` selects the portable one."""
    lib = native.library()
    if os.environ.get("ULTRAMEM_NATIVE_ISA") == "generic":
        assert lib.isa == "generic"
    elif platform.machine() in ("x86_64", "AMD64"):
        assert lib.isa == ("avx2" if _cpu_has_avx2_fma_f16c() else "generic")


@pytest.mark.parametrize("isa", ["dispatched", "generic"])
def test_generic_build_equals_torch_path(tmp_path, isa):
    """Built with no architecture flags at all (``ULTRAMEM_NATIVE_CFLAGS=""``) into a fresh
    cache, both the run-time-dispatched vector kernel and the portable one pass the property
    test against the torch path for every dtype (a subprocess: the library loads once)."""
    env = {"ULTRAMEM_NATIVE_CFLAGS": "", "ULTRAMEM_NATIVE_DIR": str(tmp_path)}
    if isa == "generic":
        env["ULTRAMEM_NATIVE_ISA"] = "generic"
    full = {k: v for k, v in os.environ.items() if k != "ULTRAMEM_NATIVE_ISA"} | env
    tests = (
        f"{__file__}::test_native_equals_torch_path",
        f"{__file__}::test_native_pre_values_equal_torch_path",
        f"{__file__}::test_isa_is_chosen_at_run_time",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # built there, with those flags
