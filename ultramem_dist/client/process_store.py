"""``ProcessValueStore``: the model's value backend with the gRPC client in a lookup process.

:class:`~ultramem_dist.client.RemoteValueStore` runs the asyncio client on a thread of the
decoding process. Every lookup then spends about a millisecond of interpreter time (gRPC's
Python layer, encode, fan-in) under the same GIL as the model's own Python, so a lookup that
"overlaps" blocks a..b in fact stalls them. Here that work runs in a child process
(:mod:`ultramem_dist.client.lookup_worker`); the decoding thread only pickles the selection onto
a socketpair (tens of microseconds) and reads the pooled values back when it needs them.

>>> with ProcessValueStore(["10.0.0.1:7000", "10.0.0.2:7000"]) as store:
...     model.set_value_backend(store)
...     model.generate(prompt, 64)

Replies are read by whichever thread waits on a future (``result()``/``exception()``/
``done()``): there is no reader thread to compete for the GIL. Several threads may wait at
once; frames for another thread's future are handed to it. If the lookup process dies, every
pending and later lookup fails with :class:`~ultramem_dist.errors.LookupProcessError`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ultramem_dist._private.frames import (
    HEADER,
    Kind,
    decode_error,
    pack_gather,
    pickled,
    raw_frame,
    unpack_array,
)
from ultramem_dist.client.channels import ChannelOptions
from ultramem_dist.client.layout import StoreLayout
from ultramem_dist.client.remote_store import (
    RemoteValueStore,
    SelectionLike,
    ValueStoreHandle,
    pre_input_of,
)
from ultramem_dist.client.router import host_array
from ultramem_dist.errors import LookupProcessError

__all__ = ["TRANSPORTS", "LookupProcess", "ProcessValueStore", "open_remote_store"]

TRANSPORTS = ("process", "thread")
"""Where a remote store's gRPC client runs: a lookup ``process`` or a ``thread`` of this one."""

_RBUF_BYTES = 1 << 16
_REPLY_KINDS = frozenset((Kind.OK, Kind.ERROR, Kind.READY, Kind.ARRAY))
_MAX_FRAME_BYTES = 1 << 31  # far above any reply (gRPC messages are capped well below)


class _BadHeader(Exception):
    """A frame header no lookup process writes: the byte stream is out of step."""


_GRACE_S = 10.0
"""How long past a lookup's own deadline the caller waits for the lookup process's answer
before declaring it hung (the process enforces the deadline itself; this is a backstop)."""


