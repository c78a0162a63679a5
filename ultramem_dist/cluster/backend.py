"""``ClusterValueStore``: a value backend that follows the registry's active deployment.

It holds one client store for the active deployment — a
:class:`~ultramem_dist.client.process_store.ProcessValueStore` (``transport="process"``, the
default: the gRPC client runs in a lookup process, off the model's GIL) or a
:class:`~ultramem_dist.client.remote_store.RemoteValueStore` (``transport="thread"``: on a thread
of this process) — and a watcher thread that long-polls the registry. When the active
deployment (or its set of endpoints) changes, a new store is connected *before* it replaces the
old one, so every lookup is served wholly by one deployment — one layout, one table version —
and the old one is closed only after the requests already sent to it finished.

``options`` (:class:`~ultramem_dist.client.channels.ChannelOptions`) secure every connection,
including the ones opened after a switch: ``tls_ca`` / ``tls_cert`` + ``tls_key`` (mutual TLS)
and ``auth_token`` for deployments started with TLS or bearer tokens. The registry lists replica
endpoints by IP address, so set ``tls_server_name`` to a name the shard certificate carries
unless it names those addresses.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

import ray
import torch

from ultramem_dist.client.channels import ChannelOptions
from ultramem_dist.client.process_store import LookupProcess, check_transport, open_remote_store
from ultramem_dist.client.remote_store import ValueStoreHandle
from ultramem_dist.cluster.registry import get_registry

log = logging.getLogger(__name__)


def _endpoints(dep: dict[str, Any]) -> list[str]:
    return sorted(r["endpoint"] for reps in dep["replicas"].values() for r in reps.values())


class ClusterValueStore:
    """Backend for :meth:`MemoryLM.set_value_backend` that resolves shards via the registry."""

    def __init__(
        self,
        *,
        deadline_s: float = 5.0,
        poll_s: float = 5.0,
        close_grace_s: float | None = None,
        options: ChannelOptions | None = None,
        transport: str = "process",
    ) -> None:
        check_transport(transport)
        self.transport = transport
        self.deadline_s = deadline_s
        self.options = options
        self.poll_s = poll_s
        self.close_grace_s = deadline_s if close_grace_s is None else close_grace_s
        self._registry = get_registry()
        state = ray.get(self._registry.active.remote())
        if state["deployment"] is None:
            raise LookupError("the registry has no active deployment (run `ultramem-dist up`)")
        self._epoch = state["epoch"]
        self._key = (state["deployment"]["deployment_id"], _endpoints(state["deployment"]))
        self._process = LookupProcess() if transport == "process" else None
        try:
            self._store = self._connect(state["deployment"])
        except BaseException:
            if self._process is not None:
                self._process.close()
            raise
        self.switches = 0
        self._stopping = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch, name="ultramem-registry-watch", daemon=True
        )
        self._watcher.start()

    def _connect(self, dep: dict[str, Any]) -> ValueStoreHandle:
        return open_remote_store(
            _endpoints(dep),
            transport=self.transport,
            version=dep["version"],
            deadline_s=self.deadline_s,
            options=self.options,
            process=self._process,
        )

    @property
    def version(self) -> str:
        return self._store.version

    @property
    def deployment_id(self) -> str:
        return self._key[0]

    def submit(self, table_id: str, sel: Any) -> Future[torch.Tensor]:
        return self._store.submit(table_id, sel)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            try:
                state = ray.get(self._registry.wait_change.remote(self._epoch, self.poll_s))
            except Exception as exc:  # noqa: BLE001 - the registry restarts; keep watching
                log.warning("registry watch failed: %s", exc)
                self._stopping.wait(1.0)
                continue
            self._epoch = state["epoch"]
            dep = state["deployment"]
            if dep is None or dep["state"] != "active":
                continue
            key = (dep["deployment_id"], _endpoints(dep))
            if key == self._key:
                continue
            try:
                new = self._connect(dep)
            except Exception as exc:  # noqa: BLE001 - keep serving from the current one
                log.warning("could not connect to deployment %s yet: %s", key[0], exc)
                self._stopping.wait(0.5)
                continue
            old, self._store, self._key = self._store, new, key
            self.switches += 1
            threading.Thread(target=self._close_later, args=(old,), daemon=True).start()

    def _close_later(self, store: ValueStoreHandle) -> None:
        time.sleep(self.close_grace_s)
        store.close()

    def close(self) -> None:
        self._stopping.set()
        self._watcher.join(timeout=self.poll_s + 5)
        try:
            self._store.close()
        finally:
            if self._process is not None:
                self._process.close()  # also ends stores still waiting in _close_later

    def __enter__(self) -> ClusterValueStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
