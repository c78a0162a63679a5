"""Chart TLS / mutual TLS / bearer-token wiring: certificates and tokens come from Secrets,
serve-shard and the helm test pod get matching flags, probes move to the plaintext health port,
and every flag the chart renders exists on the real CLI."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from ultramem_chart import CHART, FULLNAME, NAMESPACE, Rendered, helm, render, variant_values

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


def test_rendered_flags_exist_on_the_cli(tls_auth: Rendered, mutual: Rendered) -> None:
    import importlib

    import typer

    from ultramem_dist.cli import _COMMAND_MODULES, app

    for name in _COMMAND_MODULES:
        importlib.import_module(name)
    group = typer.main.get_command(app)
    known = {
        cmd: {opt for p in group.commands[cmd].params for opt in getattr(p, "opts", [])}
        for cmd in ("serve-shard", "lookup")
    }
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
        ({"mode": "ray", "tls": {"enabled": True, "secretName": "s"}}, "standalone"),
        ({"standalone": {"managedBy": "operator"}, "auth": {"tokenSecretName": "t"}},
         "standalone"),
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
