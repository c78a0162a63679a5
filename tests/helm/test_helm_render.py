"""Rendered chart: lint, mode exclusivity, and the fields production depends on."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from ultramem_chart import (
    CHART,
    FULLNAME,
    NAMESPACE,
    REPO,
    Rendered,
    all_variants,
    helm,
    render,
    variant_names,
    variant_values,
)

if str(REPO / "operators") not in sys.path:  # ultramem_operator ships in the image only
    sys.path.insert(0, str(REPO / "operators"))
from ultramem_operator import manifests, parse_spec  # noqa: E402


@pytest.fixture(scope="module")
def variants() -> dict[str, Rendered]:
    return all_variants()


GRPC, METRICS = 50051, 9090
BUILTIN_HARDENING = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                     "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


def shard_statefulsets(r: Rendered) -> list[dict[str, Any]]:
    return [s for s in r.kind("StatefulSet")
            if s["metadata"]["labels"].get("app.kubernetes.io/component") == "value-shard"]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return c


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ----------------------------------------------------------------------------- lint
@pytest.mark.parametrize("variant", ["default", "standalone", "gpu-ray", "ray-no-operator",
                                     "standalone-operator", "keda"])
def test_lint_strict_has_no_errors(variant: str) -> None:
    from ultramem_chart import variant_values

    report = helm.lint(str(CHART), values=variant_values(variant), strict=True,
                       kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


# ----------------------------------------------------------------------------- modes
def test_modes_never_render_together(variants: dict[str, Rendered]) -> None:
    for name, r in variants.items():
        mode = r.values.get("mode", "ray")
        if mode == "standalone":
            assert r.kind("RayCluster") == [], name
        else:
            assert shard_statefulsets(r) == [], name
            assert len(r.kind("RayCluster")) == 1, name


def test_every_variant_renders_notes_with_the_endpoints(variants: dict[str, Rendered]) -> None:
    for name, r in variants.items():
        assert f"helm test um -n {NAMESPACE}" in r.notes, name
        if r.values.get("mode") == "standalone":
            assert f"{FULLNAME}-shard-0.{NAMESPACE}.svc:{GRPC}" in r.notes, name
        else:
            assert f"--target {FULLNAME}-shards.{NAMESPACE}.svc:{GRPC}" in r.notes, name
            assert "status --json" in r.notes and "ray://" not in r.notes, name


# ----------------------------------------------------------------------------- standalone
@pytest.mark.parametrize(("variant", "expected"), [
    ("standalone", [2, 2, 2, 2]),
    ("one-shard", [1]),
    ("eight-shards", [4, 2, 2, 2, 2, 2, 2, 3]),
])
def test_one_statefulset_per_shard_with_its_replicas(variant: str, expected: list[int],
                                                     variants: dict[str, Rendered]) -> None:
    r = variants[variant]
    sts = {s["metadata"]["name"]: s for s in shard_statefulsets(r)}
    assert sorted(sts) == sorted(f"{FULLNAME}-shard-{k}" for k in range(len(expected)))
    for k, replicas in enumerate(expected):
        s = sts[f"{FULLNAME}-shard-{k}"]
        assert s["spec"]["replicas"] == replicas
        (c,) = s["spec"]["template"]["spec"]["containers"]
        assert c["command"] == [
            "ultramem-dist", "serve-shard", "/var/lib/ultramem/store", "--shard", str(k),
            "--host", "0.0.0.0", "--port", str(GRPC), "--metrics-port", str(METRICS),
            "--version", "v1", "--respawn",
        ]
    assert len(r.kind("PodDisruptionBudget")) == len(expected)

    headless = [s for s in r.kind("Service") if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == len(expected)


def test_respawn_can_be_turned_off() -> None:
    """shard.respawn=false: plain serve-shard (a crash is a container restart)."""
    values = {**variant_values("one-shard")}
    values["shard"] = {**values.get("shard", {}), "respawn": False}
    (sts,) = shard_statefulsets(render(values))
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert "--respawn" not in c["command"]
    assert c["command"][:2] == ["ultramem-dist", "serve-shard"]


def test_standalone_cpu_shards_can_run_the_torch_free_image() -> None:
    """image.shardCpuTag: standalone CPU shard pods run the `--target shard-cpu` image; GPU
    shard pods, the operator and everything else keep the full image."""
    repo = "ghcr.io/ultramem/ultramem-dist"
    for name in ("one-shard", "gpu-standalone"):
        values = {**variant_values(name)}
        full = f"{repo}:{values.get('image', {}).get('tag') or '0.1.0'}"
        values["image"] = {**values.get("image", {}), "shardCpuTag": "0.1.0-shard-cpu"}
        r = render(values)
        gpu = int(values.get("shard", {}).get("gpus", 0)) > 0
        want = full if gpu else f"{repo}:0.1.0-shard-cpu"
        stss = shard_statefulsets(r)
        assert stss
        for sts in stss:
            assert container(sts["spec"]["template"]["spec"], "shard")["image"] == want, name
        others = [c["image"] for owner, pod in r.pod_templates() for c in pod["containers"]
                  if not owner.startswith("StatefulSet")]  # fmt: skip
        assert others and all(image == full for image in others), others
    (sts, *_) = shard_statefulsets(render(variant_values("one-shard")))  # unset: full image
    assert container(sts["spec"]["template"]["spec"], "shard")["image"] == f"{repo}:0.1.0"


def test_selectors_probes_and_ports_agree(variants: dict[str, Rendered]) -> None:
    for name in ("standalone", "eight-shards", "gpu-standalone", "autoscaling"):
        r = variants[name]
        services = r.kind("Service")
        for sts in shard_statefulsets(r):
            pod = sts["spec"]["template"]
            labels = pod["metadata"]["labels"]
            assert selects(sts["spec"]["selector"]["matchLabels"], labels)
            c = container(pod["spec"], "shard")
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports == {"grpc": GRPC, "metrics": METRICS}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["grpc"] == {"port": ports["grpc"], "service": ""}, probe
            shard = labels["ultramem.io/shard"]
            headless = r.get("Service", f"{FULLNAME}-shard-{shard}")
            assert headless["spec"]["clusterIP"] == "None"
            assert selects(headless["spec"]["selector"], labels)
            assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
            svc_ports = {p["name"]: p for p in headless["spec"]["ports"]}
            assert svc_ports["grpc"]["port"] == GRPC and svc_ports["grpc"]["targetPort"] == "grpc"
            assert svc_ports["metrics"]["targetPort"] == "metrics"
            pdb = r.get("PodDisruptionBudget", f"{FULLNAME}-shard-{shard}")
            assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
            front = r.get("Service", FULLNAME)
            assert front["spec"]["type"] == "ClusterIP"
            assert selects(front["spec"]["selector"], labels)
            netpol = r.kind("NetworkPolicy")
            if netpol:
                assert selects(netpol[0]["spec"]["podSelector"]["matchLabels"], labels)
            others = [s for s in services if s["metadata"]["name"] not in (
                FULLNAME, headless["metadata"]["name"])]
            assert not any(selects(s["spec"]["selector"], labels) for s in others), name


def test_gpu_workers_request_gpus_on_gpu_nodes(variants: dict[str, Rendered]) -> None:
    for name in ("gpu-standalone", "gpu-ray"):
        pods = [(owner, spec) for owner, spec in variants[name].pod_templates()
                if "shard" in owner or "value-shard" in owner]
        assert pods, name
        for owner, spec in pods:
            c = spec["containers"][0]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, owner
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, owner
            assert spec["tolerations"][0]["key"] == "nvidia.com/gpu", owner
            assert c["image"].endswith(":0.1.0-cuda"), owner


def test_every_container_is_hardened_and_bounded(variants: dict[str, Rendered]) -> None:
    for name, r in variants.items():
        for owner, spec in r.pod_templates():
            psc = spec["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001, owner
            assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, owner
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                where = f"{name}: {owner}/{c['name']}"
                assert BUILTIN_HARDENING.items() <= c["securityContext"].items(), where
                assert c["resources"].get("requests"), where
                assert c["resources"].get("limits", {}).get("memory"), where
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"


def test_autoscaling_renders_one_hpa_per_shard_and_leaves_replicas_to_it(
    variants: dict[str, Rendered],
) -> None:
    r = variants["autoscaling"]
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in r.kind("HorizontalPodAutoscaler")}
    sts = shard_statefulsets(r)
    assert set(hpas) == {s["metadata"]["name"] for s in sts}
    for s in sts:
        assert "replicas" not in s["spec"]
        h = hpas[s["metadata"]["name"]]
        assert (h["spec"]["minReplicas"], h["spec"]["maxReplicas"]) == (2, 6)
    keda = variants["keda"]
    assert keda.kind("HorizontalPodAutoscaler") == []
    assert len(keda.kind("ScaledObject")) == 4
    assert all(v.kind("ScaledObject") == [] for n, v in variants.items() if n != "keda")


def test_network_policy_admits_only_clients_operator_tests_and_prometheus(
    variants: dict[str, Rendered],
) -> None:
    assert variants["netpol-off"].kind("NetworkPolicy") == []
    np = variants["standalone"].get("NetworkPolicy", f"{FULLNAME}-shards")
    assert np["spec"]["policyTypes"] == ["Ingress"]
    clients, prometheus = np["spec"]["ingress"]
    peers = [p["podSelector"]["matchLabels"] for p in clients["from"]]
    assert {"ultramem.io/client": "true"} in peers
    assert {"app.kubernetes.io/name": "ultramem", "app.kubernetes.io/instance": "um",
            "app.kubernetes.io/component": "helm-test"} in peers
    assert any(p.get("app.kubernetes.io/component") == "operator" for p in peers)
    assert clients["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert prometheus["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert prometheus["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}
    test_pod = variants["standalone"].kind("Pod")[0]
    assert selects(peers[1], test_pod["metadata"]["labels"])
    ray_np = variants["ray-no-operator"].get("NetworkPolicy", f"{FULLNAME}-shards")
    assert ray_np["spec"]["ingress"][0]["from"][0]["namespaceSelector"] == {
        "matchLabels": {"ultramem.io/clients": "true"}}
    assert ray_np["spec"]["ingress"][-1]["from"] == [
        {"podSelector": {"matchLabels": {"ray.io/cluster": FULLNAME}}}]
    names = [n["metadata"]["name"] for n in variants["standalone"].kind("NetworkPolicy")]
    assert f"{FULLNAME}-ray-head" not in names  # the Ray head policy is ray mode only


def _operator_policy(r: Rendered) -> dict[str, Any]:
    (dep,) = r.kind("Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    mine = [n for n in r.kind("NetworkPolicy")
            if selects(n["spec"]["podSelector"]["matchLabels"], pod_labels)]
    assert len(mine) == 1, f"the operator pod is selected by {len(mine)} NetworkPolicies"
    return mine[0]


def test_operator_pod_is_covered_by_a_deny_ingress_policy_and_has_a_readiness_probe(
    variants: dict[str, Rendered],
) -> None:
    with_operator = [n for n, v in variants.items() if v.kind("Deployment")]
    assert with_operator, "no variant renders the operator"
    for name in with_operator:
        r = variants[name]
        (dep,) = r.kind("Deployment")
        op = container(dep["spec"]["template"]["spec"], "operator")
        assert "--liveness=http://0.0.0.0:8080/healthz" in op["command"]
        assert op["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert op["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in op["ports"]
        if name == "netpol-off":
            continue
        pol = _operator_policy(r)
        assert pol["spec"]["policyTypes"] == ["Ingress"]
        assert pol["spec"]["ingress"] == []  # no pod may connect; the kubelet's probes may
        # the shards' policy does not select the operator (it would admit clients to it)
        assert pol["metadata"]["name"] != f"{FULLNAME}-shards"
    # no operator, no operator policy
    assert not any(n["metadata"]["name"].endswith("-operator")
                   for n in variants["ray-no-operator"].kind("NetworkPolicy"))


def test_operator_health_port_can_be_opened_to_named_peers() -> None:
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    r = render({"networkPolicy": {"operator": {"healthFrom": [peer]}}})
    pol = _operator_policy(r)
    assert pol["spec"]["ingress"] == [
        {"from": [peer], "ports": [{"port": "health", "protocol": "TCP"}]}]
    assert port_number("health", container(r.kind("Deployment")[0]["spec"]["template"]["spec"],
                                           "operator")) == 8080


def test_service_monitor_scrapes_the_metrics_port_of_shard_services(
    variants: dict[str, Rendered],
) -> None:
    assert variants["standalone"].kind("ServiceMonitor") == []
    for name in ("eight-shards", "ray-eight-shards"):
        r = variants[name]
        (sm,) = r.kind("ServiceMonitor")
        assert sm["spec"]["endpoints"][0]["port"] == "metrics"
        assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
        matched = [s for s in r.kind("Service")
                   if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert matched, name
        for svc in matched:
            assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}, name
    assert variants["eight-shards"].kind("ServiceMonitor")[0]["metadata"]["labels"][
        "release"] == "prometheus"


# ----------------------------------------------------------------------------- ray
def test_ray_cluster_hosts_one_shard_replica_per_worker(variants: dict[str, Rendered]) -> None:
    r = variants["ray-eight-shards"]
    (rc,) = r.kind("RayCluster")
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert group["groupName"] == "value-shard"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 8 * 3
    assert group["rayStartParams"]["resources"] == '"{\\"ultramem_shard_slot\\": 1}"'
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker_labels = group["template"]["metadata"]["labels"]
    (pdb,) = r.kind("PodDisruptionBudget")
    assert selects({k: v for k, v in pdb["spec"]["selector"]["matchLabels"].items()
                    if not k.startswith("ray.io/")}, worker_labels)
    headless = r.get("Service", f"{FULLNAME}-shards")
    assert headless["spec"]["selector"]["ray.io/cluster"] == FULLNAME
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "client", "containerPort": 10001} in head["ports"]
    gpu = variants["gpu-ray"].kind("RayCluster")[0]
    assert gpu["spec"]["enableInTreeAutoscaling"] is True
    gpu_group = gpu["spec"]["workerGroupSpecs"][0]
    assert (gpu_group["minReplicas"], gpu_group["replicas"], gpu_group["maxReplicas"]) == (
        8, 10, 18)


RAY_VARIANTS = ["default", "gpu-ray", "ray-no-operator", "ray-eight-shards"]


def kuberay_pods(rc: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(head, value-shard worker) pod labels as KubeRay sets them: the template's labels plus
    ray.io/cluster, ray.io/node-type and ray.io/group."""
    name = rc["metadata"]["name"]
    head = {**rc["spec"]["headGroupSpec"]["template"]["metadata"]["labels"],
            "ray.io/cluster": name, "ray.io/node-type": "head", "ray.io/group": "headgroup"}
    (group,) = rc["spec"]["workerGroupSpecs"]
    worker = {**group["template"]["metadata"]["labels"], "ray.io/cluster": name,
              "ray.io/node-type": "worker", "ray.io/group": group["groupName"]}
    return head, worker


