"""Verified, bounded load from inside a namespace-host, with every call's timeline kept.

Run in host 0 (:func:`start_load`): it drives :func:`ultramem_dist.reliability.loadtest.
run_loadtest` against the shard replicas' 198.18.x endpoints, every answer checked against
the store files (ok / partial / wrong), prints ``first`` when the first call finished and
writes ``{"result": ..., "samples": [[start, end, outcome], ...]}`` to its output file.
Monotonic clocks are shared by all namespaces, so the caller can line the samples up with the
moment it injected a fault.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ultramem_dist.multihost.harness import Host


@dataclass
class LoadRun:
    proc: subprocess.Popen[str]
    out: Path

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise TimeoutError(f"the load did not finish within {timeout}s") from None
        if self.proc.returncode != 0 or not self.out.is_file():
            raise RuntimeError(f"the load failed (rc {self.proc.returncode}): {err[-3000:]}")
        return json.loads(self.out.read_text())


def start_load(
    host: Host,
    targets: list[str],
    store: str | Path,
    out: Path,
    *,
    duration_s: float = 10.0,
    concurrency: int = 4,
    batch: int = 8,
    deadline_s: float = 2.0,
    verify: bool = True,
    first_timeout_s: float = 60.0,
) -> LoadRun:
    """Start the load inside ``host`` and return once its first call finished."""
    cfg = {
        "targets": targets,
        "store": str(store),
        "duration_s": duration_s,
        "concurrency": concurrency,
        "batch": batch,
        "deadline_s": deadline_s,
        "verify": verify,
        "out": str(out),
    }
    proc = host.popen(
        [sys.executable, "-m", "ultramem_dist.multihost.load", json.dumps(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + first_timeout_s
    line = proc.stdout.readline()  # "first" (or EOF if it died)
    if line.strip() != "first" or time.monotonic() > deadline:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise RuntimeError(f"the load did not start: {line!r} {err[-3000:]}")
    return LoadRun(proc, out)


async def _main(cfg: dict[str, Any]) -> None:
    """Concurrent verified calls; each sample keeps its error message (which shard failed)."""
    import torch

    from ultramem_dist.client import GatherClient
    from ultramem_dist.reliability.loadtest import _status_of
    from ultramem_dist.reliability.reference import StoreReference, classify

    client = await GatherClient.connect(
        cfg["targets"], deadline_s=cfg["deadline_s"], connect_timeout_s=10.0
    )
    samples: list[list[Any]] = []
    async with client:
        table = sorted(client.layout.tables)[0]
        t = client.table(table)
        per = t.heads * t.topm
        g = torch.Generator().manual_seed(0)
        batches = [
            (
                torch.randint(0, t.n_rows, (cfg["batch"], per), generator=g),
                torch.randint(0, t.expansion, (cfg["batch"], per), generator=g),
                torch.randn(cfg["batch"], per, t.num_cores, generator=g),
            )
            for _ in range(32)
        ]
        ref = StoreReference(cfg["store"], client.version).table(table) if cfg["verify"] else None
        expected = [ref.expected(*b) for b in batches] if ref is not None else []
        print("first", flush=True)
        t_end = time.monotonic() + cfg["duration_s"]

        async def worker(wid: int) -> None:
            i = wid
            while time.monotonic() < t_end:
                k = i % len(batches)
                i += cfg["concurrency"]
                start = time.monotonic()
                message = ""
                try:
                    out = await client.gather(table, *batches[k])
                except Exception as exc:  # noqa: BLE001 - every failure is a sample
                    outcome, message = _status_of(exc), str(exc)[:300]
                else:
                    outcome = classify(out, expected[k]) if ref is not None else "unverified"
                samples.append([start, time.monotonic(), outcome, message])

        await asyncio.gather(*(worker(w) for w in range(cfg["concurrency"])))
    Path(cfg["out"]).write_text(json.dumps({"samples": samples, "version": client.version}))


def summarize(samples: list[list[Any]], deadline_s: float) -> dict[str, Any]:
    """Counts of a load's samples: requests, ok, errors (by status), wrong, partial, hung
    (calls that outlived the deadline by more than a second) and the slowest call."""
    from collections import Counter

    outcomes = Counter(s[2] for s in samples)
    durations = [(s[1] - s[0]) * 1e3 for s in samples]
    answered = {"ok", "wrong", "partial", "unverified"}
    return {
        "requests": len(samples),
        "ok": outcomes["ok"] + outcomes["unverified"],
        "errors": sum(v for k, v in outcomes.items() if k not in answered),
        "errors_by_status": {k: v for k, v in sorted(outcomes.items()) if k not in answered},
        "wrong": outcomes["wrong"],
        "partial": outcomes["partial"],
        "hung": sum(1 for d in durations if d > (deadline_s + 1.0) * 1e3),
        "max_call_ms": round(max(durations, default=0.0), 2),
    }


if __name__ == "__main__":
    asyncio.run(_main(json.loads(sys.argv[1])))
