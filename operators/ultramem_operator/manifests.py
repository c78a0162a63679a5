"""Child manifests of a ValueStore (pure functions: spec in, plain dicts out).

Naming (all in the ValueStore's namespace):

* StatefulSet per shard and layout: ``<store>-<version>-<layout>-<shard>``
* front ClusterIP Service: ``<store>``; headless Service per shard: ``<store>-shard-<k>``
* ray runtime placement Job: ``<store>-up-<version>-<layout>-r<replicas>``

Owner references are added by the handlers with ``kopf.adopt`` right before creation.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from ultramem_operator.spec import (
    ANNOTATION_TEMPLATE_HASH,
    GRPC_PORT,
    LABEL_ENDPOINT,
    LABEL_LAYOUT,
    LABEL_SHARD,
    LABEL_STORE,
    LABEL_VERSION,
    METRICS_PORT,
    ValueStoreSpec,
)

MANAGED_BY = "ultramem-operator"
RUN_AS = 10001
STORE_VOLUME = "store"


def statefulset_name(store: str, version: str, layout: str, shard: int) -> str:
    return f"{store}-{version}-{layout}-{shard}"


def front_service_name(store: str) -> str:
    return store


def shard_service_name(store: str, shard: int) -> str:
    return f"{store}-shard-{shard}"


def job_name(store: str, version: str, layout: str, replicas: int) -> str:
    return f"{store}-up-{version}-{layout}-r{replicas}"


def common_labels(spec: ValueStoreSpec, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "ultramem",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_STORE: spec.name,
    }


def selector(
    spec: ValueStoreSpec, version: str, layout: str, shard: int | None = None
) -> dict[str, str]:
    """Pod selector of one layout (all shards) or of one shard of it."""
    labels = {LABEL_STORE: spec.name, LABEL_VERSION: version, LABEL_LAYOUT: layout}
    if shard is not None:
        labels[LABEL_SHARD] = str(shard)
    return labels


def template_hash(obj: Any) -> str:
    """Stable digest of what we asked for (API-server defaulting never changes it)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _store_volumes(spec: ValueStoreSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if spec.store.pvc_claim:
        volumes.append({
            "name": STORE_VOLUME,
            "persistentVolumeClaim": {"claimName": spec.store.pvc_claim,
                                      "readOnly": spec.store.read_only},
        })
        mounts.append({"name": STORE_VOLUME, "mountPath": spec.store.mount_path,
                       "readOnly": spec.store.read_only})
    return volumes, mounts


def _container_env(spec: ValueStoreSpec) -> list[dict[str, Any]]:
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        {"name": "ULTRAMEM_STORE", "value": spec.name},
        {"name": "ULTRAMEM_TABLE_VERSION", "value": spec.version},
    ]


def _pod_spec_common(spec: ValueStoreSpec) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": _pod_security_context(),
        "enableServiceLinks": False,
    }
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.affinity:
        pod["affinity"] = copy.deepcopy(dict(spec.affinity))
    if spec.priority_class:
        pod["priorityClassName"] = spec.priority_class
    return pod