def port_number(port: int | str, c: dict[str, Any]) -> int:
    """A Service targetPort / NetworkPolicy port (number or container port name) as a number."""
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return found


def check_ray_ports(r: Rendered, grpc: int) -> None:
    """Placement, worker container, readiness probe, Services and NetworkPolicies agree."""
    (rc,) = r.kind("RayCluster")
    head_labels, worker_labels = kuberay_pods(rc)
    worker_pod = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker = container(worker_pod, "ray-worker")
    head = container(rc["spec"]["headGroupSpec"]["template"]["spec"], "ray-head")
    assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {
        "grpc": grpc, "metrics": 8080}
    # Readiness only, on the replica's port; liveness stays KubeRay's raylet check and there
    # is no startup probe (it would restart workers that host no replica yet).
    assert worker["readinessProbe"]["grpc"] == {"port": grpc, "service": ""}
    assert "livenessProbe" not in worker and "startupProbe" not in worker

    # Placement: `up --port` binds that same port (hook Job, or the operator's Job).
    jobs = r.kind("Job")
    if jobs:
        (job,) = jobs
        cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    else:
        (vs,) = r.kind("ValueStore")
        assert vs["spec"]["ray"]["port"] == grpc
        cmd = manifests.up_command(parse_spec({**vs, "metadata": {**vs["metadata"], "uid": "u"}}))
    assert cmd[cmd.index("--port") + 1] == str(grpc)
    assert cmd[cmd.index("--resource") + 1] == "ultramem_shard_slot=1"

    # Services: the headless one and the front both select the workers (never the head) and
    # forward the gRPC port; nothing exposes the Ray Client port any more.
    headless = r.get("Service", f"{FULLNAME}-shards")
    front = r.get("Service", FULLNAME)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert front["spec"]["type"] == "ClusterIP" and "clusterIP" not in front["spec"]
    for svc in (headless, front):
        assert selects(svc["spec"]["selector"], worker_labels), svc["metadata"]["name"]
        assert not selects(svc["spec"]["selector"], head_labels), svc["metadata"]["name"]
        (port,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        assert port["port"] == grpc and port_number(port["targetPort"], worker) == grpc
        assert port["appProtocol"] == "grpc"
    assert {p["name"] for p in front["spec"]["ports"]} == {"grpc"}
    client_port = port_number("client", head)
    assert not any(p["port"] == client_port for svc in r.kind("Service")
                   for p in svc["spec"]["ports"])

    policies = {n["metadata"]["name"]: n["spec"] for n in r.kind("NetworkPolicy")}
    if not policies:
        return
    # Workers: clients only on the gRPC port, Prometheus only on metrics, the cluster on all.
    shards = policies[f"{FULLNAME}-shards"]
    assert selects(shards["podSelector"]["matchLabels"], worker_labels)
    assert not selects(shards["podSelector"]["matchLabels"], head_labels)
    clients, prometheus, cluster = shards["ingress"]
    assert [port_number(p["port"], worker) for p in clients["ports"]] == [grpc]
    assert {"ultramem.io/client": "true"} in [f["podSelector"]["matchLabels"]
                                              for f in clients["from"]]
    assert [port_number(p["port"], worker) for p in prometheus["ports"]] == [8080]
    assert "ports" not in cluster
    assert [f["podSelector"]["matchLabels"] for f in cluster["from"]] == [
        {"ray.io/cluster": FULLNAME}]
    assert selects(cluster["from"][0]["podSelector"]["matchLabels"], head_labels)
    # Head: its cluster on all ports, placement pods on the Ray Client port, Prometheus.
    head_np = policies[f"{FULLNAME}-ray-head"]
    assert selects(head_np["podSelector"]["matchLabels"], head_labels)
    assert not selects(head_np["podSelector"]["matchLabels"], worker_labels)
    own, placement, scrape = head_np["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": FULLNAME}}}]}
    assert [port_number(p["port"], head) for p in placement["ports"]] == [client_port]
    assert [port_number(p["port"], head) for p in scrape["ports"]] == [8080]
    (placement_peer,) = placement["from"]  # clients only with networkPolicy.rayClientAccess
    if jobs:
        job_pod_labels = jobs[0]["spec"]["template"]["metadata"]["labels"]
    else:
        (vs,) = r.kind("ValueStore")
        job = manifests.placement_job(parse_spec({**vs, "metadata": {**vs["metadata"],
                                                                      "uid": "u"}}))
        job_pod_labels = job["spec"]["template"]["metadata"]["labels"]
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"][
            "containers"][0]["env"]}
        assert env["RAY_ADDRESS"].endswith(f"-head-svc.{NAMESPACE}.svc:{client_port}")
    assert selects(placement_peer["podSelector"]["matchLabels"], job_pod_labels)


