"""Shard servers let idle OpenMP kernel threads sleep instead of spinning against gRPC."""

from __future__ import annotations

import os

from ultramem_dist.cli import _idle_threads_sleep


def test_shard_servers_let_idle_kernel_threads_sleep(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    _idle_threads_sleep(["export", "ckpt"])
    assert "OMP_WAIT_POLICY" not in os.environ
    _idle_threads_sleep(["serve-shard", "store"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own setting wins
    _idle_threads_sleep(["serve-shard", "store"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
