"""Bounded, verifying load generator for a sharded gather service.

``C`` concurrent callers share one :class:`~ultramem_dist.client.GatherClient` (the production
fan-out client: round robin over replicas, retries on ``UNAVAILABLE``, per-call deadlines) and
send Gather batches for ``duration_s`` seconds (or ``max_requests`` calls). Every answer is
checked against the reference computed locally from the store files
(:mod:`ultramem_dist.reliability.reference`): an answer is *ok*, *partial* or *wrong*; a call
that raises counts as an *error* under its gRPC status name.

Safety: by default every target must resolve to a loopback address (127.0.0.0/8, ::1); pass
``allow_remote=True`` (CLI ``--allow-remote``) to load another machine — only one you own.
The run always stops by itself: at ``duration_s`` (hard cap :data:`MAX_DURATION_S`) or after
``max_requests`` calls, whichever comes first.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ultramem_dist.client import ChannelOptions, GatherClient
from ultramem_dist.client.channels import is_loopback_target, split_targets
from ultramem_dist.reliability.reference import (
    OK,
    PARTIAL,
    WRONG,
    Expected,
    StoreReference,
    classify,
)

__all__ = [
    "MAX_DURATION_S",
    "LoadTestConfig",
    "LoadTestResult",
    "Sample",
    "check_targets",
    "percentile",
    "run_loadtest",
]

MAX_DURATION_S = 3600.0
_STATUS_RE = re.compile(r"\b([A-Z][A-Z_]{3,}): ")


def check_targets(targets: str | Sequence[str], allow_remote: bool = False) -> list[str]:
    """Split ``targets``; unless ``allow_remote``, refuse any that is not a loopback address."""
    out = split_targets(targets)
    if not allow_remote:
        remote = [t for t in out if not is_loopback_target(t)]
        if remote:
            raise ValueError(
                f"refusing to load non-loopback target(s) {remote}: load tests run against "
                "127.0.0.1/::1 only unless --allow-remote is given (use it only on machines you "
                "own)"
            )
    return out


@dataclass
class LoadTestConfig:
    """What to load, how hard and for how long."""

    targets: list[str]
    concurrency: int = 32
    duration_s: float = 60.0
    table: str | None = None
    """Table id; default: the first table of the served version (sorted by id)."""
    batch: int = 8
    """Query tokens T per Gather call."""
    store: Path | None = None
    """Store root holding the served version; required to verify answers."""
    verify: bool = True
    max_requests: int | None = None
    deadline_s: float = 5.0
    distinct_batches: int = 128
    """Distinct query batches (references computed up front, then reused round robin)."""
    seed: int = 0
    allow_remote: bool = False
    options: ChannelOptions | None = None
    keep_samples: bool = False
    """Keep every call's (start, end, outcome) in the result (chaos timelines)."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if self.batch < 1 or self.distinct_batches < 1:
            raise ValueError("batch and distinct_batches must be >= 1")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError("max_requests must be >= 1")
        if self.verify and self.store is None:
            raise ValueError(
                "verifying answers needs the served store (store=/--store STORE); "
                "pass verify=False/--no-verify to only count errors"
            )


@dataclass(frozen=True)
class Sample:
    """One call: monotonic start/end (s) and outcome (ok/partial/wrong/unverified/<STATUS>)."""

    start: float
    end: float
    outcome: str


