"""Chart TLS / mutual TLS / bearer-token wiring: certificates and tokens come from Secrets,
serve-shard (standalone) or `ultramem-dist up` (ray, placement Job) and the helm test pod get
matching flags, the pods that read the files mount the Secrets, probes move to the plaintext
health port, and every flag the chart renders exists on the real CLI."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from ultramem_chart import (
    CHART,
    FULLNAME,
    NAMESPACE,
    Rendered,
    helm,
    render,
    render_variant,
    variant_values,
)

GRPC, HEALTH = 50051, 50052
TLS_DIR, AUTH_DIR = "/etc/ultramem/tls", "/etc/ultramem/auth"


def values(**over: Any) -> dict[str, Any]:
    v = copy.deepcopy(variant_values("standalone"))
    v.update(copy.deepcopy(over))
    return v


def shard_pods(r: Rendered) -> list[dict[str, Any]]:
    sts = [s for s in r.kind("StatefulSet")
           if s["metadata"]["labels"].get("app.kubernetes.io/component") == "value-shard"]
    assert sts
    return [s["spec"]["template"]["spec"] for s in sts]


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


@pytest.fixture(scope="module")
def tls_auth() -> Rendered:
    return render(values(tls={"enabled": True, "secretName": "um-shard-tls"},
                         auth={"tokenSecretName": "um-tokens"}))


@pytest.fixture(scope="module")
def mutual() -> Rendered:
    return render(values(tls={"enabled": True, "secretName": "um-shard-tls", "mutual": True,
                              "serverName": "shards.ultramem.internal"}))


def test_default_renders_no_tls_or_auth() -> None:
    r = render(values())
    for pod in shard_pods(r):
        (c,) = pod["containers"]
        assert not any(a.startswith(("--tls", "--auth", "--health-port")) for a in c["command"])
        assert {v["name"] for v in pod["volumes"]} == {"tmp", "store"}
        assert c["readinessProbe"]["grpc"]["port"] == GRPC


def test_shards_serve_tls_with_tokens_from_secrets(tls_auth: Rendered) -> None:
    for pod in shard_pods(tls_auth):
        (c,) = pod["containers"]
        cmd = c["command"]
        assert flag(cmd, "--tls-cert") == f"{TLS_DIR}/tls.crt"
        assert flag(cmd, "--tls-key") == f"{TLS_DIR}/tls.key"
        assert "--tls-client-ca" not in cmd
        assert flag(cmd, "--health-port") == str(HEALTH)
        assert flag(cmd, "--auth-token-file") == f"{AUTH_DIR}/tokens"
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["tls"]["secret"]["secretName"] == "um-shard-tls"
        assert vols["auth"]["secret"]["secretName"] == "um-tokens"
        assert vols["tls"]["secret"]["defaultMode"] == 0o440
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["tls"] == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
        assert mounts["auth"] == {"name": "auth", "mountPath": AUTH_DIR, "readOnly": True}
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["health"] == HEALTH and ports["grpc"] == GRPC
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # kubelet: no TLS
            assert c[probe]["grpc"] == {"port": HEALTH, "service": ""}


def test_mutual_tls_requires_client_certificates(mutual: Rendered) -> None:
    for pod in shard_pods(mutual):
        assert flag(pod["containers"][0]["command"], "--tls-client-ca") == f"{TLS_DIR}/ca.crt"
        assert "--auth-token-file" not in pod["containers"][0]["command"]
        assert "auth" not in {v["name"] for v in pod["volumes"]}


def test_helm_test_pod_speaks_the_same_security(tls_auth: Rendered, mutual: Rendered) -> None:
    pod = tls_auth.get("Pod", f"{FULLNAME}-test-gather")
    lookup = pod["spec"]["containers"][0]
    cmd = lookup["command"]
    assert cmd[:2] == ["ultramem-dist", "lookup"]
    assert flag(cmd, "--tls-ca") == f"{TLS_DIR}/ca.crt" and "--tls-cert" not in cmd
    assert flag(cmd, "--auth-token-file") == f"{AUTH_DIR}/tokens"
    assert {m["name"] for m in lookup["volumeMounts"]} == {"tmp", "tls", "auth"}
    assert {v["name"] for v in pod["spec"]["volumes"]} == {"tmp", "tls", "auth"}
    (health,) = pod["spec"]["initContainers"]
    script = health["command"][2]
    assert "ssl_channel_credentials" in script and 'read("tls.key")' not in script
    compile(script, "health-check", "exec")  # the rendered Python is valid
    targets = health["command"][3].split(",")
    assert targets[0] == f"{FULLNAME}-shard-0.{NAMESPACE}.svc:{GRPC}"  # TLS on the gRPC port

    pod = mutual.get("Pod", f"{FULLNAME}-test-gather")
    cmd = pod["spec"]["containers"][0]["command"]
    assert flag(cmd, "--tls-cert") == f"{TLS_DIR}/tls.crt"
    assert flag(cmd, "--tls-key") == f"{TLS_DIR}/tls.key"
    assert flag(cmd, "--tls-server-name") == "shards.ultramem.internal"
    script = pod["spec"]["initContainers"][0]["command"][2]
    assert 'read("tls.key"), read("tls.crt")' in script and "shards.ultramem.internal" in script
    compile(script, "health-check", "exec")


def cli_flags() -> dict[str, set[str]]:
    import typer

    from ultramem_dist.cli import load_commands

    app = load_commands()
    group = typer.main.get_command(app)
    return {
        cmd: {opt for p in group.commands[cmd].params for opt in getattr(p, "opts", [])}
        for cmd in ("serve-shard", "lookup", "up", "status")
    }


def test_rendered_flags_exist_on_the_cli(tls_auth: Rendered, mutual: Rendered) -> None:
    known = cli_flags()
    for r in (tls_auth, mutual):
        for pod in shard_pods(r):
            cmd = pod["containers"][0]["command"]
            assert {a for a in cmd if a.startswith("--")} <= known["serve-shard"]
        cmd = r.get("Pod", f"{FULLNAME}-test-gather")["spec"]["containers"][0]["command"]
        assert {a for a in cmd if a.startswith("--")} <= known["lookup"]


def test_tls_values_lint_and_validate(tls_auth: Rendered) -> None:
    report = helm.lint(str(CHART), values=values(tls={"enabled": True, "secretName": "s",
                                                      "mutual": True},
                                                 auth={"tokenSecretName": "t"}),
                       strict=True, kube_version="v1.30.0")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2]
    kv = pytest.importorskip("kubernetes_validate")
    for d in tls_auth.docs:
        if d["kind"] in ("StatefulSet", "Pod"):
            kv.validate(d, "1.30.0", strict=True)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"tls": {"enabled": True}}, "tls.secretName"),
        ({"tls": {"enabled": True, "secretName": "s", "healthPort": GRPC}}, "healthPort"),
        # the operator passes no TLS / token settings: its modes still refuse them
        ({"mode": "ray", "tls": {"enabled": True, "secretName": "s"}}, "operator.enabled=false"),
        ({"mode": "ray", "operator": {"enabled": True}, "auth": {"tokenSecretName": "t"}},
         "operator.enabled=false"),
        ({"standalone": {"managedBy": "operator"}, "auth": {"tokenSecretName": "t"}},
         "managedBy=helm"),
    ],
)
def test_inconsistent_security_values_are_refused(over: dict[str, Any], message: str) -> None:
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values(**over), name="um", namespace=NAMESPACE)


@pytest.mark.parametrize(
    "over",
    [
        {"tls": {"enabled": "yes"}},
        {"tls": {"secretName": "Not_A_Name"}},
        {"tls": {"healthPort": 0}},
        {"tls": {"cert": "x"}},
        {"auth": {"tokenSecretName": "UPPER"}},
        {"auth": {"tokenKey": "a/b"}},
    ],
)
def test_schema_rejects_bad_security_values(over: dict[str, Any]) -> None:
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values(**over))


# ------------------------------------------------------------------------------ ray mode


def ray_values(**over: Any) -> dict[str, Any]:
    v = copy.deepcopy(variant_values("ray-no-operator"))
    v.update(copy.deepcopy(over))
    return v


@pytest.fixture(scope="module")
def ray_tls() -> Rendered:
    """ci/ray-tls-values.yaml: ray without the operator, mutual TLS and a token file."""
    return render_variant("ray-tls")


def ray_pods(r: Rendered) -> dict[str, dict[str, Any]]:
    (rc,) = r.kind("RayCluster")
    (worker,) = rc["spec"]["workerGroupSpecs"]
    return {"head": rc["spec"]["headGroupSpec"]["template"]["spec"],
            "worker": worker["template"]["spec"]}


def placement_cmd(r: Rendered) -> list[str]:
    job = r.get("Job", f"{FULLNAME}-place-shards")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c["command"]


def test_ray_mode_without_security_renders_as_before() -> None:
    r = render(ray_values())
    for pod in ray_pods(r).values():
        assert not {"tls", "auth"} & {v["name"] for v in pod["volumes"]}
    worker = ray_pods(r)["worker"]["containers"][0]
    assert "health" not in {p["name"] for p in worker["ports"]}
    assert worker["readinessProbe"]["grpc"]["port"] == GRPC
    assert not any(a.startswith(("--tls", "--auth", "--health-port")) for a in placement_cmd(r))


def test_ray_pods_mount_the_secrets_the_shard_actors_read(ray_tls: Rendered) -> None:
    for role, pod in ray_pods(ray_tls).items():
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["tls"]["secret"] == {"secretName": "um-shard-tls", "defaultMode": 0o440}, role
        assert vols["auth"]["secret"] == {"secretName": "um-tokens", "defaultMode": 0o440}, role
        (c,) = pod["containers"]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["tls"] == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}, role
        assert mounts["auth"] == {"name": "auth", "mountPath": AUTH_DIR, "readOnly": True}, role
        assert {"tmp", "store", "shm"} <= set(mounts)  # the usual mounts stay
    worker = ray_pods(ray_tls)["worker"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports["grpc"] == GRPC and ports["health"] == HEALTH
    assert worker["readinessProbe"]["grpc"] == {"port": HEALTH, "service": ""}  # kubelet: no TLS


def test_ray_placement_job_hands_the_server_flags_to_up(ray_tls: Rendered) -> None:
    cmd = placement_cmd(ray_tls)
    assert cmd[:2] == ["ultramem-dist", "up"]
    assert flag(cmd, "--tls-cert") == f"{TLS_DIR}/tls.crt"
    assert flag(cmd, "--tls-key") == f"{TLS_DIR}/tls.key"
    assert flag(cmd, "--tls-client-ca") == f"{TLS_DIR}/ca.crt"
    assert flag(cmd, "--health-port") == str(HEALTH)
    assert flag(cmd, "--auth-token-file") == f"{AUTH_DIR}/tokens"
    assert flag(cmd, "--port") == str(GRPC)  # the health port needs fixed ports
    # the files are read on the workers; the Job only talks to Ray
    job_pod = ray_tls.get("Job", f"{FULLNAME}-place-shards")["spec"]["template"]["spec"]
    assert not {"tls", "auth"} & {v["name"] for v in job_pod["volumes"]}
    # one-way TLS: no client CA
    cmd = placement_cmd(render(ray_values(tls={"enabled": True, "secretName": "s"})))
    assert "--tls-client-ca" not in cmd and "--auth-token-file" not in cmd
    assert flag(cmd, "--tls-cert") == f"{TLS_DIR}/tls.crt"


def test_ray_helm_test_resolves_the_workers_and_speaks_their_security(ray_tls: Rendered) -> None:
    pod = ray_tls.get("Pod", f"{FULLNAME}-test-gather")
    assert "initContainers" not in pod["spec"]
    (c,) = pod["spec"]["containers"]
    cmd = c["command"]
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], "helm-test", "exec")  # the rendered Python is valid
    assert "getaddrinfo" in cmd[2] and '"ultramem-dist", "lookup"' in cmd[2]
    shards = f"{FULLNAME}-shards.{NAMESPACE}.svc"
    assert cmd[3] == f"{shards}:{GRPC}"
    args = cmd[4:]
    assert flag(args, "--tls-ca") == f"{TLS_DIR}/ca.crt"
    assert flag(args, "--tls-cert") == f"{TLS_DIR}/tls.crt"
    assert flag(args, "--tls-key") == f"{TLS_DIR}/tls.key"
    assert flag(args, "--auth-token-file") == f"{AUTH_DIR}/tokens"
    assert flag(args, "--tls-server-name") == shards  # pod IPs are dialled, the name verified
    assert {m["name"] for m in c["volumeMounts"]} == {"tmp", "tls", "auth"}
    # an explicit tls.serverName is passed once, instead of the Service name
    named = render(ray_values(tls={"enabled": True, "secretName": "s", "serverName": "x.io"}))
    cmd = named.get("Pod", f"{FULLNAME}-test-gather")["spec"]["containers"][0]["command"]
    assert cmd.count("--tls-server-name") == 1 and flag(cmd, "--tls-server-name") == "x.io"
    # without TLS the client expands the Service name itself
    plain = render(ray_values(auth={"tokenSecretName": "t"}))
    cmd = plain.get("Pod", f"{FULLNAME}-test-gather")["spec"]["containers"][0]["command"]
    assert cmd[:4] == ["ultramem-dist", "lookup", "--target", f"{shards}:{GRPC}"]
    assert flag(cmd, "--auth-token-file") == f"{AUTH_DIR}/tokens"


def test_ray_rendered_flags_exist_on_the_cli(ray_tls: Rendered) -> None:
    known = cli_flags()
    assert {a for a in placement_cmd(ray_tls) if a.startswith("--")} <= known["up"]
    cmd = ray_tls.get("Pod", f"{FULLNAME}-test-gather")["spec"]["containers"][0]["command"]
    assert {a for a in cmd[4:] if a.startswith("--")} | {"--target"} <= known["lookup"]
    # what docs/kubernetes.md tells operators to run on the head pod
    assert {"--tls-ca", "--tls-cert", "--tls-key", "--tls-server-name",
            "--auth-token-file"} <= known["status"]


def test_ray_tls_values_lint_and_validate(ray_tls: Rendered) -> None:
    report = helm.lint(str(CHART), values=variant_values("ray-tls"), strict=True,
                       kube_version="v1.30.0")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2]
    kv = pytest.importorskip("kubernetes_validate")
    for d in ray_tls.docs:
        if d["kind"] in ("Job", "Pod"):
            kv.validate(d, "1.30.0", strict=True)
