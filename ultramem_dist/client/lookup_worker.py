"""The lookup process: runs :class:`~ultramem_dist.client.GatherClient` calls for its parent.

Started by :class:`~ultramem_dist.client.process_store.LookupProcess` as
``python -m ultramem_dist.client.lookup_worker --fd N`` with one end of a socketpair. It reads
request frames (:mod:`ultramem_dist._private.frames`), runs each as an asyncio task (several in
flight at once), and writes one OK or ERROR frame per request, in completion order. It exits
when the parent closes its end (or dies).

Why a process: a gRPC call from Python costs this machine about a millisecond of interpreter
time on each side. In a thread of the decoding process that time is taken under the model's
GIL, so it stalls the very blocks the lookup should overlap; here it runs on another core.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import socket
from typing import Any

from ultramem_dist._private.frames import (
    HEADER,
    Kind,
    encode_error,
    frame,
    pack_array,
    raw_frame,
    unpack_gather,
)

__all__ = ["serve"]


class _Worker:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.clients: dict[int, Any] = {}
        self.next_handle = 1
        self.tasks: set[asyncio.Task[None]] = set()

    def reply(self, kind: int, rid: int, payload: Any) -> None:
        self.writer.write(frame(kind, rid, payload))

    async def handle(self, kind: int, rid: int, body: bytes) -> None:
        try:
            if kind == Kind.GATHER:
                handle, table_id, arrays = unpack_gather(body)
                indices, blocks, weights, *pre = arrays  # UltraMemV2: a fourth, pre_input
                out = await self.client(handle).gather(
                    table_id, indices, blocks, weights, pre_input=pre[0] if pre else None
                )
                self.writer.write(raw_frame(Kind.ARRAY, rid, pack_array(out.numpy())))
                return
            result = await self.control(kind, pickle.loads(body))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            self.reply(Kind.ERROR, rid, encode_error(exc))
        else:
            self.reply(Kind.OK, rid, result)

    async def control(self, kind: int, payload: Any) -> Any:
        from ultramem_dist.client.client import GatherClient

        if kind == Kind.OPEN:
            targets, version, deadline_s, connect_timeout_s, options = payload
            client = await GatherClient.connect(
                targets,
                version=version,
                deadline_s=deadline_s,
                connect_timeout_s=connect_timeout_s,
                options=options,
            )
            handle, self.next_handle = self.next_handle, self.next_handle + 1
            self.clients[handle] = client
            return handle, client.layout, client.version
        if kind == Kind.CLOSE:
            client = self.clients.pop(payload, None)
            if client is not None:
                await client.close()
            return None
        raise ValueError(f"unknown request kind {kind}")

    def client(self, handle: int) -> Any:
        try:
            return self.clients[handle]
        except KeyError:
            raise ValueError(f"store handle {handle} is closed") from None

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)


async def serve(sock: socket.socket) -> None:
    """Answer requests on ``sock`` until the other end closes it."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    worker = _Worker(writer)
    worker.reply(Kind.READY, 0, None)
    try:
        while True:
            try:
                size, kind, rid = HEADER.unpack(await reader.readexactly(HEADER.size))
                body = await reader.readexactly(size)
            except asyncio.IncompleteReadError:
                return  # the parent closed its end
            task = asyncio.ensure_future(worker.handle(kind, rid, body))
            worker.tasks.add(task)
            task.add_done_callback(worker.tasks.discard)
    finally:
        await worker.close()
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="ultramem-dist lookup process (internal)")
    parser.add_argument("--fd", type=int, required=True, help="inherited socketpair end")
    args = parser.parse_args()
    sock = socket.socket(fileno=args.fd)
    try:
        import uvloop  # its loop wakes several times faster than asyncio's on small VMs
    except ImportError:
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(serve(sock))
        else:
            asyncio.run(serve(sock))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