@dataclass
class LoadTestResult:
    concurrency: int
    duration_s: float
    requests: int
    ok: int
    errors: int
    wrong: int
    partial: int
    errors_by_status: dict[str, int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    qps: float
    table: str
    batch: int
    shards: int
    replicas: list[int]
    sharding: str
    version: str
    verified: bool
    samples: list[Sample] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples")
        return d

    @property
    def passed(self) -> bool:
        return self.errors == 0 and self.wrong == 0 and self.partial == 0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``nan`` if empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def _status_of(exc: BaseException) -> str:
    m = _STATUS_RE.search(str(exc))
    return m.group(1) if m else type(exc).__name__


def _make_batches(
    client: GatherClient, table: str, cfg: LoadTestConfig
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    t = client.table(table)
    per = t.heads * t.topm
    g = torch.Generator().manual_seed(cfg.seed)
    out = []
    for _ in range(cfg.distinct_batches):
        idx = torch.randint(0, t.n_rows, (cfg.batch, per), generator=g)
        blk = torch.randint(0, t.expansion, (cfg.batch, per), generator=g)
        w = torch.randn(cfg.batch, per, t.num_cores, generator=g)
        out.append((idx, blk, w))
    return out


async def run_loadtest(
    cfg: LoadTestConfig,
    *,
    on_sample: Callable[[Sample], None] | None = None,
    stop: asyncio.Event | None = None,
) -> LoadTestResult:
    """Run the load; returns the counts and latency percentiles (never raises for failed calls).

    ``on_sample`` sees every finished call; setting ``stop`` ends the run early.
    """
    targets = check_targets(cfg.targets, cfg.allow_remote)
    client = await GatherClient.connect(
        targets,
        deadline_s=cfg.deadline_s,
        connect_timeout_s=max(cfg.deadline_s, 5.0),
        options=cfg.options,
    )
    async with client:
        table = cfg.table or sorted(client.layout.tables)[0]
        layout = client.table(table)
        batches = _make_batches(client, table, cfg)
        expected: list[Expected] = []
        if cfg.verify:
            assert cfg.store is not None
            ref = StoreReference(cfg.store, client.version).table(table)
            expected = [ref.expected(*b) for b in batches]

        counts: Counter[str] = Counter()
        latencies: list[float] = []
        samples: list[Sample] = []
        stop_event = stop or asyncio.Event()
        issued = 0
        t_begin = time.monotonic()
        t_end = t_begin + cfg.duration_s

        async def worker(wid: int) -> None:
            nonlocal issued
            i = wid
            while not stop_event.is_set() and time.monotonic() < t_end:
                if cfg.max_requests is not None and issued >= cfg.max_requests:
                    return
                issued += 1
                k = i % len(batches)
                i += cfg.concurrency
                idx, blk, w = batches[k]
                start = time.monotonic()
                try:
                    out = await client.gather(table, idx, blk, w)
                except Exception as exc:  # every failure is counted, none stops the run
                    outcome = _status_of(exc)
                else:
                    outcome = classify(out, expected[k]) if cfg.verify else "unverified"
                end = time.monotonic()
                latencies.append(end - start)
                counts[outcome] += 1
                sample = Sample(start, end, outcome)
                if cfg.keep_samples:
                    samples.append(sample)
                if on_sample is not None:
                    on_sample(sample)

        await asyncio.gather(*(worker(w) for w in range(cfg.concurrency)))
        elapsed = time.monotonic() - t_begin

    latencies.sort()
    ms = [x * 1e3 for x in latencies]
    answered = {OK, PARTIAL, WRONG, "unverified"}
    errors = {k: v for k, v in counts.items() if k not in answered}
    return LoadTestResult(
        concurrency=cfg.concurrency,
        duration_s=round(elapsed, 3),
        requests=len(latencies),
        ok=counts[OK] + counts["unverified"],
        errors=sum(errors.values()),
        wrong=counts[WRONG],
        partial=counts[PARTIAL],
        errors_by_status=dict(sorted(errors.items())),
        p50_ms=round(percentile(ms, 50), 3),
        p95_ms=round(percentile(ms, 95), 3),
        p99_ms=round(percentile(ms, 99), 3),
        max_ms=round(ms[-1], 3) if ms else math.nan,
        qps=round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        table=table,
        batch=cfg.batch,
        shards=client.layout.num_shards,
        replicas=[len(r) for r in client.replicas],
        sharding=layout.sharding + ("/merged" if layout.merged else ""),
        version=client.version,
        verified=cfg.verify,
        samples=samples,
    )