@pytest.mark.parametrize("variant", RAY_VARIANTS)
def test_ray_ports_agree_between_placement_workers_services_and_policies(
    variant: str, variants: dict[str, Rendered],
) -> None:
    check_ray_ports(variants[variant], GRPC)


def test_ray_ports_follow_the_grpc_port_value() -> None:
    check_ray_ports(render({"ports": {"grpc": 6000, "metrics": 9090}}), 6000)
    check_ray_ports(render({"ports": {"grpc": 6000, "metrics": 9090},
                            "operator": {"enabled": False}, "valueStore": {"create": False}}),
                    6000)


def test_ray_client_port_is_opened_to_clients_only_on_request() -> None:
    r = render({"networkPolicy": {"rayClientAccess": True}})
    head_np = r.get("NetworkPolicy", f"{FULLNAME}-ray-head")
    peers = [f["podSelector"]["matchLabels"] for f in head_np["spec"]["ingress"][1]["from"]]
    assert {"ultramem.io/client": "true"} in peers
    assert head_np["spec"]["ingress"][1]["ports"] == [{"port": 10001, "protocol": "TCP"}]


@pytest.mark.parametrize(("budget", "min_available"), [(1, 7), (3, 5), ("25%", 6), ("0%", 8)])
def test_ray_pdb_counts_serving_workers_with_min_available(budget: int | str,
                                                           min_available: int) -> None:
    # KubeRay's RayCluster has no scale subresource: the eviction API accepts only an integer
    # minAvailable for its pods. Ready = hosting a SERVING replica; idle workers stay evictable.
    r = render({"podDisruptionBudget": {"maxUnavailable": budget}})
    (pdb,) = r.kind("PodDisruptionBudget")
    assert "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["minAvailable"] == min_available  # 4 shards x 2 replicas - budget
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    _, worker_labels = kuberay_pods(r.kind("RayCluster")[0])
    assert selects(pdb["spec"]["selector"]["matchLabels"], worker_labels)


