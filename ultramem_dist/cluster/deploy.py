"""Bring shard deployments up, scale, reshard, roll versions and tear down — on Ray.

Every layout change follows the same safe sequence: start the new deployment's replicas → wait
until every replica registered and answers → switch the registry's active deployment (one
atomic step; clients follow within one long-poll) → keep the old deployment serving for
``drain_s`` so in-flight requests finish → stop it gracefully.

Every replica records the deployment's :class:`PlacementOptions` (its ``ShardSpec``), so
:meth:`Deployer.adopt_placement` lets ``scale`` and ``roll`` start further replicas exactly like
the first ones: same port, resources and server settings (TLS files, token file, ...). Ray
restarts a killed replica with its original spec anyway.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ultramem_dist.cluster.actor import SERVER_FILES, ShardActor, ShardSpec
from ultramem_dist.cluster.registry import NAMESPACE, get_or_create_registry, get_registry
from ultramem_dist.cluster.relayout import relayout
from ultramem_dist.store.reader import open_manifest

log = logging.getLogger(__name__)


@dataclass
class PlacementOptions:
    """Resources and placement of every shard replica actor."""

    num_cpus: float = 0.0
    """CPUs reserved per replica (0: share the node)."""
    num_gpus: float = 0.0
    """GPUs per replica; the shard then runs the kernel on CUDA."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per replica (e.g. {"value_shard": 1})."""
    label_selector: dict[str, str] = field(default_factory=dict)
    """Ray node labels the replicas must land on."""
    strategy: str = "auto"
    """Placement-group strategy for a shard's replicas: auto | STRICT_SPREAD | SPREAD | PACK.
    auto = STRICT_SPREAD when the cluster has at least as many nodes as replicas, else SPREAD."""
    host: str = "127.0.0.1"
    """Interface the shard servers bind/advertise ("node" = the Ray node's IP)."""
    port: int = 0
    """Fixed gRPC port of every replica (needs one replica per node); 0 = free ports."""
    torch_threads: int = 1
    """Kernel threads per replica."""
    max_restarts: int = -1
    """Ray restarts a killed replica this many times (-1: always)."""
    server: dict[str, Any] = field(default_factory=dict)
    """Extra ServerConfig fields for every shard server, e.g. ``tls_cert``/``tls_key``,
    ``tls_client_ca`` (mutual TLS), ``auth_token_file`` and ``health_port``. File paths are
    read on the nodes that host replicas; relative ones are made absolute here (symlinks such as
    Kubernetes Secret mounts are kept, not resolved)."""
    drain_s: float = 2.0
    """How long a replaced deployment keeps serving after the switch."""
    ready_timeout_s: float = 120.0
    """How long to wait for a new deployment's replicas."""

    def __post_init__(self) -> None:
        server = dict(self.server)
        for key in SERVER_FILES:
            if server.get(key) is not None:
                server[key] = str(Path(server[key]).absolute())
        self.server = server


# Operation settings of a Deployer, not properties of a deployment: never adopted.
_OPERATION_FIELDS = ("drain_s", "ready_timeout_s")


def placement_from_spec(spec: Mapping[str, Any]) -> PlacementOptions:
    """The :class:`PlacementOptions` a replica was started with (from its ``ShardSpec``)."""
    known = {f.name for f in fields(PlacementOptions)} - set(_OPERATION_FIELDS)
    stored = spec.get("placement") or {}
    if stored:
        return PlacementOptions(**{k: v for k, v in stored.items() if k in known})
    # replicas started before the placement was recorded: what their spec itself says
    return PlacementOptions(
        host=spec["host"],
        port=spec["port"],
        torch_threads=spec["torch_threads"],
        server=dict(spec.get("server") or {}),
    )


class ReplicaStartError(RuntimeError):
    """A new replica failed to start (bad server settings, missing files on its node, ...)."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _start_failure(exc: BaseException) -> str:
    """The last line of a Ray actor error: the exception the replica's constructor raised."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _pg_name(dep_id: str, shard: int) -> str:
    return f"ultramem-{dep_id}-shard{shard}"


def _actor_name(dep_id: str, shard: int, replica: int) -> str:
    return f"ultramem-{dep_id}-s{shard}-r{replica}"


