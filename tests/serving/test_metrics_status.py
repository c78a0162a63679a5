"""``ultramem-dist status`` reads QPS and latency from the shard servers' metrics:
``ShardActor.info()`` exports the Gather histogram, ``status_table`` turns two snapshots into
per-replica QPS and the median latency over the window (no Ray needed for either)."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace
from unittest import mock

from rich.console import Console

from ultramem_dist.cli.cluster_cmds import status_table
from ultramem_dist.cluster.actor import ShardActor, ShardSpec
from ultramem_dist.serving.metrics import ShardMetrics

VERSION = "v20261125T101010123456Z-0123abcd"


def actor_info(metrics: ShardMetrics, replica: int = 0) -> dict:
    """``ShardActor.info`` (the undecorated method) on a stand-in for a live actor."""
    fake = SimpleNamespace(
        _server=SimpleNamespace(servicer=SimpleNamespace(metrics=metrics)),
        spec=ShardSpec("dep-1", "/store", VERSION, shard=0, replica=replica),
        endpoint=f"127.0.0.1:{7000 + replica}",
        device="cpu",
        restarts=0,
    )
    return ShardActor.__ray_actor_class__.info(fake)


def record(m: ShardMetrics, seconds: float, n: int, code: str = "OK") -> None:
    for _ in range(n):
        m.begin("Gather")
        m.end("Gather", code, seconds, 100, 200)


def test_actor_info_reports_requests_errors_and_latency():
    m = ShardMetrics()
    record(m, 0.0004, 3)  # 3 calls in (0.25 ms, 0.5 ms]
    record(m, 0.0001, 2, code="INVALID_ARGUMENT")
    m.begin("Info")
    m.end("Info", "OK", 0.00001, 0, 50)  # not a Gather: not counted
    info = actor_info(m)
    assert info["requests"] == 5 and info["errors"] == 2
    assert info["latency_count"] == 3
    assert math.isclose(info["latency_sum_s"], 0.0012)
    assert info["latency_buckets"][-1] == [math.inf, 3]
    assert 0.25 < info["latency_p50_ms"] <= 0.5
    assert info["endpoint"] == "127.0.0.1:7000" and info["version"] == VERSION
    assert actor_info(ShardMetrics())["latency_p50_ms"] is None


def snapshot(infos: dict) -> dict:
    return {
        "active": "dep-1",
        "deployments": {
            "dep-1": {
                "version": VERSION,
                "state": "active",
                "replicas": {
                    0: {
                        r: {"endpoint": i["endpoint"], "alive": True, "info": i}
                        for r, i in infos.items()
                    }
                },
            }
        },
    }


def render(table, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_status_table_shows_window_qps_and_p50():
    busy, idle = ShardMetrics(), ShardMetrics()
    record(busy, 0.02, 10)  # before the window: 20 ms calls
    first = snapshot({0: actor_info(busy, 0), 1: actor_info(idle, 1)})
    record(busy, 0.0004, 40)  # during the window: 0.4 ms calls
    second = snapshot({0: actor_info(busy, 0), 1: actor_info(idle, 1)})
    with mock.patch("ultramem_dist.cluster.health.check_health", return_value="SERVING"):
        table = status_table(first, second, window=2.0)
    wide = render(table, 160)
    lines = [ln for ln in wide.splitlines() if "127.0.0.1:700" in ln]
    assert len(lines) == 2
    busy_row, idle_row = lines[0].split(), lines[1].split()
    assert busy_row[-3:] == ["50", "20.0", busy_row[-1]]  # reqs, QPS over 2 s, p50
    # the median of the window's calls only (0.4 ms), not the 20 ms calls before it
    assert 0.25 < float(busy_row[-1]) <= 0.5
    assert idle_row[-3:] == ["0", "0.0", "-"]
    assert VERSION in wide and "p50ms" in wide and "SERVING" in wide
    assert "over the last 2 s (- = no call in that window)" in " ".join(wide.split())
    # an 80-column terminal keeps every column and every row on one line (the version id,
    # however long, is in the deployment's heading, not a column)
    narrow = render(table, 80)
    assert max(len(ln.rstrip()) for ln in narrow.splitlines()) <= 80
    header = next(ln for ln in narrow.splitlines() if "endpoint" in ln)
    columns = "shd rep node endpoint health rst reqs QPS p50ms".split()
    assert header.split() == columns
    assert f"version {VERSION}, active" in narrow
    assert sum("127.0.0.1:700" in ln for ln in narrow.splitlines()) == 2
    assert "127.0.0.1:7000" in narrow and "127.0.0.1:7001" in narrow