class _Pending(concurrent.futures.Future):  # type: ignore[type-arg]
    """A future whose waiters read the lookup process's replies themselves."""

    def __init__(
        self,
        owner: LookupProcess,
        rid: int,
        backstop: float,
        convert: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__()
        self._owner = owner
        self._rid = rid
        self._backstop = backstop
        self._convert = convert

    def _settled(self) -> bool:
        return super().done()

    def done(self) -> bool:
        if not self._settled():
            self._owner._pump(self, 0.0)
        return self._settled()

    def result(self, timeout: float | None = None) -> Any:
        self._owner._pump(self, timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._owner._pump(self, timeout)
        return super().exception(timeout=0)


class LookupProcess:
    """A child process that runs gRPC gather clients for this process (one per worker is
    enough; it hosts any number of :class:`ProcessValueStore` handles)."""

    def __init__(self, *, start_timeout_s: float = 60.0) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # it pools in numpy; no torch thread pool
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ultramem_dist.client.lookup_worker",
                    "--fd",
                    str(theirs.fileno()),
                ],
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        finally:
            theirs.close()
        self._sock = ours
        # replies are read into this buffer: a frame's header and body usually come in one recv
        self._rbuf = bytearray(_RBUF_BYTES)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0  # unread bytes: _rbuf[_rstart:_rend]
        self._owner_pid = os.getpid()
        self._send_lock = threading.RLock()  # also guards _pending against _fail_all
        self._read_lock = threading.Lock()
        self._next_rid = 1
        self._dead: str | None = None
        self._closed = False
        ready = _Pending(self, 0, time.monotonic() + start_timeout_s)  # request id 0: READY
        self._pending: dict[int, _Pending] = {0: ready}
        try:
            ready.result()
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc.poll() is None

    # ------------------------------------------------------------------ requests
    def _request(
        self,
        kind: int,
        body: bytes,
        backstop: float,
        convert: Callable[[Any], Any] | None = None,
    ) -> _Pending:
        if os.getpid() != self._owner_pid:
            raise LookupProcessError(
                "this lookup process belongs to the process that started it (pid "
                f"{self._owner_pid}); a forked child must open its own store"
            )
        with self._send_lock:
            if self._dead is not None:
                raise LookupProcessError(self._dead)
            if self._closed:
                raise LookupProcessError("the lookup process is closed")
            rid, self._next_rid = self._next_rid, self._next_rid + 1
            fut = _Pending(self, rid, backstop, convert)
            self._pending[rid] = fut
            try:
                self._sock.sendall(raw_frame(kind, rid, body))
            except OSError as exc:
                self._pending.pop(rid, None)
                self._fail_all(f"the lookup process is gone ({self._exit_status()}): {exc}")
                raise LookupProcessError(self._dead or str(exc)) from None
        return fut

    def call(self, kind: int, payload: Any, timeout_s: float) -> Any:
        """Send one request and wait for its answer (raises what the lookup process raised)."""
        return self._request(kind, pickled(payload), time.monotonic() + timeout_s).result()

    def gather(
        self,
        handle: int,
        table_id: str,
        indices: np.ndarray,
        blocks: np.ndarray,
        weights: np.ndarray,
        deadline_s: float,
        pre_input: np.ndarray | None = None,
    ) -> concurrent.futures.Future[torch.Tensor]:
        """Start one lookup on store ``handle``; resolves to the pooled float32 tensor.
        ``pre_input``: the UltraMemV2 ``[T, pre_vdim]`` input (framed as a fourth array)."""
        arrays: tuple[np.ndarray, ...] = (indices, blocks, weights)
        if pre_input is not None:
            arrays += (pre_input,)
        body = pack_gather(handle, table_id, arrays)
        backstop = time.monotonic() + deadline_s + _GRACE_S
        return self._request(Kind.GATHER, body, backstop, torch.from_numpy)

    # ------------------------------------------------------------------ replies
    def _pump(self, fut: _Pending, timeout: float | None) -> None:
        """Read replies until ``fut`` settles or ``timeout`` passes (TimeoutError; ``0`` only
        polls). Past its backstop the future fails with LookupProcessError."""
        until = None if timeout is None else time.monotonic() + timeout
        while not fut._settled():
            now = time.monotonic()
            if now >= fut._backstop:
                self._give_up(fut)
                return
            limit = fut._backstop if until is None else min(until, fut._backstop)
            if self._read_lock.acquire(blocking=False):
                try:
                    while not fut._settled() and self._read_one(limit - time.monotonic()):
                        pass
                finally:
                    self._read_lock.release()
            else:  # another thread is reading; it hands our reply over
                concurrent.futures.wait([fut], timeout=max(0.0, min(limit - now, 0.002)))
            if until is not None and time.monotonic() >= until and not fut._settled():
                if timeout == 0:
                    return
                raise TimeoutError(f"no lookup result within {timeout} s")

    def _give_up(self, fut: _Pending) -> None:
        if self._pending.pop(fut._rid, None) is fut:
            fut.set_exception(
                LookupProcessError(
                    f"the lookup process did not answer request {fut._rid} in time "
                    f"({self._exit_status()})"
                )
            )

    def _read_one(self, timeout: float) -> bool:
        """Read and dispatch one frame if one arrives within ``timeout``; False if none did."""
        if self._dead is not None:
            self._fail_all(self._dead)
            return False
        try:
            if self._rend - self._rstart < HEADER.size and not self._recv_some(timeout):
                return False
        except (OSError, EOFError) as exc:
            self._fail_all(f"the lookup process is gone ({self._exit_status()}): {exc}")
            return False
        try:  # a frame has begun: read all of it
            kind, rid, body = self._take_frame()
        except _BadHeader as exc:  # never block reading a length that means nothing
            self._abandon(f"unreadable frame from the lookup process ({exc})")
            return False
        except (OSError, EOFError) as exc:
            self._fail_all(f"the lookup process is gone ({self._exit_status()}): {exc}")
            return False
        except BaseException:  # e.g. KeyboardInterrupt between a frame's bytes
            self._abandon("a read from the lookup process was interrupted mid-frame")
            raise
        try:
            payload = unpack_array(body)[0] if kind == Kind.ARRAY else pickle.loads(body)
        except Exception as exc:  # noqa: BLE001 - a frame we cannot read poisons the stream
            self._abandon(f"unreadable frame from the lookup process ({type(exc).__name__}: {exc})")
            return False
        fut = self._pending.pop(rid, None)
        if fut is None:  # its waiter gave up (backstop) before the answer came
            return True
        if kind == Kind.ERROR:
            fut.set_exception(decode_error(payload))
        else:
            fut.set_result(payload if fut._convert is None else fut._convert(payload))
        return True

    def _recv_some(self, timeout: float | None) -> bool:
        """Append what the socket has to the read buffer. With a ``timeout``, wait at most that
        long for the first byte (False: none came); without, block."""
        if self._rstart == self._rend:
            self._rstart = self._rend = 0
        elif self._rend == len(self._rbuf):  # no room at the end: move the unread bytes up
            n = self._rend - self._rstart
            self._rbuf[:n] = self._rview[self._rstart : self._rend]
            self._rstart, self._rend = 0, n
        room = self._rview[self._rend :]
        if timeout is None:
            k = self._sock.recv_into(room)
        else:
            try:  # a reply that is already there costs no select() (the usual case at block b)
                k = self._sock.recv_into(room, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
                if not ready:
                    return False
                k = self._sock.recv_into(room)
        if k == 0:
            raise EOFError("connection closed")
        self._rend += k
        return True

    def _take_frame(self) -> tuple[int, int, bytearray]:
        """The next frame's kind, request id and body (a fresh bytearray), blocking until all of
        it has arrived."""
        while self._rend - self._rstart < HEADER.size:
            self._recv_some(None)
        size, kind, rid = HEADER.unpack_from(self._rbuf, self._rstart)
        if kind not in _REPLY_KINDS or size > _MAX_FRAME_BYTES:
            raise _BadHeader(f"header says kind {kind}, {size} bytes")
        start = self._rstart + HEADER.size
        have = self._rend - start
        if have >= size:
            body = bytearray(self._rview[start : start + size])
            self._rstart = start + size
            return kind, rid, body
        body = bytearray(size)  # a big reply: the rest goes straight into its own buffer
        body[:have] = self._rview[start : self._rend]
        self._rstart = self._rend = 0
        view = memoryview(body)
        while have < size:
            k = self._sock.recv_into(view[have:])
            if k == 0:
                raise EOFError("connection closed")
            have += k
        return kind, rid, body

    def _exit_status(self) -> str:
        code = self._proc.poll()
        if code is None:
            return f"pid {self._proc.pid} still running"
        return f"pid {self._proc.pid} exited with code {code}"

    def _abandon(self, reason: str) -> None:
        """The byte stream can no longer be trusted: stop the child and fail every lookup."""
        self._fail_all(reason)
        if self._proc.poll() is None:
            self._proc.kill()

    def _fail_all(self, reason: str) -> None:
        with self._send_lock:  # no request can be added to the batch failed here
            if self._dead is None:
                self._dead = reason
            pending, self._pending = self._pending, {}
        for fut in list(pending.values()):  # a reader may still pop from it: copy first
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                fut.set_exception(LookupProcessError(reason))

    # ------------------------------------------------------------------ lifecycle
    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the lookup process (it closes its channels first); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._sock.close()
        self._fail_all("the lookup process is closed")

    def __enter__(self) -> LookupProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProcessValueStore(ValueStoreHandle):
    """Value backend that pools rows on remote shards through a :class:`LookupProcess`
    (``submit(table_id, sel) -> Future``); same arguments as ``RemoteValueStore``.

    ``process``: a lookup process to share (its owner closes it); by default this store starts
    its own and stops it on :meth:`close`.
    """

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        version: str | None = None,
        deadline_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        options: ChannelOptions | None = None,
        process: LookupProcess | None = None,
    ) -> None:
        self._owns_process = process is None
        self._proc = LookupProcess() if process is None else process
        self.deadline_s = deadline_s
        self._closed = False
        try:
            self._handle, self._layout, self._version = self._proc.call(
                Kind.OPEN,
                (targets, version, deadline_s, connect_timeout_s, options),
                # Info to every target, then channel set-up: connect_timeout_s bounds both
                timeout_s=2 * connect_timeout_s + _GRACE_S,
            )
        except BaseException:
            if self._owns_process:
                self._proc.close()
            raise

    @property
    def layout(self) -> StoreLayout:
        return self._layout

    @property
    def version(self) -> str:
        return self._version

    @property
    def process(self) -> LookupProcess:
        return self._proc

    def submit(self, table_id: str, sel: SelectionLike) -> concurrent.futures.Future[torch.Tensor]:
        """Start pooling ``sel`` (with its ``pre_input``, if any); the future resolves to
        ``[T, E, Dv]``/``[T, D]`` float32."""
        if self._closed:
            raise RuntimeError("ProcessValueStore is closed")
        pre = pre_input_of(sel)
        return self._proc.gather(
            self._handle,
            table_id,
            host_array(sel.indices),
            host_array(sel.blocks),
            host_array(sel.weights),
            self.deadline_s,
            None if pre is None else host_array(pre.float()),
        )

    def close(self) -> None:
        """Close this store's channels (and the lookup process if it owns it); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._proc.alive:
                self._proc.call(Kind.CLOSE, self._handle, timeout_s=_GRACE_S)
        except LookupProcessError:
            pass  # the process is gone: nothing left to close there
        finally:
            if self._owns_process:
                self._proc.close()


def check_transport(transport: str) -> None:
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")


def open_remote_store(
    targets: str | Sequence[str],
    *,
    transport: str = "process",
    version: str | None = None,
    deadline_s: float = 5.0,
    options: ChannelOptions | None = None,
    process: LookupProcess | None = None,
) -> ValueStoreHandle:
    """The value backend for ``targets`` with its gRPC client where ``transport`` says: a
    :class:`ProcessValueStore` (on ``process`` when given, else its own lookup process) or a
    :class:`~ultramem_dist.client.remote_store.RemoteValueStore` (``"thread"``)."""
    check_transport(transport)
    if transport == "process":
        return ProcessValueStore(
            targets, version=version, deadline_s=deadline_s, options=options, process=process
        )
    return RemoteValueStore(targets, version=version, deadline_s=deadline_s, options=options)
