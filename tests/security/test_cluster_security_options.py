"""Ray-mode security plumbing that needs no Ray cluster: the CLI's server/client flags, the
deployment's recorded placement, the sync channel behind ``check_health`` (bearer token over
loopback plaintext, TLS) and the value backend helper of ``generate``."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import grpc
import pytest
from conftest import make_table_spec
from tls_certs import make_pki
from typer.testing import CliRunner

from ultramem_dist.cli import load_commands
from ultramem_dist.cli.options import server_security_fields
from ultramem_dist.client import ChannelOptions
from ultramem_dist.client.channels import make_sync_channel
from ultramem_dist.cluster.deploy import PlacementOptions, placement_from_spec
from ultramem_dist.cluster.health import check_health
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving import ServerConfig
from ultramem_dist.store import export_tables

app = load_commands()

TOKEN = "sync-channel-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    export_tables({"mem0": make_table_spec(n_rows=64, dv=8)}, root, shards=1, version="v1")
    return root


@pytest.fixture(scope="module")
def token_server(store, tmp_path_factory, in_process_shard):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(TOKEN + "\n")
    return in_process_shard(ServerConfig(store=store, auth_token_file=tokens))


@pytest.fixture(scope="module")
def tls_server(store, pki, in_process_shard):
    return in_process_shard(
        ServerConfig(store=store, tls_cert=pki.server_cert, tls_key=pki.server_key)
    )


# ------------------------------------------------------------------ flags and placement


def test_server_security_fields_are_absolute_and_consistent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real.crt").write_text("x")
    (tmp_path / "link.crt").symlink_to(tmp_path / "real.crt")  # like a Secret mount
    fields = server_security_fields(Path("link.crt"), Path("k.pem"), None, Path("tok"), 7001)
    assert fields == {
        "tls_cert": str(tmp_path / "link.crt"),  # absolute, symlink not resolved
        "tls_key": str(tmp_path / "k.pem"),
        "auth_token_file": str(tmp_path / "tok"),
        "health_port": 7001,
    }
    assert server_security_fields() == {}
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        server_security_fields(tls_cert=Path("c"))
    with pytest.raises(ValueError, match="--tls-client-ca"):
        server_security_fields(tls_client_ca=Path("ca"))


def test_placement_records_absolute_server_files_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = PlacementOptions(
        host="node", port=50051, resources={"slot": 1.0}, server={"tls_cert": "c.pem", "x": 1}
    )
    assert p.server == {"tls_cert": str(tmp_path / "c.pem"), "x": 1}
    spec = {"host": "node", "port": 50051, "torch_threads": 1, "server": p.server}
    # a replica records its placement: everything but the Deployer's operation settings
    record = {k: v for k, v in vars(p).items() if k not in ("drain_s", "ready_timeout_s")}
    back = placement_from_spec({**spec, "placement": record})
    assert back.resources == {"slot": 1.0} and back.port == 50051 and back.server == p.server
    # replicas from before the placement was recorded: what their spec says
    old = placement_from_spec(spec)
    assert (old.host, old.port, old.server) == ("node", 50051, p.server)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["up", "{store}", "--tls-cert", "c.pem"], "--tls-cert and --tls-key"),
        (["up", "{store}", "--tls-client-ca", "ca.pem"], "--tls-client-ca"),
        (
            ["up", "{store}", "--tls-cert", "c", "--tls-key", "k", "--health-port", "7001"],
            "--health-port needs fixed ports",
        ),
        (["scale", "--shard", "0", "--replicas", "2", "--tls-key", "k"], "--tls-key must"),
        (["roll", "{store}", "--tls-cert", "c"], "--tls-cert and --tls-key"),
        (["status", "--tls-cert", "c"], "tls_cert and tls_key"),
        (["generate", "--prompt", "x", "--checkpoint", "{store}", "--tls-ca", "c"], "add --store"),
        (["generate", "--prompt", "x", "--checkpoint", "{store}", "--lookup", "x"], "--lookup"),
    ],
)
def test_cluster_commands_refuse_inconsistent_security_flags(tmp_path, args, message):
    args = [a.replace("{store}", str(tmp_path)) for a in args]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


def test_generate_hands_the_client_options_to_the_value_backend():
    from ultramem_dist.cli.model_cmds import open_value_store

    opts = ChannelOptions(tls_ca="ca.pem", auth_token=TOKEN)
    with (
        mock.patch("ultramem_dist.cluster.ClusterValueStore") as cluster,
        mock.patch("ultramem_dist.cluster.local.connect"),
    ):
        open_value_store("ray", deadline_s=3.0, options=opts)
    cluster.assert_called_once_with(deadline_s=3.0, options=opts, transport="process")
    # direct targets: open_remote_store picks the class by transport
    with mock.patch("ultramem_dist.client.process_store.ProcessValueStore") as proc:
        open_value_store("127.0.0.1:1", options=opts)
    proc.assert_called_once_with(
        "127.0.0.1:1", version=None, deadline_s=5.0, options=opts, process=None
    )
    with mock.patch("ultramem_dist.client.process_store.RemoteValueStore") as remote:
        open_value_store("127.0.0.1:1", options=opts, transport="thread")
    remote.assert_called_once_with("127.0.0.1:1", version=None, deadline_s=5.0, options=opts)
    with pytest.raises(ValueError, match="transport must be one of process, thread"):
        open_value_store("127.0.0.1:1", options=opts, transport="udp")


# ------------------------------------------------------------------ sync channel and health


def _info(channel: grpc.Channel) -> pb.InfoReply:
    return pb_grpc.GatherPoolStub(channel).Info(pb.InfoRequest(), timeout=5)


def test_sync_channel_sends_the_token_over_loopback_plaintext(token_server):
    with make_sync_channel([token_server.target], ChannelOptions(auth_token=TOKEN)) as ch:
        assert _info(ch).table_version == "v1"
    with make_sync_channel([token_server.target], ChannelOptions()) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _info(ch)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(ValueError, match="cleartext"):
        make_sync_channel(["192.0.2.1:50051"], ChannelOptions(auth_token=TOKEN))
    assert check_health(token_server.target) == "SERVING"  # health needs no token


def test_check_health_over_tls(tls_server, pki):
    assert check_health(tls_server.target, options=ChannelOptions(tls_ca=pki.ca)) == "SERVING"
    named = ChannelOptions(tls_ca=pki.ca, tls_server_name="localhost")
    assert check_health(tls_server.target, options=named) == "SERVING"
    wrong = ChannelOptions(tls_ca=pki.rogue_ca)  # not the CA that signed the server
    assert check_health(tls_server.target, options=wrong, timeout_s=1) == "UNREACHABLE"
    assert check_health(tls_server.target, timeout_s=1) == "UNREACHABLE"  # plaintext
    assert check_health("no-such-host.invalid:1") == "UNREACHABLE"
    with pytest.raises(ValueError, match="CA"):
        check_health(tls_server.target, options=ChannelOptions(tls_ca=pki.ca.parent / "none"))
