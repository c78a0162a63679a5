"""A shard server whose port is taken says so in one sentence and exits 1 (no traceback)."""

from __future__ import annotations

import socket
import subprocess

from conftest import CLI, make_table_spec

from ultramem_dist.store import export_tables


def test_port_in_use_is_a_clear_error(tmp_path):
    export_tables({"t": make_table_spec()}, tmp_path / "s", shards=1, by="row", version="v1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [*CLI, "serve-shard", str(tmp_path / "s"), "--shard", "0", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1
    assert f"could not bind 127.0.0.1:{port} (in use?)" in proc.stderr
    assert "Traceback" not in proc.stderr