class Deployer:
    """Library API behind ``ultramem-dist up/status/scale/roll/down`` (needs ``ray.init()``)."""

    def __init__(
        self,
        placement: PlacementOptions | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.placement = placement or PlacementOptions()
        self._say = progress or log.info

    # ------------------------------------------------------------------ helpers
    @property
    def registry(self) -> ray.actor.ActorHandle:
        return get_registry()

    def _strategy(self, replicas: int) -> str:
        if self.placement.strategy != "auto":
            return self.placement.strategy
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        return "STRICT_SPREAD" if alive >= replicas and replicas > 1 else "SPREAD"

    def _bundle(self) -> dict[str, float]:
        p = self.placement
        bundle = {"CPU": p.num_cpus or 0.001, **p.resources}
        if p.num_gpus:
            bundle["GPU"] = p.num_gpus
        return bundle

    def _start_replica(
        self,
        dep_id: str,
        store: str,
        version: str,
        shard: int,
        replica: int,
        pg: Any | None,
    ) -> ray.actor.ActorHandle:
        p = self.placement
        spec = ShardSpec(
            dep_id,
            store,
            version,
            shard,
            replica,
            host=p.host,
            port=p.port,
            torch_threads=p.torch_threads,
            server=dict(p.server),
            placement={k: v for k, v in asdict(p).items() if k not in _OPERATION_FIELDS},
        )
        options: dict[str, Any] = {
            "name": _actor_name(dep_id, shard, replica),
            "namespace": NAMESPACE,
            "lifetime": "detached",
            "max_restarts": p.max_restarts,
            "max_task_retries": 0,
            "num_cpus": p.num_cpus or 0.001 if pg is not None else p.num_cpus,
            "num_gpus": p.num_gpus,
            "resources": dict(p.resources),
        }
        if p.label_selector:
            options["label_selector"] = dict(p.label_selector)
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=replica
            )
        else:
            options["scheduling_strategy"] = "SPREAD"
        return ShardActor.options(**options).remote(asdict(spec))

    def _wait_started(self, handles: Sequence[Any], what: str) -> list[dict[str, Any]]:
        """Every new replica's info once it serves; a replica whose start failed raises
        :class:`ReplicaStartError` with the reason (its constructor's exception)."""
        try:
            return ray.get(
                [h.info.remote() for h in handles], timeout=self.placement.ready_timeout_s
            )
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"replicas of {what} not serving after {self.placement.ready_timeout_s}s"
            ) from None
        except ray.exceptions.RayActorError as exc:
            raise ReplicaStartError(
                f"a replica of {what} did not start: {_start_failure(exc)}"
            ) from None

    def _abort(self, dep_id: str, handles: Sequence[Any]) -> None:
        """Undo a failed ``up``: kill the replicas started so far, drop the deployment."""
        self._say(f"deployment {dep_id} did not come up; removing it")
        for h in handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - best effort: stop_deployment follows
                log.warning("could not kill a replica of %s: %s", dep_id, exc)
        try:
            self.stop_deployment(dep_id)
        except Exception as exc:  # noqa: BLE001 - keep the original error
            log.warning("cleanup of deployment %s failed: %s", dep_id, exc)

    def deployment_placement(self, dep: Mapping[str, Any] | None = None) -> PlacementOptions:
        """How the replicas of ``dep`` (default: the active deployment) were placed, read from a
        live replica's spec; ``LookupError`` if none of them answers."""
        dep = self.active() if dep is None else dep
        for shard, reps in sorted(dep["replicas"].items(), key=lambda kv: int(kv[0])):
            for r in sorted(reps, key=int):
                name = _actor_name(dep["deployment_id"], int(shard), int(r))
                try:
                    handle = ray.get_actor(name, namespace=NAMESPACE)
                    return placement_from_spec(ray.get(handle.info.remote(), timeout=10))
                except (ValueError, ray.exceptions.RayError) as exc:
                    log.debug("replica %s did not report its spec: %s", name, exc)
        raise LookupError(
            f"cannot tell how deployment {dep['deployment_id']} was placed: none of its replicas "
            "answers"
        )

    def adopt_placement(self, server: Mapping[str, Any] | None = None) -> PlacementOptions:
        """Use the active deployment's placement (host, port, resources, server settings such as
        TLS and token files) for the next operations, with ``server`` fields replacing its own.
        This Deployer's ``drain_s`` and ``ready_timeout_s`` stay."""
        stored = self.deployment_placement()
        self.placement = replace(
            stored,
            server={**stored.server, **(server or {})},
            **{k: getattr(self.placement, k) for k in _OPERATION_FIELDS},
        )
        return self.placement

    # ------------------------------------------------------------------ operations
    def up(
        self,
        store: str | Path,
        shards: int | None = None,
        replicas: int = 2,
        version: str | None = None,
        by: str = "auto",
    ) -> str:
        """Deploy (and activate) ``store`` with ``shards`` × ``replicas``; returns its id."""
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        store = str(Path(store).resolve())
        _, manifest = open_manifest(store, version)
        if shards is not None and shards < 1:
            raise ValueError("shards must be >= 1")
        if shards is not None and shards != manifest.num_shards:
            self._say(f"re-splitting version {manifest.version} into {shards} shards")
            new_version = relayout(store, manifest.version, shards, by)
            _, manifest = open_manifest(store, new_version)
        registry = get_or_create_registry()
        dep_id = f"{manifest.version}-{uuid.uuid4().hex[:6]}"
        ray.get(
            registry.add_deployment.remote(
                {
                    "deployment_id": dep_id,
                    "store": store,
                    "version": manifest.version,
                    "num_shards": manifest.num_shards,
                    "replicas_per_shard": replicas,
                    "sharding": manifest.tables[0].sharding,
                    "created_at": time.time(),
                }
            )
        )
        self._say(
            f"starting {manifest.num_shards} shards × {replicas} replicas of "
            f"{manifest.version} (deployment {dep_id})"
        )
        handles: list[ray.actor.ActorHandle] = []
        try:
            for shard in range(manifest.num_shards):
                pg = placement_group(
                    [self._bundle() for _ in range(replicas)],
                    strategy=self._strategy(replicas),
                    name=_pg_name(dep_id, shard),
                    lifetime="detached",
                )
                try:
                    ray.get(pg.ready(), timeout=self.placement.ready_timeout_s)
                except ray.exceptions.GetTimeoutError:
                    raise TimeoutError(
                        f"placement group for shard {shard} not ready after "
                        f"{self.placement.ready_timeout_s}s: not enough resources for "
                        f"{self._bundle()} × {replicas} ({self._strategy(replicas)})"
                    ) from None
                for r in range(replicas):
                    handles.append(
                        self._start_replica(dep_id, store, manifest.version, shard, r, pg)
                    )
            infos = self._wait_started(handles, f"deployment {dep_id}")
        except BaseException:
            self._abort(dep_id, handles)
            raise
        for info in infos:
            self._say(
                f"  shard {info['shard']} replica {info['replica']} → {info['endpoint']} "
                f"({info['device']}, pid {info['pid']})"
            )
        ray.get(registry.set_state.remote(dep_id, "ready"))
        previous = ray.get(registry.activate.remote(dep_id))
        if previous and previous != dep_id:
            self._say(
                f"switched clients to {dep_id}; draining {previous} for "
                f"{self.placement.drain_s:.1f}s"
            )
            time.sleep(self.placement.drain_s)
            self.stop_deployment(previous)
        return dep_id

    def active(self) -> dict[str, Any]:
        dep = ray.get(self.registry.active.remote())["deployment"]
        if dep is None:
            raise LookupError("no active deployment (run `ultramem-dist up`)")
        return dep

    def reshard(self, shards: int, by: str = "auto") -> str:
        """New layout beside the old one, atomic switch, old one drained and stopped."""
        dep = self.active()
        return self.up(
            dep["store"],
            shards=shards,
            replicas=dep["replicas_per_shard"],
            version=dep["version"],
            by=by,
        )

    def roll(self, store: str | Path, version: str | None = None) -> str:
        """Deploy another table version with the active layout and switch to it."""
        dep = self.active()
        _, manifest = open_manifest(store, version)
        if manifest.version == dep["version"] and str(Path(store).resolve()) == dep["store"]:
            raise ValueError(f"version {manifest.version} is already active")
        return self.up(
            store,
            shards=dep["num_shards"],
            replicas=dep["replicas_per_shard"],
            version=manifest.version,
        )

    def scale_replicas(self, shard: int, replicas: int) -> None:
        """Change one shard's replica count in the active deployment (others untouched)."""
        if replicas < 1:
            raise ValueError("replicas must be >= 1 (use `down` to stop serving)")
        dep = self.active()
        if not 0 <= shard < dep["num_shards"]:
            raise ValueError(f"shard {shard} does not exist (0..{dep['num_shards'] - 1})")
        current = sorted(
            int(r) for r in dep["replicas"].get(shard, dep["replicas"].get(str(shard), {}))
        )
        dep_id = dep["deployment_id"]
        if replicas > len(current):
            start = (max(current) + 1) if current else 0
            handles = [
                self._start_replica(dep_id, dep["store"], dep["version"], shard, r, None)
                for r in range(start, start + replicas - len(current))
            ]
            try:
                infos = self._wait_started(handles, f"shard {shard} of {dep_id}")
            except BaseException:
                for h, r in zip(handles, range(start, start + len(handles)), strict=True):
                    ray.get(self.registry.remove_replica.remote(dep_id, shard, r))
                    try:
                        ray.kill(h, no_restart=True)
                    except Exception as exc:  # noqa: BLE001 - best effort
                        log.warning("could not kill replica %d of shard %d: %s", r, shard, exc)
                raise
            for info in infos:
                self._say(f"  shard {shard} replica {info['replica']} → {info['endpoint']}")
        else:
            for r in current[replicas:]:
                ray.get(self.registry.remove_replica.remote(dep_id, shard, r))
                time.sleep(self.placement.drain_s)
                self._stop_actor(_actor_name(dep_id, shard, r))
                self._say(f"  shard {shard} replica {r} stopped")

    def _stop_actor(self, name: str) -> None:
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        try:
            ray.get(handle.stop.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("graceful stop of %s failed (%s); killing it", name, exc)
        ray.kill(handle, no_restart=True)

    def stop_deployment(self, dep_id: str) -> None:
        snap = ray.get(self.registry.snapshot.remote())
        dep = snap["deployments"].get(dep_id)
        if dep is None:
            return
        ray.get(self.registry.set_state.remote(dep_id, "stopped"))
        for shard, reps in dep["replicas"].items():
            for r in reps:
                self._stop_actor(_actor_name(dep_id, int(shard), int(r)))
        for shard in range(dep["num_shards"]):
            try:
                remove_placement_group(ray.util.get_placement_group(_pg_name(dep_id, shard)))
            except ValueError:
                pass
        ray.get(self.registry.remove_deployment.remote(dep_id))

    def down(self) -> int:
        """Stop every deployment and the registry; returns how many deployments were stopped."""
        try:
            registry = self.registry
        except LookupError:
            return 0
        snap = ray.get(registry.snapshot.remote())
        for dep_id in snap["deployments"]:
            self.stop_deployment(dep_id)
        ray.kill(registry, no_restart=True)
        return len(snap["deployments"])

    def status(self) -> dict[str, Any]:
        """Registry snapshot plus every live replica's info (endpoint, pid, requests, ...) and
        its Ray node: ``node`` (the node's IP, ``?`` if Ray no longer knows it) and
        ``node_alive``. ``nodes`` lists every Ray node (id, IP, alive, resources)."""
        snap = ray.get(self.registry.snapshot.remote())
        nodes = node_table()
        snap["nodes"] = list(nodes.values())
        for dep_id, dep in snap["deployments"].items():
            for shard, reps in dep["replicas"].items():
                for r, rec in reps.items():
                    node = nodes.get(rec.get("node_id", ""))
                    rec["node"] = node["ip"] if node else "?"
                    rec["node_alive"] = bool(node and node["alive"])
                    try:
                        handle = ray.get_actor(
                            _actor_name(dep_id, int(shard), int(r)), namespace=NAMESPACE
                        )
                        rec["info"] = ray.get(handle.info.remote(), timeout=10)
                        rec["alive"] = True
                    except (ValueError, ray.exceptions.RayError) as exc:
                        rec["alive"] = False
                        rec["error"] = str(exc).splitlines()[0]
        return snap


def node_table() -> dict[str, dict[str, Any]]:
    """Ray's nodes by node id: ``{"node_id", "ip", "alive", "resources"}`` each."""
    return {
        n["NodeID"]: {
            "node_id": n["NodeID"],
            "ip": n.get("NodeManagerAddress", "?"),
            "alive": bool(n.get("Alive")),
            "resources": dict(n.get("Resources") or {}),
        }
        for n in ray.nodes()
    }


def replica_nodes(snapshot: Mapping[str, Any], dep_id: str | None = None) -> dict[int, list[str]]:
    """Shard → node IPs of its replicas in a :meth:`Deployer.status` snapshot (default: the
    active deployment); what proves that replicas of one shard sit on different hosts."""
    dep = snapshot["deployments"][dep_id or snapshot["active"]]
    return {
        int(shard): [reps[r]["node"] for r in sorted(reps, key=int)]
        for shard, reps in dep["replicas"].items()
    }
