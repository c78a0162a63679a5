"""A user-space link delay: a TCP relay that holds every chunk for a fixed time.

For kernels without the ``netem`` qdisc (``tc qdisc ... netem`` answers "Specified qdisc kind
is unknown"). :class:`DelayRelay` listens on one address and, for every accepted connection,
opens one to ``target`` and copies bytes both ways; each chunk read is written on only after
``delay_ms`` for that direction has passed since it was read (a one-way delay). Order is kept
(one FIFO per direction, deadlines non-decreasing), nothing is rate-limited, and at most
``max_buffer_bytes`` per direction are held: past that the relay stops reading, so TCP flow
control pushes back on the sender instead of the relay growing. Half-closes are forwarded
(after the delay, like the data before them); :meth:`DelayRelay.close` ends every connection
and task it made.

The delay is a lower bound: a chunk is never forwarded earlier than ``delay_ms`` after it was
read, but the event loop's timers (1 ms granularity with epoll) and scheduling may hold it
longer.

As a process (the multi-host benchmark runs one inside a host's network namespace)::

    python -m ultramem_dist.multihost.delay --listen 127.0.0.1:PORT --target 198.18.1.2:PORT \
        --delay-ms 5 [--reply-delay-ms 0]

prints ``ready HOST:PORT`` once listening and exits cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time

CHUNK = 64 << 10


def _split(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {addr!r} is not HOST:PORT")
    return host, int(port)


class _Pipe:
    """One direction of one connection: read, stamp, hold, write."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay_s: float,
        max_buffer_bytes: int,
    ) -> None:
        self.reader, self.writer, self.delay_s = reader, writer, delay_s
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.held = 0
        self.max_buffer = max_buffer_bytes
        self.room = asyncio.Event()
        self.room.set()

    async def pump_in(self) -> None:
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(CHUNK)
                self.queue.put_nowait((time.monotonic() + self.delay_s, data))
                if not data:
                    return
                self.held += len(data)
                if self.held >= self.max_buffer:
                    self.room.clear()
        except (ConnectionError, OSError):
            self.queue.put_nowait((time.monotonic(), b""))

    async def pump_out(self) -> None:
        while True:
            due, data = await self.queue.get()
            while (wait := due - time.monotonic()) > 0:  # timers may fire a hair early
                await asyncio.sleep(wait)
            if not data:
                if self.writer.can_write_eof():
                    with contextlib.suppress(ConnectionError, OSError):
                        self.writer.write_eof()
                return
            self.writer.write(data)
            await self.writer.drain()
            self.held -= len(data)
            if self.held < self.max_buffer:
                self.room.set()


class DelayRelay:
    """``async with DelayRelay(listen, target, delay_ms) as relay:`` — ``relay.address`` is
    where clients connect. ``delay_ms`` holds client -> target bytes, ``reply_delay_ms``
    (default: the same) target -> client bytes."""

    def __init__(
        self,
        listen: str,
        target: str,
        delay_ms: float,
        reply_delay_ms: float | None = None,
        max_buffer_bytes: int = 4 << 20,
    ) -> None:
        if delay_ms < 0 or (reply_delay_ms is not None and reply_delay_ms < 0):
            raise ValueError("delays must be >= 0 ms")
        if max_buffer_bytes < CHUNK:
            raise ValueError(f"max_buffer_bytes must be at least {CHUNK}")
        self.listen = _split(listen)
        self.target = _split(target)
        self.delay_s = delay_ms / 1e3
        self.reply_delay_s = (delay_ms if reply_delay_ms is None else reply_delay_ms) / 1e3
        self.max_buffer = max_buffer_bytes
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("the relay is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> DelayRelay:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        return self

    async def __aenter__(self) -> DelayRelay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self._writers.add(c_writer)
        self.connections += 1
        u_writer = None
        pumps: list[asyncio.Task[None]] = []
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.target)
            self._writers.add(u_writer)
            up = _Pipe(c_reader, u_writer, self.delay_s, self.max_buffer)
            down = _Pipe(u_reader, c_writer, self.reply_delay_s, self.max_buffer)
            loop = asyncio.get_running_loop()
            pumps = [
                loop.create_task(c)
                for c in (up.pump_in(), up.pump_out(), down.pump_in(), down.pump_out())
            ]
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        except (ConnectionError, OSError):
            pass  # either side went away: close both
        finally:
            for task in pumps:
                task.cancel()
            if pumps:
                await asyncio.gather(*pumps, return_exceptions=True)
            for w in (c_writer, u_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
                    self._writers.discard(w)

    async def close(self) -> None:
        """Stop listening, end every connection, wait for every task of this relay."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in list(self._writers):
            w.close()
        self._writers.clear()


async def _main(args: argparse.Namespace) -> None:
    relay = await DelayRelay(args.listen, args.target, args.delay_ms, args.reply_delay_ms).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", relay.address, flush=True)
    try:
        await stop.wait()
    finally:
        await relay.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="TCP relay adding a fixed one-way delay")
    ap.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0: any)")
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, required=True, help="client -> target delay")
    ap.add_argument(
        "--reply-delay-ms", type=float, default=None, help="target -> client (default: same)"
    )
    args = ap.parse_args(argv)
    try:
        _split(args.listen), _split(args.target)
        if args.delay_ms < 0 or (args.reply_delay_ms or 0) < 0:
            raise ValueError("delays must be >= 0 ms")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_main(args))
    except OSError as exc:
        print(f"error: relay failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
