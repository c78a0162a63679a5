"""The user-space link delay (ultramem_dist.multihost.delay): a lower bound on the added time,
bytes unchanged both ways, nothing left after close.

The loopback tests need nothing special (~3 s); the one across a real veth hop between two
namespace-hosts skips without root, like the other multihost tests.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time

import multihost_fixtures  # tests/multihost is on sys.path (pytest prepend import mode)
import pytest

from ultramem_dist.multihost import MultiHost
from ultramem_dist.multihost.delay import CHUNK, DelayRelay

require_harness = multihost_fixtures.require_harness


async def _echo_server() -> asyncio.base_events.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def _port(server: asyncio.base_events.Server) -> int:
    return server.sockets[0].getsockname()[1]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(("delay_ms", "reply_ms"), [(5.0, None), (3.0, 0.0), (0.0, 0.0)])
def test_round_trip_gains_at_least_the_delays(delay_ms, reply_ms):
    async def run() -> list[float]:
        server = await _echo_server()
        async with DelayRelay(
            f"127.0.0.1:{0}", f"127.0.0.1:{_port(server)}", delay_ms, reply_ms
        ) as relay:
            host, port = relay.address.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            rtts = []
            for i in range(20):
                t0 = time.monotonic()
                writer.write(bytes([i]))
                await writer.drain()
                assert await reader.readexactly(1) == bytes([i])
                rtts.append(time.monotonic() - t0)
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return rtts

    added = (delay_ms + (delay_ms if reply_ms is None else reply_ms)) / 1e3
    rtts = asyncio.run(run())
    assert min(rtts) >= added  # a lower bound only: what the relay guarantees


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_bytes_pass_unchanged_both_ways(seed):
    """Random payloads (empty to 1.5 MiB, random write sizes) each way on one connection, with
    a buffer bound of one chunk so the relay's back-pressure is exercised; the server answers
    its own random payload after the client's half-close, which the relay must forward."""
    rng = random.Random(seed)
    up = rng.randbytes(rng.choice([0, 1, 1000, 70_000, 1_500_000]))
    down = rng.randbytes(rng.choice([0, 1, 4096, 200_000, 1_500_000]))
    got_up = bytearray()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            got_up.extend(data)
        writer.write(down)
        await writer.drain()
        writer.close()

    async def run() -> bytes:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        relay = DelayRelay(
            "127.0.0.1:0", f"127.0.0.1:{_port(server)}", 1.0, 0.5, max_buffer_bytes=CHUNK
        )
        async with relay:
            host, port = relay.address.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            pos = 0
            while pos < len(up):
                n = rng.randint(1, 300_000)
                writer.write(up[pos : pos + n])
                await writer.drain()
                pos += n
            writer.write_eof()
            got = await reader.read()
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return got

    assert asyncio.run(run()) == down
    assert bytes(got_up) == up


def test_close_ends_every_connection_task_and_socket():
    async def run() -> None:
        server = await _echo_server()
        fds = _open_fds()
        relay = await DelayRelay("127.0.0.1:0", f"127.0.0.1:{_port(server)}", 50.0).start()
        host, port = relay.address.rsplit(":", 1)
        clients = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
        for _, w in clients:
            w.write(b"x" * 10_000)  # in flight inside the relay when it closes
        await asyncio.sleep(0.02)
        assert relay.connections == 3
        await relay.close()
        for r, w in clients:
            assert await asyncio.wait_for(r.read(), 5) == b""  # the relay hung up
            w.close()
            await w.wait_closed()
        await asyncio.sleep(0.05)  # the echo server's handlers see EOF and close
        assert asyncio.all_tasks() == {asyncio.current_task()}
        server.close()
        await server.wait_closed()
        assert _open_fds() <= fds

    asyncio.run(run())


def test_relay_process_exits_cleanly_and_refuses_bad_input():
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "ultramem_dist.multihost.delay",
            "--listen",
            "nope",
            "--target",
            "127.0.0.1:1",
            "--delay-ms",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ultramem_dist.multihost.delay",
            "--listen",
            "127.0.0.1:0",
            "--target",
            "127.0.0.1:1",
            "--delay-ms",
            "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready 127.0.0.1:")
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


ECHO = (
    "import socket,sys\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],0));s.listen(4);print(s.getsockname()[1],flush=True)\n"
    "c,_=s.accept()\n"
    "while d:=c.recv(65536): c.sendall(d)\n"
)
PING = (
    "import socket,sys,time,random\n"
    "host,port=sys.argv[1].rsplit(':',1);c=socket.create_connection((host,int(port)),10)\n"
    "rtts=[];rng=random.Random(7)\n"
    "for i in range(10):\n"
    "    p=rng.randbytes(rng.randint(1,50000));t=time.monotonic();c.sendall(p);got=b''\n"
    "    while len(got)<len(p): got+=c.recv(65536)\n"
    "    rtts.append(time.monotonic()-t);assert got==p\n"
    "print(min(rtts))\n"
)


def test_delay_across_a_veth_hop_between_namespace_hosts():
    """The relay in host 0 (loopback) forwarding over the bridge to an echo server in host 1:
    the round trip gains at least 2 x 5 ms and the relay process ends on SIGTERM."""
    require_harness()
    mh = MultiHost(hosts=2, memory_limit_bytes=256 << 20, ray=False)
    with mh:
        h0, h1 = mh.hosts
        echo = h1.popen([sys.executable, "-c", ECHO, h1.ip], stdout=subprocess.PIPE, text=True)
        port = int(echo.stdout.readline())
        relay = h0.popen(
            [
                sys.executable,
                "-m",
                "ultramem_dist.multihost.delay",
                "--listen",
                "127.0.0.1:0",
                "--target",
                f"{h1.ip}:{port}",
                "--delay-ms",
                "5",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        address = relay.stdout.readline().split()[1]
        ping = h0.run([sys.executable, "-c", PING, address], timeout=60)
        assert ping.returncode == 0, ping.stderr
        assert float(ping.stdout) >= 0.010
        relay.terminate()
        assert relay.wait(timeout=20) == 0
    assert mh.leftovers() == []