def test_ray_mode_places_actors_through_the_operator_or_a_hook_job(
    variants: dict[str, Rendered],
) -> None:
    (vs,) = variants["default"].kind("ValueStore")
    assert vs["spec"]["runtime"] == "ray" and vs["spec"]["ray"]["clusterName"] == FULLNAME
    assert variants["default"].kind("Job") == []
    hook = variants["ray-no-operator"].get("Job", f"{FULLNAME}-place-shards")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    c = hook["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:4] == ["ultramem-dist", "up", "/var/lib/ultramem/store", "--shards"]
    args = dict(zip(c["command"][3::2], c["command"][4::2], strict=False))
    assert args["--replicas"] == "2" and args["--address"] == "auto"
    assert args["--host"] == "node" and args["--resource"] == "ultramem_shard_slot=1"
    assert args["--port"] == str(GRPC)
    env = {e["name"]: e for e in c["env"]}
    assert env["RAY_ADDRESS"]["value"] == f"ray://{FULLNAME}-head-svc.{NAMESPACE}.svc:10001"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-auth"
    rc = variants["ray-no-operator"].kind("RayCluster")[0]
    assert rc["spec"]["authOptions"] == {"mode": "token", "secretName": "ray-auth"}


# ----------------------------------------------------------------------------- operator
def test_operator_rbac_is_least_privilege(variants: dict[str, Rendered]) -> None:
    r = variants["default"]
    (role,) = r.kind("Role")
    assert r.kind("ClusterRole") == []
    granted = {(g, res): set(rule["verbs"]) for rule in role["rules"]
               for g in rule["apiGroups"] for res in rule["resources"]}
    assert granted == {
        ("ultramem.io", "valuestores"): {"get", "list", "watch", "patch"},
        ("ultramem.io", "valuestores/status"): {"get", "patch"},
        ("apps", "statefulsets"): {"get", "list", "create", "patch", "delete"},
        ("", "services"): {"get", "list", "create", "patch", "delete"},
        ("batch", "jobs"): {"get", "list", "create", "patch", "delete"},
        ("", "events"): {"create"},
    }
    assert not any("*" in v or "secrets" in res for (_, res), v in granted.items())
    (binding,) = r.kind("RoleBinding")
    (dep,) = r.kind("Deployment")
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["kopf", "run", "--standalone"] and f"--namespace={NAMESPACE}" in cmd
    assert cmd[-2:] == ["-m", "ultramem_operator.main"]
    wide = variants["cluster-wide-operator"]
    assert len(wide.kind("ClusterRole")) == 1 and wide.kind("Role") == []
    assert "--all-namespaces" in wide.kind("Deployment")[0]["spec"]["template"]["spec"][
        "containers"][0]["command"]
    assert variants["ray-no-operator"].kind("Deployment") == []


def test_operator_managed_standalone_renders_a_valuestore_not_statefulsets(
    variants: dict[str, Rendered],
) -> None:
    r = variants["standalone-operator"]
    assert shard_statefulsets(r) == [] and r.kind("HorizontalPodAutoscaler") == []
    (vs,) = r.kind("ValueStore")
    assert vs["metadata"]["name"] == FULLNAME
    assert vs["spec"]["runtime"] == "standalone"
    assert vs["spec"]["replicaOverrides"] == {"2": 4}
    # PDBs select the operator's pods by the labels the operator puts on them.
    vs["metadata"]["uid"] = "u"
    spec = parse_spec(vs)
    for k in range(4):
        pod_labels = manifests.statefulset(spec, k)["spec"]["template"]["metadata"]["labels"]
        pdb = r.get("PodDisruptionBudget", f"{FULLNAME}-shard-{k}")
        assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
        assert selects(r.kind("NetworkPolicy")[0]["spec"]["podSelector"]["matchLabels"],
                       pod_labels)
        svc_labels = manifests.shard_service(spec, k, "v1", "s4")["metadata"]["labels"]
        assert selects({"ultramem.io/store": FULLNAME, "ultramem.io/endpoint": "shard"},
                       svc_labels)


# ----------------------------------------------------------------------------- helm test
def test_helm_test_pod_checks_health_then_runs_a_real_lookup(
    variants: dict[str, Rendered],
) -> None:
    pod = variants["standalone"].get("Pod", f"{FULLNAME}-test-gather")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (health,) = pod["spec"]["initContainers"]
    assert "grpc_health.v1" in health["command"][2]
    targets = ",".join(f"{FULLNAME}-shard-{k}.{NAMESPACE}.svc:{GRPC}" for k in range(4))
    assert health["command"][3] == targets
    lookup = pod["spec"]["containers"][0]["command"]
    assert lookup[:4] == ["ultramem-dist", "lookup", "--target", targets]
    assert lookup[4:8] == ["--table", "mem0", "--random", "8"]
    assert variants["netpol-off"].kind("Pod") == []


@pytest.mark.parametrize("variant", ["default", "ray-no-operator", "gpu-ray"])
def test_ray_helm_test_pod_looks_up_through_the_headless_service(
    variant: str, variants: dict[str, Rendered],
) -> None:
    r = variants[variant]
    pod = r.get("Pod", f"{FULLNAME}-test-gather")
    assert "initContainers" not in pod["spec"]
    (c,) = pod["spec"]["containers"]
    headless = r.get("Service", f"{FULLNAME}-shards")
    (grpc,) = [p for p in headless["spec"]["ports"] if p["name"] == "grpc"]
    assert c["command"] == [
        "ultramem-dist", "lookup",
        "--target", f"{headless['metadata']['name']}.{NAMESPACE}.svc:{grpc['port']}",
        "--table", "mem0", "--random", "8", "--timeout", "10",
    ]
    # No Ray access (no RAY_ADDRESS, no auth token) and no parsing of `status` text.
    assert [e["name"] for e in c["env"]] == ["HOME"]
    (np,) = [n for n in r.kind("NetworkPolicy") if n["metadata"]["name"].endswith("-shards")]
    peers = [peer["podSelector"]["matchLabels"] for peer in np["spec"]["ingress"][0]["from"]]
    assert any(selects(sel, pod["metadata"]["labels"]) for sel in peers)


@pytest.mark.parametrize("variant", variant_names())
def test_every_object_is_namespaced_into_the_release_and_labelled(
    variant: str, variants: dict[str, Rendered],
) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for d in variants[variant].docs:
        meta = d["metadata"]
        if d["kind"] not in cluster_scoped:
            assert meta.get("namespace") == NAMESPACE, (d["kind"], meta["name"])
        assert meta["labels"]["app.kubernetes.io/instance"] == "um", (d["kind"], meta["name"])
        assert len(meta["name"]) <= 63


def test_release_names_are_truncated_to_fit_shard_object_names() -> None:
    r = render({"mode": "standalone", "store": {"shards": 12}})
    long = render({"mode": "standalone", "store": {"shards": 12},
                   "fullnameOverride": "a" * 40})
    for sts in shard_statefulsets(long):
        # StatefulSet pods get a controller-revision-hash label "<name>-<10 chars>" (<= 63).
        assert len(sts["metadata"]["name"]) <= 52
    assert len(shard_statefulsets(r)) == 12
