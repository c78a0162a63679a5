"""Fixtures of the multi-host tests: one 3-host namespace cluster per module (needs root).

Imported by the test modules: a conftest.py here would shadow tests/conftest.py, which other
test packages import as ``conftest``."""

from __future__ import annotations

import pytest

from ultramem_dist.multihost import MultiHost, skip_reason


def require_harness() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster3():
    """Three namespace-hosts (1 GiB memory cgroup each) with Ray, and a driver connected."""
    require_harness()
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    with MultiHost(hosts=3, memory_limit_bytes=1 << 30) as mh:
        ray.init(
            address=mh.ray_address, namespace="ultramem", logging_level="ERROR", log_to_driver=False
        )
        try:
            yield mh
        finally:
            ray.shutdown()
    assert mh.leftovers() == []
