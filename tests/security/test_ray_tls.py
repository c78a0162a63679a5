"""Ray-mode security: shard actors serving mutual TLS + bearer tokens on a real local Ray.

One 1-shard deployment for the module (certificates made at test time): registry-following
lookups with the right credentials equal the local kernel, a caller without the token is refused
with UNAUTHENTICATED, health checks need the TLS settings (but no token), ``scale`` reuses the
deployment's security settings, a missing certificate on the node is a clear error, and ``down``
leaves no actor behind.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import init_local_ray, make_table_spec, random_queries
from tls_certs import make_pki
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from ultramem_dist.cli import load_commands  # noqa: E402
from ultramem_dist.client import ChannelOptions  # noqa: E402
from ultramem_dist.cluster import ClusterValueStore, Deployer, PlacementOptions  # noqa: E402
from ultramem_dist.cluster.deploy import ReplicaStartError  # noqa: E402
from ultramem_dist.cluster.health import check_health  # noqa: E402
from ultramem_dist.kernels import gather_pool  # noqa: E402
from ultramem_dist.store import export_tables  # noqa: E402

pytestmark = pytest.mark.integration

app = load_commands()

SPEC = make_table_spec(n_rows=200, dv=16, seed=7)
TOKEN = "ray-mode-token-0123456789abcdef"


class _Sel:
    def __init__(self, seed: int) -> None:
        self.indices, self.blocks, self.weights = random_queries(SPEC, 5, seed=seed)

    def expected(self) -> torch.Tensor:
        return gather_pool(SPEC.values, self.indices, self.blocks, self.weights, SPEC.expansion)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# shard tokens\n{TOKEN}\n")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    export_tables({"mem0": SPEC}, root, shards=1, by="row", version="v1")
    return root


@pytest.fixture(scope="module")
def client_options(pki) -> ChannelOptions:
    return ChannelOptions(
        tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key, auth_token=TOKEN
    )


@pytest.fixture(scope="module")
def deployed(pki, token_file, store):
    """``ultramem-dist up`` (in process, on this test's Ray) of the 1-shard store with mutual TLS
    and a token file; ``down`` at the end."""
    init_local_ray()
    deployer = Deployer(PlacementOptions(drain_s=0.2))
    try:
        res = CliRunner().invoke(
            app,
            [
                "up", str(store), "--replicas", "1",
                "--tls-cert", str(pki.server_cert),
                "--tls-key", str(pki.server_key),
                "--tls-client-ca", str(pki.ca),
                "--auth-token-file", str(token_file),
            ],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        yield deployer
    finally:
        deployer.down()
        ray.shutdown()


def _endpoints(deployer: Deployer) -> list[str]:
    dep = deployer.active()
    return [rec["endpoint"] for reps in dep["replicas"].values() for rec in reps.values()]


def test_lookups_with_tls_and_token_equal_the_local_kernel(deployed, client_options):
    sel = _Sel(seed=3)
    with ClusterValueStore(options=client_options, poll_s=0.5) as backend:
        got = backend.submit("mem0", sel).result(timeout=15)
        assert backend.version == "v1"
    torch.testing.assert_close(got, sel.expected(), rtol=1e-5, atol=1e-6)


def test_a_client_without_the_token_or_the_certificates_is_refused(deployed, pki):
    no_token = ChannelOptions(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    with pytest.raises(Exception, match="UNAUTHENTICATED"):
        ClusterValueStore(options=no_token, deadline_s=3.0, poll_s=0.5).close()
    with pytest.raises(Exception, match="(?i)unavailable|no target answered"):
        ClusterValueStore(deadline_s=3.0, poll_s=0.5).close()  # plaintext towards a TLS-only port


def test_health_needs_tls_settings_but_no_token(deployed, pki, client_options):
    (endpoint,) = _endpoints(deployed)
    assert check_health(endpoint, options=client_options) == "SERVING"
    no_token = ChannelOptions(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    assert check_health(endpoint, options=no_token) == "SERVING"
    assert check_health(endpoint) == "UNREACHABLE"  # plaintext towards TLS
    assert check_health(endpoint, options=ChannelOptions(tls_ca=pki.ca)) == "UNREACHABLE"  # mTLS


def test_status_cli_checks_health_with_the_client_flags(deployed, pki):
    runner = CliRunner()
    res = runner.invoke(app, ["status", "--window", "0.1"])
    assert res.exit_code == 0, res.output
    assert "UNREACHABLE" in res.output and "--tls-ca" in res.output  # hint for TLS replicas
    res = runner.invoke(
        app,
        [
            "status", "--window", "0.1",
            "--tls-ca", str(pki.ca),
            "--tls-cert", str(pki.client_cert),
            "--tls-key", str(pki.client_key),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "SERVING" in res.output and "UNREACHABLE" not in res.output


def test_scale_reuses_the_deployments_tls_and_token(deployed, client_options):
    res = CliRunner().invoke(app, ["scale", "--shard", "0", "--replicas", "2"])
    assert res.exit_code == 0, res.output
    endpoints = _endpoints(deployed)
    assert len(endpoints) == 2
    assert all(check_health(e, options=client_options) == "SERVING" for e in endpoints)
    assert all(check_health(e) == "UNREACHABLE" for e in endpoints)  # no plaintext replica
    placement = deployed.deployment_placement()
    assert placement.server["auth_token_file"] and placement.server["tls_client_ca"]
    sel = _Sel(seed=5)
    with ClusterValueStore(options=client_options, poll_s=0.5) as backend:
        for _ in range(4):  # round robin over both replicas
            got = backend.submit("mem0", sel).result(timeout=15)
            torch.testing.assert_close(got, sel.expected(), rtol=1e-5, atol=1e-6)


def test_a_certificate_missing_on_the_node_is_a_clear_error(deployed, store, pki, tmp_path):
    before = ray.get(deployed.registry.snapshot.remote())
    missing = tmp_path / "nowhere" / "server.crt"
    bad = Deployer(
        PlacementOptions(drain_s=0.2, server={"tls_cert": missing, "tls_key": pki.server_key})
    )
    with pytest.raises(ReplicaStartError, match=r"TLS certificate .*server\.crt.*does not exist"):
        bad.up(store, replicas=1)
    # the CLI: exit 1 and the same sentence, no traceback
    res = CliRunner().invoke(
        app, ["up", str(store), "--tls-cert", str(missing), "--tls-key", str(pki.server_key)]
    )
    assert res.exit_code == 1, res.output
    assert "does not exist on this node" in " ".join(res.output.split())
    after = ray.get(deployed.registry.snapshot.remote())
    assert after["active"] == before["active"]  # nothing switched, the failed sets are gone
    assert set(after["deployments"]) == set(before["deployments"])


def test_down_leaves_no_actor(deployed):
    assert deployed.down() == 1
    deadline = time.monotonic() + 20  # ray.kill is asynchronous
    while True:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        left = [n for n in names if n.startswith("ultramem")]
        if not left:
            break
        assert time.monotonic() < deadline, f"actors left after down: {left}"
        time.sleep(0.2)
