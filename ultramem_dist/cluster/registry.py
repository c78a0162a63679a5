"""The registry: a named, detached Ray actor mapping deployments → shards → replica endpoints.

A *deployment* is one store version with one layout (``num_shards`` shards × replicas). Exactly
one deployment is *active*; clients read it (and long-poll for changes with
:meth:`Registry.wait_change`), so a reshard or a version roll is one atomic switch of
``active``: every request is answered wholly by one layout of one version.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

REGISTRY_NAME = "ultramem-registry"
NAMESPACE = "ultramem"


@dataclass
class ReplicaRecord:
    endpoint: str
    pid: int
    node_id: str
    device: str
    registered_at: float
    restarts: int = 0


@dataclass
class DeploymentRecord:
    deployment_id: str
    store: str
    version: str
    num_shards: int
    replicas_per_shard: int
    sharding: str
    created_at: float
    state: str = "starting"  # starting | ready | active | draining | stopped
    replicas: dict[int, dict[int, ReplicaRecord]] = field(default_factory=dict)

    def endpoints(self) -> list[str]:
        return [r.endpoint for shard in self.replicas.values() for r in shard.values()]


@ray.remote(num_cpus=0, max_restarts=-1)
class Registry:
    """Deployments, their live endpoints and the active one. All methods are cheap and async."""

    def __init__(self) -> None:
        self._deployments: dict[str, DeploymentRecord] = {}
        self._active: str | None = None
        self._epoch = 0
        self._changed = asyncio.Condition()

    async def _bump(self) -> None:
        async with self._changed:
            self._epoch += 1
            self._changed.notify_all()

    async def add_deployment(self, record: dict[str, Any]) -> None:
        rec = DeploymentRecord(**record)
        self._deployments[rec.deployment_id] = rec
        await self._bump()

    async def register(
        self,
        deployment_id: str,
        shard: int,
        replica: int,
        endpoint: str,
        pid: int,
        node_id: str,
        device: str,
    ) -> int:
        """Record a replica's endpoint (on first start and after every restart)."""
        dep = self._deployments.get(deployment_id)
        if dep is None:
            raise KeyError(f"unknown deployment {deployment_id!r}")
        shard_map = dep.replicas.setdefault(shard, {})
        old = shard_map.get(replica)
        restarts = 0 if old is None else old.restarts + 1
        shard_map[replica] = ReplicaRecord(endpoint, pid, node_id, device, time.time(), restarts)
        await self._bump()
        return restarts

    async def previous_endpoint(self, deployment_id: str, shard: int, replica: int) -> str | None:
        dep = self._deployments.get(deployment_id)
        rec = dep.replicas.get(shard, {}).get(replica) if dep else None
        return rec.endpoint if rec else None

    async def remove_replica(self, deployment_id: str, shard: int, replica: int) -> None:
        """Forget a replica (clients drop it from their channels at the next refresh)."""
        dep = self._deployments.get(deployment_id)
        if dep is not None:
            dep.replicas.get(shard, {}).pop(replica, None)
        await self._bump()

    async def set_state(self, deployment_id: str, state: str) -> None:
        self._deployments[deployment_id].state = state
        await self._bump()

    async def activate(self, deployment_id: str) -> str | None:
        """Atomically make ``deployment_id`` the active one; returns the previous active id."""
        if deployment_id not in self._deployments:
            raise KeyError(f"unknown deployment {deployment_id!r}")
        previous = self._active
        self._active = deployment_id
        self._deployments[deployment_id].state = "active"
        if previous and previous != deployment_id and previous in self._deployments:
            self._deployments[previous].state = "draining"
        await self._bump()
        return previous

    async def remove_deployment(self, deployment_id: str) -> None:
        self._deployments.pop(deployment_id, None)
        if self._active == deployment_id:
            self._active = None
        await self._bump()

    async def snapshot(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "active": self._active,
            "deployments": {k: asdict(v) for k, v in self._deployments.items()},
        }

    async def active(self) -> dict[str, Any]:
        """``{"epoch", "deployment"}`` of the active deployment (``None`` if none)."""
        dep = self._deployments.get(self._active) if self._active else None
        return {"epoch": self._epoch, "deployment": asdict(dep) if dep else None}

    async def wait_change(self, epoch: int, timeout_s: float = 10.0) -> dict[str, Any]:
        """Long poll: return :meth:`active` once the epoch differs from ``epoch`` (or timeout)."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._epoch != epoch), timeout_s
                )
            except TimeoutError:
                pass
        return await self.active()


def get_or_create_registry() -> ray.actor.ActorHandle:
    return Registry.options(
        name=REGISTRY_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def get_registry() -> ray.actor.ActorHandle:
    """The running registry; raises a clear error when nothing was deployed."""
    try:
        return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    except ValueError:
        raise LookupError(
            "no ultramem-dist deployment on this Ray cluster (run `ultramem-dist up` first)"
        ) from None
