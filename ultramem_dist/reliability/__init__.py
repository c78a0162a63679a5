"""Reliability tooling: verifying load generator, chaos harness, request fuzzers.

Everything here targets loopback by default and stops by itself (bounded duration and request
counts). See docs/reliability.md.
"""

from ultramem_dist.reliability.loadtest import (
    LoadTestConfig,
    LoadTestResult,
    check_targets,
    run_loadtest,
)
from ultramem_dist.reliability.reference import StoreReference, classify

__all__ = [
    "LoadTestConfig",
    "LoadTestResult",
    "StoreReference",
    "check_targets",
    "classify",
    "run_loadtest",
]
