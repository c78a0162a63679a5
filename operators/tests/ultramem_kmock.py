"""A kmock-based fake cluster and a way to run the real operator against it.

``kmock.KubernetesEmulator`` stores objects and streams watch events but leaves a few API-server
duties out; :class:`ClusterEmulator` adds the ones the operator and kopf rely on: ``uid``,
``resourceVersion`` (kopf waits for its own patches to come back), ``generation``,
``generateName`` (kopf's Events), ``labelSelector`` on lists, and a chronological log of writes
so tests can assert the order of a rollout. There is no StatefulSet controller and no garbage
collector: tests set ``status.readyReplicas`` themselves and emulate owner-reference GC.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kmock
import kopf
import operator_path  # noqa: F401  (puts operators/ on sys.path)
from kmock._internal import enums
from ultramem_operator.handlers import OperatorConfig, register
from ultramem_operator.kube import KubeApi

VS = "ultramem.io/v1alpha1/valuestores"
STS = "apps/v1/statefulsets"
SVC = "v1/services"
JOB = "batch/v1/jobs"
EVENTS = "v1/events"


@dataclass(frozen=True)
class Write:
    """One successful-looking write request, in arrival order."""

    seq: int
    verb: str  # create | patch | delete
    resource: str  # plural, e.g. "statefulsets"
    name: str
    subresource: str | None
    data: Any


class ClusterEmulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.rv = itertools.count(1)
        self.seq = itertools.count(1)
        self.writes: list[Write] = []

    def _current(self, request: Any) -> Any:
        key = (request.resource, request.namespace, request.name)
        return self.objects[key] if key in self.objects else None

    async def _handle(self, request: Any) -> Any:
        data = request.data
        action = request.action
        if request.resource is not None and action in (enums.action.CREATE, enums.action.UPDATE,
                                                       enums.action.DELETE):
            sent = copy.deepcopy(data)  # what the client sent, before server-side fields
            if action == enums.action.CREATE and isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp",
                                dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self.rv))
            elif action == enums.action.UPDATE and isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                current = self._current(request)
                if (request.subresource is None and "spec" in data and current is not None
                        and not current.deleted):
                    meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
                meta["resourceVersion"] = str(next(self.rv))
            name = request.name or ((data or {}).get("metadata") or {}).get("name", "")
            verb = {enums.action.CREATE: "create", enums.action.UPDATE: "patch",
                    enums.action.DELETE: "delete"}[action]
            self.writes.append(Write(next(self.seq), verb, request.resource.plural, name,
                                     request.subresource, sent))
        return await super()._handle(request)

    async def _serve_list(self, request: Any) -> Any:
        payload = await super()._serve_list(request)
        selector = (request.params or {}).get("labelSelector")
        if selector:
            wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
            payload["items"] = [
                i for i in payload["items"]
                if all((i.get("metadata", {}).get("labels") or {}).get(k) == v
                       for k, v in wanted.items())
            ]
        return payload


class FakeCluster:
    """Test-facing helpers over a running :class:`ClusterEmulator`."""

    def __init__(self, emulator: ClusterEmulator, server: kmock.Server, namespace: str) -> None:
        self.emu = emulator
        self.server = server
        self.namespace = namespace

    @property
    def url(self) -> str:
        return str(self.server.url).rstrip("/")

    # -- HTTP writes (so that watch events flow) -----------------------------------------
    async def _call(self, method: str, path: str, body: Any, content_type: str) -> Any:
        connector = aiohttp.TCPConnector(force_close=True)  # no keep-alive tasks left behind
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.request(method, self.url + path, json=body,
                                       headers={"Content-Type": content_type}) as resp:
                assert resp.status < 400, await resp.text()
                return await resp.json(content_type=None)

    def _vs_path(self, name: str | None = None) -> str:
        base = f"/apis/ultramem.io/v1alpha1/namespaces/{self.namespace}/valuestores"
        return f"{base}/{name}" if name else base

    async def create_valuestore(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._call("POST", self._vs_path(), dict(body), "application/json")

    async def patch_valuestore(self, name: str, patch: Mapping[str, Any]) -> None:
        await self._call("PATCH", self._vs_path(name), dict(patch),
                         "application/merge-patch+json")

    async def delete_valuestore(self, name: str) -> None:
        await self._call("DELETE", self._vs_path(name), None, "application/json")

    # -- state -----------------------------------------------------------------------------
    def live(self, resource: str) -> dict[str, dict[str, Any]]:
        res = kmock.resource(resource)
        return {
            name: obj.raw for (r, ns, name), obj in list(self.emu.objects.items())
            if r == res and ns == self.namespace and not obj.deleted
        }

    def valuestore(self, name: str) -> dict[str, Any] | None:
        return self.live(VS).get(name)

    def statefulsets(self) -> dict[str, dict[str, Any]]:
        return self.live(STS)

    def services(self) -> dict[str, dict[str, Any]]:
        return self.live(SVC)

    def jobs(self) -> dict[str, dict[str, Any]]:
        return self.live(JOB)

    def events(self) -> list[dict[str, Any]]:
        return list(self.live(EVENTS).values())

    def set_ready(self, name: str, ready: int | None = None) -> None:
        """Play the StatefulSet controller: report ``ready`` (default: spec.replicas) ready."""
        obj = self.emu.objects[STS, self.namespace, name]
        replicas = obj["spec"]["replicas"]
        ready = replicas if ready is None else ready
        obj.patch({"status": {"replicas": replicas, "readyReplicas": ready,
                              "availableReplicas": ready,
                              "observedGeneration": obj["metadata"].get("generation", 1)}})

    def complete_job(self, name: str) -> None:
        obj = self.emu.objects[JOB, self.namespace, name]
        obj.patch({"status": {"succeeded": 1,
                              "conditions": [{"type": "Complete", "status": "True"}]}})

    def collect_garbage(self) -> list[str]:
        """Emulate the GC: delete objects whose controller owner no longer exists."""
        owners = {o["metadata"].get("uid") for o in self.live(VS).values()}
        removed = []
        for resource in (STS, SVC, JOB):
            for name, obj in self.live(resource).items():
                refs = obj.get("metadata", {}).get("ownerReferences") or []
                if refs and not any(r.get("uid") in owners for r in refs):
                    self.emu.objects[resource, self.namespace, name].delete()
                    removed.append(name)
        return removed

    def writes(self, resource: str | None = None, verb: str | None = None) -> list[Write]:
        return [w for w in self.emu.writes
                if (resource is None or w.resource == resource)
                and (verb is None or w.verb == verb)]


@contextlib.asynccontextmanager
async def fake_cluster(namespace: str = "ml") -> AsyncIterator[FakeCluster]:
    emu = ClusterEmulator()
    async with emu, kmock.Server(emu) as server:
        info = kmock.ResourceInfo
        rw = ["list", "watch", "get", "create", "patch", "delete"]
        emu.resources[VS] = info(kind="ValueStore", singular="valuestore", namespaced=True,
                                 verbs=rw, subresources=["status"])
        emu.resources["v1/namespaces"] = info(kind="Namespace", singular="namespace",
                                              namespaced=False, verbs=["list", "watch", "get"])
        emu.resources[EVENTS] = info(kind="Event", singular="event", namespaced=True,
                                     verbs=["create"])
        emu.resources[STS] = info(kind="StatefulSet", singular="statefulset", namespaced=True,
                                  verbs=rw)
        emu.resources[SVC] = info(kind="Service", singular="service", namespaced=True, verbs=rw)
        emu.resources[JOB] = info(kind="Job", singular="job", namespaced=True, verbs=rw)
        yield FakeCluster(emu, server, namespace)


FAST = OperatorConfig(default_image="ultramem-dist:test", poll_seconds=0.1, resync_seconds=0.5)


class RunningOperator:
    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task

    def check(self) -> None:
        """Fail the test right away if the operator died."""
        if self.task.done():
            exc = None if self.task.cancelled() else self.task.exception()
            raise AssertionError(f"the operator stopped unexpectedly: {exc!r}")


@contextlib.asynccontextmanager
async def running_operator(
    cluster: FakeCluster, config: OperatorConfig = FAST
) -> AsyncIterator[RunningOperator]:
    """Run the real handlers (fresh registry) against ``cluster``; always stopped on exit."""
    registry = kopf.OperatorRegistry()
    api = KubeApi(keepalive=False)
    server = cluster.url

    async def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=server)

    register(registry, api, config, login=login)
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 30
    stop = asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=registry, settings=settings, standalone=True, clusterwide=True, stop_flag=stop,
    ))
    try:
        yield RunningOperator(task)
    finally:
        # Graceful stop first. kopf then waits up to 5 s for every task spawned since it
        # started (kmock's server-side watch handlers among them); past a short grace period
        # cancel it instead, which cancels those tasks at once.
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()


async def eventually(
    predicate: Callable[[], Any], what: str, *, timeout: float = 10.0,
    operator: RunningOperator | None = None,
) -> Any:
    """Poll ``predicate`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if operator is not None:
            operator.check()
        result = predicate()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(0.05)


def valuestore(name: str = "mem", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "store": {"pvc": {"claimName": "tables"}},
        "version": "v1",
        "shards": 2,
        "replicas": 2,
        "rollout": {"drainSeconds": 0},
    }
    body.update(spec)
    return {
        "apiVersion": "ultramem.io/v1alpha1",
        "kind": "ValueStore",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": body,
    }
