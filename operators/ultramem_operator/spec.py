"""Parse, default and validate a ValueStore into an immutable :class:`ValueStoreSpec` (pure).

The CRD schema rejects most bad input at admission; this module re-checks everything the
operator relies on (the API server may run without CEL, and tests feed bodies directly) and
adds checks the schema cannot express, such as the length of generated object names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GROUP = "ultramem.io"
VERSION = "v1alpha1"
PLURAL = "valuestores"
KIND = "ValueStore"
API_VERSION = f"{GROUP}/{VERSION}"

LABEL_STORE = "ultramem.io/store"
LABEL_VERSION = "ultramem.io/version"
LABEL_LAYOUT = "ultramem.io/layout"
LABEL_SHARD = "ultramem.io/shard"
LABEL_ENDPOINT = "ultramem.io/endpoint"  # "front" or "shard" on Services
ANNOTATION_TEMPLATE_HASH = "ultramem.io/template-hash"
ANNOTATION_SWITCHED_AT = "ultramem.io/switched-at"

GRPC_PORT = 50051
METRICS_PORT = 9090
DEFAULT_MOUNT_PATH = "/var/lib/ultramem/store"

RUNTIMES = ("standalone", "ray")
SHARDINGS = ("row", "dim")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
MAX_SHARDS = 256
MAX_REPLICAS = 1000

_VERSION_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?$")
_DNS1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# StatefulSet pods carry `controller-revision-hash: <sts>-<10 chars>` (a label value, <= 63).
_MAX_STATEFULSET_NAME = 52
_MAX_LABEL_NAME = 63


class InvalidSpec(ValueError):
    """The ValueStore cannot be served as written; fix the spec (maps to kopf.PermanentError)."""


@dataclass(frozen=True)
class StoreLocation:
    """Where shard servers find the store root (``LATEST`` + one directory per version)."""

    path: str | None = None
    pvc_claim: str | None = None
    mount_path: str = DEFAULT_MOUNT_PATH
    read_only: bool = True

    @property
    def root(self) -> str:
        if self.path:
            return self.path.rstrip("/") or "/"
        return self.mount_path.rstrip("/") or "/"


@dataclass(frozen=True)
class ValueStoreSpec:
    """A validated ValueStore with every default applied."""

    name: str
    namespace: str
    uid: str
    generation: int | None
    store: StoreLocation
    version: str
    shards: int
    replicas: int
    replica_overrides: Mapping[int, int] = field(default_factory=dict, hash=False)
    sharding: str = "row"
    table: str | None = None
    runtime: str = "standalone"
    ray_cluster: str | None = None
    ray_client_port: int = 10001
    ray_port: int = 0
    """Fixed gRPC port of every shard replica actor (``up --port``); 0 = free ports."""
    ray_auth_secret: tuple[str, str] | None = None
    ray_num_cpus: float | None = None
    ray_num_gpus: float | None = None
    ray_replica_resources: Mapping[str, float] = field(default_factory=dict, hash=False)
    image: str = ""
    image_pull_policy: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    service_account: str | None = None
    resources: Mapping[str, Any] = field(default_factory=dict, hash=False)
    node_selector: Mapping[str, str] = field(default_factory=dict, hash=False)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = field(default=None, hash=False)
    priority_class: str | None = None
    pod_labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    pod_annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    drain_seconds: int = 30

    @property
    def layout(self) -> str:
        """Layout label value: ``s<shards>`` for row sharding, ``s<shards>-dim`` for dim."""
        return layout_of(self.shards, self.sharding)

    @property
    def target(self) -> tuple[str, str]:
        return (self.version, self.layout)

    def replicas_for(self, shard: int) -> int:
        return self.replica_overrides.get(shard, self.replicas)

    @property
    def store_dir(self) -> str:
        """The STORE argument of ``serve-shard`` / ``up`` (the version goes in ``--version``)."""
        return self.store.root

    @property
    def owner_selector(self) -> dict[str, str]:
        return {LABEL_STORE: self.name}


def layout_of(shards: int, sharding: str) -> str:
    return f"s{shards}" if sharding == "row" else f"s{shards}-{sharding}"


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{what} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidSpec(f"{what} must be in [{lo}, {hi}], got {value}")
    return value


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidSpec(f"{what} must be a non-negative number, got {value!r}")
    return float(value)


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidSpec(f"{what} must map strings to strings")
    return dict(value)


def _parse_store(raw: Any) -> StoreLocation:
    if not isinstance(raw, Mapping):
        raise InvalidSpec("spec.store is required (path or pvc)")
    path, pvc = raw.get("path"), raw.get("pvc")
    if raw.get("uri"):
        raise InvalidSpec(
            "spec.store.uri is not supported: serve-shard reads a directory; mount object "
            "storage through a CSI driver and a PersistentVolumeClaim")
    if not (path or pvc):
        raise InvalidSpec("spec.store needs path or pvc.claimName")
    if path is not None and not (isinstance(path, str) and path.startswith("/")):
        raise InvalidSpec(f"spec.store.path must be absolute, got {path!r}")
    claim, mount, read_only = None, DEFAULT_MOUNT_PATH, True
    if pvc is not None:
        if not isinstance(pvc, Mapping) or not pvc.get("claimName"):
            raise InvalidSpec("spec.store.pvc.claimName is required")
        claim = str(pvc["claimName"])
        mount = str(pvc.get("mountPath") or DEFAULT_MOUNT_PATH)
        if not mount.startswith("/"):
            raise InvalidSpec(f"spec.store.pvc.mountPath must be absolute, got {mount!r}")
        read_only = bool(pvc.get("readOnly", True))
    return StoreLocation(path=path or None, pvc_claim=claim, mount_path=mount,
                         read_only=read_only)


def parse_spec(body: Mapping[str, Any], default_image: str | None = None) -> ValueStoreSpec:
    """Validate a ValueStore body (metadata + spec) and apply the CRD defaults.

    Raises:
        InvalidSpec: with one sentence naming the offending field.
    """
    meta = body.get("metadata") or {}
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        raise InvalidSpec("spec is required")
    name = str(meta.get("name") or "")
    if not _DNS1035_RE.match(name) or len(name) > _MAX_LABEL_NAME - len("-shard-255"):
        raise InvalidSpec(
            f"metadata.name {name!r} must be a DNS-1035 label (lowercase, starts with a letter) "
            f"of at most {_MAX_LABEL_NAME - len('-shard-255')} characters: it names Services"
        )

    version = spec.get("version")
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise InvalidSpec(
            f"spec.version must match {_VERSION_RE.pattern} (lowercase, digits, '-'), "
            f"got {version!r}"
        )
    shards = _int(spec.get("shards"), "spec.shards", 1, MAX_SHARDS)
    replicas = _int(spec.get("replicas", 1), "spec.replicas", 1, MAX_REPLICAS)
    sharding = spec.get("sharding", "row")
    if sharding not in SHARDINGS:
        raise InvalidSpec(f"spec.sharding must be one of {SHARDINGS}, got {sharding!r}")
    runtime = spec.get("runtime", "standalone")
    if runtime not in RUNTIMES:
        raise InvalidSpec(f"spec.runtime must be one of {RUNTIMES}, got {runtime!r}")

    overrides: dict[int, int] = {}
    raw_overrides = spec.get("replicaOverrides") or {}
    if not isinstance(raw_overrides, Mapping):
        raise InvalidSpec("spec.replicaOverrides must map shard indices to replica counts")
    for key, value in raw_overrides.items():
        if value is None:  # a merge-patch tombstone that reached us
            continue
        if not str(key).isdigit() or int(key) >= shards:
            raise InvalidSpec(
                f"spec.replicaOverrides key {key!r} is not a shard index in [0, {shards})")
        overrides[int(key)] = _int(value, f"spec.replicaOverrides[{key}]", 1, MAX_REPLICAS)
    if runtime == "ray" and overrides:
        raise InvalidSpec(
            "spec.replicaOverrides needs runtime standalone (ray places equal replicas)")

    ray = spec.get("ray") or {}
    ray_cluster, ray_client_port, ray_auth, ray_port = None, 10001, None, 0
    ray_cpus: float | None = None
    ray_gpus: float | None = None
    ray_resources: dict[str, float] = {}
    if runtime == "ray":
        if not isinstance(ray, Mapping) or not ray.get("clusterName"):
            raise InvalidSpec("runtime ray needs spec.ray.clusterName")
        ray_cluster = str(ray["clusterName"])
        ray_client_port = _int(ray.get("clientPort", 10001), "spec.ray.clientPort", 1, 65535)
        secret = ray.get("authSecret")
        if secret:
            ray_auth = (str(secret["name"]), str(secret.get("key") or "auth_token"))
        ray_cpus = _number(ray.get("numCpus"), "spec.ray.numCpus")
        ray_gpus = _number(ray.get("numGpus"), "spec.ray.numGpus")
        for key, value in (ray.get("replicaResources") or {}).items():
            amount = _number(value, f"spec.ray.replicaResources[{key}]")
            if amount is not None:
                ray_resources[str(key)] = amount
        # A fixed port needs one replica per worker, which only replicaResources (e.g.
        # ultramem_shard_slot: 1, offered once per worker) can guarantee: default to it then.
        default_port = GRPC_PORT if ray_resources else 0
        ray_port = _int(ray.get("port", default_port), "spec.ray.port", 0, 65535)

    image = spec.get("image") or default_image or ""
    if not image:
        raise InvalidSpec("spec.image is empty and the operator has no default image")
    pull_policy = spec.get("imagePullPolicy")
    if pull_policy is not None and pull_policy not in PULL_POLICIES:
        raise InvalidSpec(
            f"spec.imagePullPolicy must be one of {PULL_POLICIES}, got {pull_policy!r}")

    placement = spec.get("placement") or {}
    resources = spec.get("resources") or {}
    if not isinstance(resources, Mapping) or set(resources) - {"requests", "limits"}:
        raise InvalidSpec("spec.resources may only hold requests and limits")
    rollout = spec.get("rollout") or {}

    parsed = ValueStoreSpec(
        name=name,
        namespace=str(meta.get("namespace") or "default"),
        uid=str(meta.get("uid") or ""),
        generation=meta.get("generation"),
        store=_parse_store(spec.get("store")),
        version=version,
        shards=shards,
        replicas=replicas,
        replica_overrides=overrides,
        sharding=sharding,
        table=spec.get("table") or None,
        runtime=runtime,
        ray_cluster=ray_cluster,
        ray_client_port=ray_client_port,
        ray_port=ray_port,
        ray_auth_secret=ray_auth,
        ray_num_cpus=ray_cpus,
        ray_num_gpus=ray_gpus,
        ray_replica_resources=ray_resources,
        image=image,
        image_pull_policy=pull_policy,
        image_pull_secrets=tuple(
            str(s["name"]) for s in spec.get("imagePullSecrets") or [] if s.get("name")
        ),
        service_account=spec.get("serviceAccountName") or None,
        resources={k: dict(v) for k, v in resources.items() if v},
        node_selector=_str_map(placement.get("nodeSelector"), "spec.placement.nodeSelector"),
        tolerations=tuple(dict(t) for t in placement.get("tolerations") or []),
        affinity=dict(placement["affinity"]) if placement.get("affinity") else None,
        priority_class=placement.get("priorityClassName") or None,
        pod_labels=_str_map(spec.get("podLabels"), "spec.podLabels"),
        pod_annotations=_str_map(spec.get("podAnnotations"), "spec.podAnnotations"),
        drain_seconds=_int(rollout.get("drainSeconds", 30), "spec.rollout.drainSeconds", 0, 86400),
    )
    _check_generated_names(parsed)
    return parsed


def _check_generated_names(spec: ValueStoreSpec) -> None:
    # Imported late: manifests imports this module for the constants.
    from ultramem_operator.manifests import job_name, statefulset_name

    longest = statefulset_name(spec.name, spec.version, spec.layout, spec.shards - 1)
    if spec.runtime == "standalone" and len(longest) > _MAX_STATEFULSET_NAME:
        raise InvalidSpec(
            f"StatefulSet name {longest!r} would exceed {_MAX_STATEFULSET_NAME} characters; "
            "shorten metadata.name or spec.version"
        )
    job = job_name(spec.name, spec.version, spec.layout, spec.replicas)
    if spec.runtime == "ray" and len(job) > _MAX_LABEL_NAME:
        raise InvalidSpec(f"Job name {job!r} would exceed {_MAX_LABEL_NAME} characters")
    bad = [k for k, v in spec.pod_labels.items() if k.startswith("ultramem.io/") or len(v) > 63]
    if bad:
        raise InvalidSpec(f"spec.podLabels may not set ultramem.io/ labels or long values: {bad}")
