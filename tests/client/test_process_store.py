"""ProcessValueStore / LookupProcess: the gRPC client in a child process, futures pumped by
their waiters, errors carried back with their types, a dead child failing loudly."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
import types

import numpy as np
import pytest
import torch
from conftest import make_table_spec, random_queries
from hypothesis import given, settings
from hypothesis import strategies as st

from ultramem_dist._private.frames import (
    decode_error,
    encode_error,
    pack_array,
    pack_gather,
    unpack_array,
    unpack_gather,
)
from ultramem_dist.client import LookupProcess, ProcessValueStore, RemoteValueStore
from ultramem_dist.errors import (
    InvalidRequestError,
    LookupProcessError,
    RemoteError,
    ShardUnavailableError,
    TableNotFoundError,
    VersionMismatchError,
)
from ultramem_dist.kernels import gather_pool
from ultramem_dist.model import Selection
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables

SPEC = make_table_spec()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, in_process_shard):
    root = tmp_path_factory.mktemp("store")
    export_tables(
        {"row": SPEC, "dim": SPEC}, root, shards=2, by={"row": "row", "dim": "dim"}, version="v1"
    )
    servers = [in_process_shard(ServerConfig(store=root, shard=k, version="v1")) for k in (0, 1)]
    return ",".join(s.target for s in servers)


@pytest.fixture(scope="module")
def process():
    proc = LookupProcess()
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def store(shards, process):
    with ProcessValueStore(shards, process=process) as s:
        yield s


def _sel(num_tokens: int, seed: int = 1) -> Selection:
    return Selection(*random_queries(SPEC, num_tokens, seed=seed))


def _ref(sel: Selection) -> torch.Tensor:
    return gather_pool(SPEC.values, sel.indices, sel.blocks, sel.weights, SPEC.expansion)


@pytest.mark.parametrize("table", ["row", "dim"])
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 300])  # 300: a reply above the read buffer
def test_results_equal_the_local_kernel(store, table, num_tokens):
    sel = _sel(num_tokens, seed=num_tokens)
    fut = store.submit(table, sel)
    assert isinstance(fut, concurrent.futures.Future)
    out = fut.result(timeout=30)
    assert out.dtype == torch.float32 and out.shape == (
        num_tokens,
        SPEC.expansion,
        SPEC.values.shape[1],
    )
    torch.testing.assert_close(out, _ref(sel))
    torch.testing.assert_close(store.lookup(table, sel, timeout=30), _ref(sel))


def test_same_answers_as_the_thread_store(store, shards):
    sel = _sel(9, seed=5)
    with RemoteValueStore(shards) as threaded:
        assert threaded.layout == store.layout and threaded.version == store.version == "v1"
        assert torch.equal(threaded.lookup("row", sel, 30), store.lookup("row", sel, 30))


def test_mixed_sizes_in_flight_are_read_back_whole(store):
    """Small and big replies (below and above the 64 KiB read buffer) queued behind each other
    are cut into frames correctly whatever the order they are collected in."""
    sels = [_sel(n, seed=i) for i, n in enumerate([1, 300, 2, 200, 1, 600, 3])]
    futs = [store.submit("row", sel) for sel in sels]
    time.sleep(0.5)  # let the replies pile up in the socket
    for fut, sel in reversed(list(zip(futs, sels, strict=True))):
        torch.testing.assert_close(fut.result(timeout=30), _ref(sel))


def test_many_in_flight_collected_in_any_order(store):
    sels = [_sel(1 + k % 5, seed=100 + k) for k in range(40)]
    futs = [store.submit("row" if k % 2 else "dim", s) for k, s in enumerate(sels)]
    for fut, sel in reversed(list(zip(futs, sels, strict=True))):
        torch.testing.assert_close(fut.result(timeout=30), _ref(sel))


def test_done_polls_without_blocking(store):
    sel = _sel(3)
    fut = store.submit("row", sel)
    deadline = time.monotonic() + 30
    while not fut.done():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    torch.testing.assert_close(fut.result(timeout=0), _ref(sel))
    # a done callback runs once the reply is read, in the reading thread
    seen = []
    fut2 = store.submit("dim", sel)
    fut2.add_done_callback(lambda f: seen.append(f.result()))
    fut2.result(timeout=30)
    torch.testing.assert_close(seen[0], _ref(sel))


def test_timeout_raises_timeout_error_and_loses_nothing(store):
    sel = _sel(2)
    fut = store.submit("row", sel)
    try:  # a zero wait almost never sees the answer; when it does, fine
        fut.result(timeout=0)
    except TimeoutError:
        pass
    torch.testing.assert_close(fut.result(timeout=30), _ref(sel))


def test_threads_share_one_process(store):
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for k in range(25):
                sel = _sel(1 + k % 4, seed=seed * 1000 + k)
                torch.testing.assert_close(store.lookup("row", sel, timeout=30), _ref(sel))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_errors_keep_their_type_and_the_store_keeps_working(store):
    sel = _sel(2)
    with pytest.raises(TableNotFoundError, match="nope"):
        store.submit("nope", sel).result(timeout=30)
    bad = Selection(sel.indices, sel.blocks, sel.weights[..., :1])
    with pytest.raises(InvalidRequestError, match="weights shape"):
        store.lookup("row", bad, timeout=30)
    out_of_range = Selection(sel.indices + 10**6, sel.blocks, sel.weights)
    with pytest.raises(InvalidRequestError):
        store.lookup("dim", out_of_range, timeout=30)
    torch.testing.assert_close(store.lookup("row", sel, timeout=30), _ref(sel))


def test_connect_errors_are_raised_and_nothing_is_left_running(shards):
    before = _children()
    with pytest.raises(VersionMismatchError):
        ProcessValueStore(shards, version="v9", connect_timeout_s=5)
    with pytest.raises(ShardUnavailableError):
        ProcessValueStore("127.0.0.1:1", connect_timeout_s=1)
    assert _children() <= before


def test_two_stores_on_one_process_close_independently(shards, process):
    a = ProcessValueStore(shards, process=process)
    b = ProcessValueStore(shards, process=process)
    sel = _sel(4)
    a.close()
    a.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        a.submit("row", sel)
    torch.testing.assert_close(b.lookup("row", sel, timeout=30), _ref(sel))
    b.close()
    assert process.alive  # a shared process belongs to its owner


def test_a_dead_lookup_process_fails_every_lookup_clearly(shards):
    store = ProcessValueStore(shards)
    pid = store.process.pid
    sel = _sel(2)
    torch.testing.assert_close(store.lookup("row", sel, timeout=30), _ref(sel))
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(LookupProcessError, match=f"pid {pid}"):
        for _ in range(100):  # the first submits may still be written before the end is seen
            store.lookup("row", sel, timeout=30)
    assert time.monotonic() - t0 < 10
    with pytest.raises(LookupProcessError):
        store.submit("row", sel)
    store.close()
    assert not store.process.alive


def test_own_process_stops_on_close(shards):
    with ProcessValueStore(shards) as store:
        pid = store.process.pid
        assert pid in _children()
    assert pid not in _children()


def test_error_frames_rebuild_the_exception_type():
    assert isinstance(decode_error(encode_error(TableNotFoundError("t"))), TableNotFoundError)
    assert isinstance(decode_error(encode_error(ValueError("v"))), ValueError)
    assert isinstance(decode_error(encode_error(TimeoutError("late"))), TimeoutError)
    odd = decode_error(("SomethingElse", "boom"))
    assert isinstance(odd, RemoteError) and "SomethingElse: boom" in str(odd)
    assert str(decode_error(encode_error(InvalidRequestError("bad ids")))) == "bad ids"


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            out.add(int(pid))
    return out


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([np.int32, np.int64, np.float32, np.float64, np.uint8, np.float16]),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    table_id=st.text(max_size=12),
    handle=st.integers(0, 2**32 - 1),
)
def test_gather_frames_round_trip(dtype, shape, table_id, handle):
    rng = np.random.default_rng(0)
    arrays = [
        (rng.standard_normal(shape) * 100).astype(dtype),
        np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape),
        np.asfortranarray(rng.standard_normal((3, 2))).astype(dtype),  # not C-contiguous
    ]
    h, t, back = unpack_gather(pack_gather(handle, table_id, arrays))
    assert (h, t) == (handle, table_id)
    for a, b in zip(arrays, back, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    out, end = unpack_array(bytearray(pack_array(arrays[0])))
    assert out.flags.writeable and end == len(pack_array(arrays[0]))  # torch.from_numpy-safe
    np.testing.assert_array_equal(out, arrays[0])


def test_an_unreadable_frame_stops_the_process_instead_of_misreading(shards, monkeypatch):
    import ultramem_dist.client.process_store as ps

    store = ProcessValueStore(shards)
    try:
        sel = _sel(2)
        torch.testing.assert_close(store.lookup("row", sel, timeout=30), _ref(sel))

        def corrupt(*_):
            raise ValueError("bad dtype string")

        monkeypatch.setattr(ps, "unpack_array", corrupt)
        with pytest.raises(LookupProcessError, match="unreadable frame.*bad dtype"):
            store.lookup("row", sel, timeout=30)
        monkeypatch.undo()
        with pytest.raises(LookupProcessError):  # never a later frame read out of step
            store.lookup("row", sel, timeout=30)
        store.process._proc.wait(10)
        assert not store.process.alive
    finally:
        store.close()


def test_a_forked_child_cannot_use_its_parents_lookup_process(store, monkeypatch):
    import ultramem_dist.client.process_store as ps

    forked = types.SimpleNamespace(getpid=lambda: os.getpid() + 1, environ=os.environ)
    monkeypatch.setattr(ps, "os", forked)  # the module's view only: as seen from a fork
    with pytest.raises(LookupProcessError, match="forked child must open its own store"):
        store.submit("row", _sel(1))
    monkeypatch.undo()
    sel = _sel(1)
    torch.testing.assert_close(store.lookup("row", sel, timeout=30), _ref(sel))
