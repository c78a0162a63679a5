"""Live servers and expected outputs for ``npm test`` (clients/node/test/service.test.js).

Run by the Node tests themselves when ``ULTRAMEM_ROUTER``/``ULTRAMEM_SHARDS``/``ULTRAMEM_EXPECTED``
are not set: exports a 2-shard store of three random tables (row, dim, merged) and two
UltraMemV2 shared tables with pre-values (row, dim) into a temp dir, starts two
``ultramem-dist serve-shard`` processes and one ``serve-router`` on free loopback ports, writes
the expected outputs (computed by the shared kernel on the full tables, exactly as
tests/runtimes/test_node_client.py does) and prints ONE JSON line with the three variables.
Everything is stopped and removed when stdin closes (the Node test ends) or on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "runtimes")]

from test_node_client import expected_outputs, export_store  # noqa: E402

CLI = [sys.executable, "-m", "ultramem_dist.cli"]


def wait_ready(path: Path, proc: subprocess.Popen, timeout: float = 90.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if path.is_file() and path.stat().st_size:
            return int(json.loads(path.read_text())["port"])
        time.sleep(0.1)
    raise TimeoutError(f"{proc.args} was not ready in {timeout:.0f} s")


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ultramem-node-fixture-"))
    procs: list[subprocess.Popen] = []

    def stop(*_: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        store = tmp / "store"
        export_store(store)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
            "PYTHONPATH", "")])}
        ports = []
        for k in (0, 1):
            ready = tmp / f"shard{k}.json"
            procs.append(subprocess.Popen(
                [*CLI, "serve-shard", str(store), "--shard", str(k), "--ready-file", str(ready)],
                env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr,
            ))
            ports.append(wait_ready(ready, procs[-1]))
        shards = ",".join(f"127.0.0.1:{p}" for p in reversed(ports))
        ready = tmp / "router.json"
        procs.append(subprocess.Popen(
            [*CLI, "serve-router", "--targets", shards, "--ready-file", str(ready)],
            env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr,
        ))
        router = wait_ready(ready, procs[-1])
        expected = tmp / "expected.json"
        expected.write_text(json.dumps(expected_outputs()))
        print(json.dumps({
            "ULTRAMEM_ROUTER": f"127.0.0.1:{router}",
            "ULTRAMEM_SHARDS": shards,
            "ULTRAMEM_EXPECTED": str(expected),
        }), flush=True)
        sys.stdin.read()  # until the Node test closes our stdin (or exits)
    finally:
        stop()


if __name__ == "__main__":
    main()
