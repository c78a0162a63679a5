"""Child of ``test_torch_free.py``: runs ``ultramem-dist serve-shard`` in this (fresh) interpreter's
main thread, and from a second thread calls it — unary ``Gather`` and ``GatherStream`` with the
requests the parent wrote, plus one bad request of each kind — then records the answers and
whether ``torch`` was ever imported, and stops the server with SIGTERM.

Usage: ``python _torch_free_child.py STORE WORKDIR`` (WORKDIR holds ``req-*.bin``; the answers go
to ``WORKDIR/out-*.npy`` and ``WORKDIR/result.json``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import grpc
import numpy as np

from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb

GATHER = "/ultramem.v1.GatherPool/Gather"
STREAM = "/ultramem.v1.GatherPool/GatherStream"


def _pooled(reply: pb.GatherReply) -> np.ndarray:
    t = reply.pooled
    assert t.dtype == pb.DTYPE_FLOAT32, t.dtype
    return np.frombuffer(t.data, dtype=np.float32).reshape(tuple(t.shape))


def _client(ready: Path, work: Path, result: dict) -> None:
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the shard did not write its ready file")
            time.sleep(0.02)
        port = json.loads(ready.read_text())["port"]
        requests = sorted(work.glob("req-*.bin"))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            unary = ch.unary_unary(GATHER, response_deserializer=pb.GatherReply.FromString)
            for path in requests:  # the request's own bytes, as a client library wrote them
                reply = unary(path.read_bytes(), timeout=30)
                np.save(work / f"out-unary-{path.stem}.npy", _pooled(reply))
            bad = pb.GatherRequest.FromString(requests[0].read_bytes())
            bad.table_id = "no-such-table"
            try:
                unary(bad.SerializeToString(), timeout=30)
                result["bad_unary"] = "OK"
            except grpc.RpcError as exc:
                result["bad_unary"] = exc.code().name
            messages = [
                pb.StreamGatherRequest(
                    request_id=i + 1, gather=pb.GatherRequest.FromString(p.read_bytes())
                )
                for i, p in enumerate(requests)
            ]
            messages.append(pb.StreamGatherRequest(request_id=99, gather=bad))
            stream = ch.stream_stream(
                STREAM,
                request_serializer=pb.StreamGatherRequest.SerializeToString,
                response_deserializer=pb.StreamGatherReply.FromString,
            )
            replies = {r.request_id: r for r in stream(iter(messages), timeout=30)}
            for i, path in enumerate(requests):
                r = replies[i + 1]
                assert r.code == 0, (r.code, r.message)
                np.save(work / f"out-stream-{path.stem}.npy", _pooled(r.gather))
            result["bad_stream"] = grpc.StatusCode.NOT_FOUND.value[0] == replies[99].code
        result["answered"] = len(requests)
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        result["torch_imported"] = "torch" in sys.modules
        (work / "result.json").write_text(json.dumps(result))
        os.kill(os.getpid(), signal.SIGTERM)  # the server's graceful stop


def main() -> None:
    store, work = Path(sys.argv[1]), Path(sys.argv[2])
    ready = work / "ready.json"
    result: dict = {}
    threading.Thread(target=_client, args=(ready, work, result), daemon=True).start()
    from ultramem_dist.cli import main as cli_main

    sys.argv = [
        "ultramem-dist", "serve-shard", str(store), "--shard", "0", "--port", "0",
        "--threads", "1", "--grace", "1", "--verify", "always", "--ready-file", str(ready),
    ]  # fmt: skip
    try:
        cli_main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


if __name__ == "__main__":
    main()