def grpc_probe(period: int, failures: int, timeout: int = 2) -> dict[str, Any]:
    """Kubernetes' native gRPC probe against grpc.health.v1 (empty service = whole server)."""
    return {
        "grpc": {"port": GRPC_PORT, "service": ""},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def serve_shard_command(spec: ValueStoreSpec, shard: int) -> list[str]:
    return [
        "ultramem-dist", "serve-shard", spec.store_dir,
        "--shard", str(shard),
        "--host", "0.0.0.0",
        "--port", str(GRPC_PORT),
        "--metrics-port", str(METRICS_PORT),
        "--version", spec.version,
    ]


def up_command(spec: ValueStoreSpec) -> list[str]:
    """``ultramem-dist up``: places (and blue/green-switches to) the target on the RayCluster."""
    cmd = [
        "ultramem-dist", "up", spec.store_dir,
        "--shards", str(spec.shards),
        "--replicas", str(spec.replicas),
        "--address", "auto",
        "--version", spec.version,
        "--by", spec.sharding,
        "--host", "node",
    ]
    if spec.ray_port:
        cmd += ["--port", str(spec.ray_port)]
    if spec.ray_num_cpus is not None:
        cmd += ["--num-cpus", _num(spec.ray_num_cpus)]
    if spec.ray_num_gpus:
        cmd += ["--num-gpus", _num(spec.ray_num_gpus)]
    for name, amount in sorted(spec.ray_replica_resources.items()):
        cmd += ["--resource", f"{name}={_num(amount)}"]
    return cmd


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def statefulset(spec: ValueStoreSpec, shard: int) -> dict[str, Any]:
    """One shard of the target layout: ``replicas_for(shard)`` identical serve-shard pods."""
    version, layout = spec.target
    name = statefulset_name(spec.name, version, layout, shard)
    match = selector(spec, version, layout, shard)
    pod_labels = {**spec.pod_labels, **common_labels(spec, "value-shard"), **match}
    volumes, mounts = _store_volumes(spec)
    container: dict[str, Any] = {
        "name": "shard",
        "image": spec.image,
        "command": serve_shard_command(spec, shard),
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": _container_env(spec),
        # Loading a big table can take minutes: the startup probe holds liveness off until then.
        "startupProbe": grpc_probe(period=5, failures=120),
        "readinessProbe": grpc_probe(period=5, failures=2),
        "livenessProbe": grpc_probe(period=10, failures=6, timeout=5),
        "resources": copy.deepcopy(dict(spec.resources)),
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod_spec = {
        **_pod_spec_common(spec),
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": volumes,
        "topologySpreadConstraints": [{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": match},
        }],
    }
    template = {
        "metadata": {"labels": pod_labels, "annotations": dict(spec.pod_annotations)},
        "spec": pod_spec,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": name,
            "namespace": spec.namespace,
            "labels": {**common_labels(spec, "value-shard"), **match},
            "annotations": {ANNOTATION_TEMPLATE_HASH: template_hash(template)},
        },
        "spec": {
            "replicas": spec.replicas_for(shard),
            "serviceName": shard_service_name(spec.name, shard),
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "selector": {"matchLabels": match},
            "template": template,
        },
    }


def _service_ports(with_metrics: bool) -> list[dict[str, Any]]:
    ports = [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
              "appProtocol": "grpc"}]
    if with_metrics:
        ports.append({"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics",
                      "protocol": "TCP"})
    return ports


def shard_service(spec: ValueStoreSpec, shard: int, version: str, layout: str) -> dict[str, Any]:
    """Headless Service of one shard set: clients resolve every replica and round-robin."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": shard_service_name(spec.name, shard),
            "namespace": spec.namespace,
            "labels": {**common_labels(spec, "value-shard"), LABEL_ENDPOINT: "shard",
                       LABEL_SHARD: str(shard)},
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": selector(spec, version, layout, shard),
            "ports": _service_ports(with_metrics=True),
        },
    }


def front_service(spec: ValueStoreSpec, version: str, layout: str) -> dict[str, Any]:
    """ClusterIP front over every shard of the serving layout (health, discovery, smoke tests)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": front_service_name(spec.name),
            "namespace": spec.namespace,
            "labels": {**common_labels(spec, "gather-front"), LABEL_ENDPOINT: "front"},
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector(spec, version, layout),
            "ports": _service_ports(with_metrics=False),
        },
    }


def placement_job(spec: ValueStoreSpec) -> dict[str, Any]:
    """ray runtime: run ``ultramem-dist up`` once per target against the RayCluster.

    ``--address auto`` resolves ``RAY_ADDRESS`` (the cluster's Ray Client endpoint), so the Job
    needs no Ray node of its own; it mounts the store at the same path as the Ray workers
    because ``up`` reads the manifest locally and the actors open the same path. ``up`` itself
    starts the new deployment beside the active one, switches the registry and stops the old.
    """
    version, layout = spec.target
    assert spec.ray_cluster is not None
    address = f"ray://{spec.ray_cluster}-head-svc.{spec.namespace}.svc:{spec.ray_client_port}"
    labels = {**common_labels(spec, "placement"), LABEL_VERSION: version, LABEL_LAYOUT: layout}
    volumes, mounts = _store_volumes(spec)
    env = [*_container_env(spec), {"name": "RAY_ADDRESS", "value": address}]
    if spec.ray_auth_secret:
        secret, key = spec.ray_auth_secret
        env += [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN",
             "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}},
        ]
    container: dict[str, Any] = {
        "name": "up",
        "image": spec.image,
        "command": up_command(spec),
        "env": env,
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"},
                      "limits": {"memory": "2Gi"}},
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod_spec = {**_pod_spec_common(spec), "restartPolicy": "Never", "containers": [container],
                "volumes": volumes}
    pod_spec.pop("tolerations", None)  # the Job runs anywhere; only shard pods need GPU nodes
    pod_spec.pop("nodeSelector", None)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(spec.name, version, layout, spec.replicas),
                     "namespace": spec.namespace,
                     "labels": labels},
        "spec": {
            "backoffLimit": 6,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
