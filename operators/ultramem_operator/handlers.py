"""Thin kopf wiring: observe children, ask :func:`reconcile.plan`, apply, write status.

All handlers funnel into one idempotent pass (``_reconcile``). Change handlers (create, update
of ``spec``, resume after an operator restart) raise ``kopf.TemporaryError`` while the plan is
waiting (first start, new layout not ready yet, previous layout draining), so kopf re-runs
them after ``poll_seconds``; a timer re-runs the same pass every ``resync_seconds`` to refresh
status and repair drift. Invalid specs become ``kopf.PermanentError`` plus a ``Failed`` status.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import kopf

from ultramem_operator.kube import KubeApi
from ultramem_operator.reconcile import Action, Observed, plan
from ultramem_operator.spec import GROUP, LABEL_STORE, PLURAL, VERSION, InvalidSpec, parse_spec
from ultramem_operator.status import build_status, failed_status

LoginFn = Callable[..., Awaitable[kopf.ConnectionInfo]]


@dataclass(frozen=True)
class OperatorConfig:
    """Operator knobs (environment variables in the Deployment)."""

    default_image: str | None = None  # ULTRAMEM_DEFAULT_IMAGE: image when spec.image is empty
    poll_seconds: float = 5.0  # ULTRAMEM_POLL_SECONDS: re-check cadence while a rollout waits
    resync_seconds: float = 30.0  # ULTRAMEM_RESYNC_SECONDS: periodic status refresh/drift repair
    events: bool = True  # post a Kubernetes Event per applied action

    @classmethod
    def from_env(cls) -> OperatorConfig:
        return cls(
            default_image=os.environ.get("ULTRAMEM_DEFAULT_IMAGE") or None,
            poll_seconds=float(os.environ.get("ULTRAMEM_POLL_SECONDS", "5")),
            resync_seconds=float(os.environ.get("ULTRAMEM_RESYNC_SECONDS", "30")),
        )


async def default_login(**kwargs: Any) -> kopf.ConnectionInfo:
    """In-cluster service account first, then the local kubeconfig (development)."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is None:
        raise kopf.LoginError("no service account and no kubeconfig to log in with")
    return info


async def observe(api: KubeApi, namespace: str, store: str, runtime: str) -> Observed:
    labels = {LABEL_STORE: store}
    if runtime == "ray":
        return Observed(jobs=await api.list("Job", namespace, labels))
    sts, svcs = await asyncio.gather(api.list("StatefulSet", namespace, labels),
                                     api.list("Service", namespace, labels))
    return Observed(statefulsets=sts, services=svcs)


async def apply(api: KubeApi, owner: kopf.Body, namespace: str, action: Action) -> None:
    if action.verb == "create":
        assert action.body is not None
        body = copy.deepcopy(action.body)
        kopf.adopt(body, owner=owner)
        await api.create(action.kind, namespace, body)
    elif action.verb == "patch":
        assert action.body is not None
        await api.patch(action.kind, namespace, action.name, action.body)
    else:
        await api.delete(action.kind, namespace, action.name)


def register(
    registry: kopf.OperatorRegistry,
    api: KubeApi,
    config: OperatorConfig,
    *,
    login: LoginFn | None = default_login,
) -> None:
    """Register the ValueStore handlers (and optionally the login handler) on ``registry``."""
    locks: dict[str, asyncio.Lock] = {}

    if login is not None:
        @kopf.on.login(registry=registry)
        async def login_handler(**kwargs: Any) -> kopf.ConnectionInfo:
            info = await login(**kwargs)
            api.use(info)
            return info

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = f"{GROUP}/finalizer"
        settings.posting.level = logging.INFO

    @kopf.on.cleanup(registry=registry)
    async def close_api(**_: Any) -> None:
        await api.close()

    async def _reconcile(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger | Any,
                         *, from_change: bool) -> None:
        uid = str(body.metadata.uid or body.metadata.name)
        async with locks.setdefault(uid, asyncio.Lock()):
            now = dt.datetime.now(dt.UTC)
            previous = dict(body.status or {})
            try:
                spec = parse_spec(body, default_image=config.default_image)
            except InvalidSpec as exc:
                patch.status.update(failed_status(str(exc), previous, now,
                                                  body.metadata.get("generation")))
                if from_change:
                    kopf.warn(body, reason="InvalidSpec", message=str(exc))
                    raise kopf.PermanentError(str(exc)) from exc
                return
            observed = await observe(api, spec.namespace, spec.name, spec.runtime)
            step = plan(spec, observed, now, previous_phase=previous.get("phase"),
                        poll_seconds=config.poll_seconds)
            for action in step.actions:
                await apply(api, body, spec.namespace, action)
                logger.info(f"{action.verb} {action.kind}/{action.name}: {action.message}")
                if config.events and action.reason:
                    kopf.info(body, reason=action.reason, message=action.message)
            patch.status.update(build_status(spec, step, previous, now))
            if from_change and step.wait_seconds is not None:
                raise kopf.TemporaryError(step.message, delay=max(step.wait_seconds, 0.1))

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    async def reconcile_valuestore(body: kopf.Body, patch: kopf.Patch, logger: Any,
                                   **_: Any) -> None:
        await _reconcile(body, patch, logger, from_change=True)

    @kopf.timer(GROUP, VERSION, PLURAL, interval=config.resync_seconds,
                initial_delay=config.resync_seconds, registry=registry)
    async def resync_valuestore(body: kopf.Body, patch: kopf.Patch, logger: Any,
                                **_: Any) -> None:
        await _reconcile(body, patch, logger, from_change=False)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, optional=True)
    def forget_valuestore(body: kopf.Body, **_: Any) -> None:
        # Children carry controller owner references: the garbage collector deletes them.
        locks.pop(str(body.metadata.uid or body.metadata.name), None)
