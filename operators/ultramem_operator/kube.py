"""A small async Kubernetes client for the three child kinds the operator manages.

It reuses the credentials kopf obtained at login (``kopf.ConnectionInfo``), so the operator has
exactly one notion of "which cluster, which identity". Only JSON merge patches are sent: the
planner always patches complete sub-objects (pod templates, selectors, port lists).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import kopf

PATHS: Mapping[str, str] = {
    "StatefulSet": "/apis/apps/v1/namespaces/{ns}/statefulsets",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
}

Refresher = Callable[[], Awaitable[kopf.ConnectionInfo]]


class KubeError(RuntimeError):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class KubeApi:
    """List/create/patch/delete StatefulSets, Services and Jobs in a namespace."""

    def __init__(self, info: kopf.ConnectionInfo | None = None,
                 refresh: Refresher | None = None, *, keepalive: bool = True) -> None:
        self._info = info
        self._keepalive = keepalive
        self._refresh = refresh
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []
        self._tempfiles: list[str] = []

    @property
    def connected(self) -> bool:
        return self._info is not None

    def use(self, info: kopf.ConnectionInfo) -> None:
        """(Re)point the client at ``info``; called from the kopf login handler."""
        if self._info is not None and (info.server, info.ca_path, info.ca_data) != (
            self._info.server, self._info.ca_path, self._info.ca_data
        ):
            self._drop_session()
        self._info = info

    def _drop_session(self) -> None:
        if self._session is not None:
            self._retired.append(self._session)  # closed in close(); in-flight calls finish
        self._session = None

    async def close(self) -> None:
        for session in [*self._retired, self._session]:
            if session is not None and not session.closed:
                await session.close()
        self._retired.clear()
        self._session = None
        for path in self._tempfiles:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._tempfiles.clear()

    def _tempfile(self, data: str | bytes) -> str:
        fd, path = tempfile.mkstemp(prefix="ultramem-kube-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        self._tempfiles.append(path)
        return path

    def _ssl(self, info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
        if not info.server.startswith("https"):
            return False
        if info.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            cadata = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
            ctx = ssl.create_default_context(
                cafile=os.fspath(info.ca_path) if info.ca_path else None, cadata=cadata)
        cert = info.certificate_path or (
            self._tempfile(info.certificate_data) if info.certificate_data else None)
        key = info.private_key_path or (
            self._tempfile(info.private_key_data) if info.private_key_data else None)
        if cert:
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key else None)
        return ctx

    def _get_session(self) -> aiohttp.ClientSession:
        if self._info is None:
            raise RuntimeError("KubeApi used before the kopf login handler provided credentials")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl(self._info),
                                            force_close=not self._keepalive)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        assert self._info is not None
        headers = {"Accept": "application/json", **self._info.as_http_headers()}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _request(self, method: str, path: str, *, json: Any = None,
                       params: Mapping[str, str] | None = None,
                       content_type: str | None = None) -> Any:
        for attempt in (0, 1):
            session = self._get_session()
            assert self._info is not None
            url = self._info.server.rstrip("/") + path
            async with session.request(method, url, json=json, params=params,
                                       headers=self._headers(content_type)) as resp:
                if resp.status == 401 and attempt == 0 and self._refresh is not None:
                    self.use(await self._refresh())
                    continue
                if resp.status >= 400:
                    text = await resp.text()
                    raise KubeError(resp.status, text[:500])
                return await resp.json(content_type=None)
        raise AssertionError("unreachable")

    async def list(
        self, kind: str, namespace: str, labels: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        path = PATHS[kind].format(ns=namespace)
        data = await self._request("GET", path, params={"labelSelector": _selector(labels)})
        items = (data or {}).get("items") or []
        # Some API fakes ignore labelSelector; filtering again is cheap and keeps us honest.
        return [i for i in items
                if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v
                       for k, v in labels.items())]

    async def create(self, kind: str, namespace: str, body: Mapping[str, Any]) -> bool:
        """Create; returns False when it already exists (the next pass will patch it)."""
        try:
            await self._request("POST", PATHS[kind].format(ns=namespace), json=body)
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def patch(self, kind: str, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        await self._request("PATCH", f"{PATHS[kind].format(ns=namespace)}/{name}", json=body,
                            content_type="application/merge-patch+json")

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation; returns False when already gone."""
        try:
            await self._request(
                "DELETE", f"{PATHS[kind].format(ns=namespace)}/{name}",
                json={"apiVersion": "v1", "kind": "DeleteOptions",
                      "propagationPolicy": "Background"},
            )
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True
