"""TLS, mutual TLS and bearer-token auth of the gather service, with certificates made at test
time. Every server here is a real ``grpc.aio`` server on loopback."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from conftest import InProcessShard, make_table_spec, random_queries
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tls_certs import make_pki
from typer.testing import CliRunner

from ultramem_dist._private.codec import encode_tensor
from ultramem_dist.cli import load_commands
from ultramem_dist.client import ChannelOptions, GatherClient, RemoteValueStore
from ultramem_dist.client.channels import make_channel
from ultramem_dist.errors import ShardUnavailableError
from ultramem_dist.kernels import gather_pool
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc
from ultramem_dist.serving import ServerConfig
from ultramem_dist.serving.security import TokenPolicy, bearer_token
from ultramem_dist.store import export_tables

app = load_commands()

SPEC = make_table_spec(n_rows=300, dv=16, seed=5)
FULL_TOKEN = "full-access-token-0123456789abcdef"
ROW_TOKEN = "row-only-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    export_tables({"row": SPEC, "dim": SPEC}, root, shards=1, by="row", version="v1")
    return root


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("auth") / "tokens"
    p.write_text(f"# test tokens\n{FULL_TOKEN}\n{ROW_TOKEN} tables=row   # scoped\n")
    return p


@pytest.fixture(scope="module")
def tls_server(store, pki, in_process_shard):
    return in_process_shard(
        ServerConfig(store=store, tls_cert=pki.server_cert, tls_key=pki.server_key)
    )


@pytest.fixture(scope="module")
def mtls_server(store, pki, in_process_shard):
    return in_process_shard(
        ServerConfig(
            store=store,
            tls_cert=pki.server_cert,
            tls_key=pki.server_key,
            tls_client_ca=pki.ca,
        )
    )


@pytest.fixture(scope="module")
def auth_server(store, token_file, in_process_shard):
    return in_process_shard(ServerConfig(store=store, auth_token_file=token_file))


def expected(idx, blk, w):
    return gather_pool(SPEC.values, idx, blk, w, SPEC.expansion)


def gather_via(target: str, options: ChannelOptions, table: str = "row", timeout: float = 5.0):
    async def run():
        client = await GatherClient.connect(
            target, options=options, deadline_s=timeout, connect_timeout_s=timeout
        )
        async with client:
            idx, blk, w = random_queries(SPEC, 5, seed=11)
            return await client.gather(table, idx, blk, w), expected(idx, blk, w)

    return asyncio.run(run())


# ------------------------------------------------------------------------------------ TLS


def test_tls_client_with_the_ca_gets_correct_answers(tls_server, pki):
    got, want = gather_via(tls_server.target, ChannelOptions(tls_ca=pki.ca))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the certificate names localhost too: connect by name, verify against it
    got, _ = gather_via(f"localhost:{tls_server.port}", ChannelOptions(tls_ca=pki.ca))
    assert got.shape == want.shape


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(lambda pki: ChannelOptions(), id="plaintext-client"),
        pytest.param(lambda pki: ChannelOptions(tls_ca=pki.rogue_ca), id="untrusted-ca"),
        pytest.param(
            lambda pki: ChannelOptions(tls_ca=pki.ca, tls_server_name="evil.example"),
            id="wrong-server-name",
        ),
    ],
)
def test_tls_port_refuses_clients_that_cannot_verify_it(tls_server, pki, options):
    with pytest.raises(ShardUnavailableError):
        gather_via(tls_server.target, options(pki), timeout=2.0)


def test_mutual_tls_requires_a_client_certificate_from_the_ca(mtls_server, pki):
    ok = ChannelOptions(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    got, want = gather_via(mtls_server.target, ok)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for bad in (
        ChannelOptions(tls_ca=pki.ca),  # no client certificate
        ChannelOptions(tls_ca=pki.ca, tls_cert=pki.rogue_client_cert, tls_key=pki.rogue_client_key),
    ):
        with pytest.raises(ShardUnavailableError):
            gather_via(mtls_server.target, bad, timeout=2.0)


def test_client_options_validate_tls_files(tmp_path, pki):
    with pytest.raises(ValueError, match="together"):
        ChannelOptions(tls_cert=pki.client_cert)
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match="not PEM"):
        ChannelOptions(tls_ca=not_pem).channel_credentials()
    with pytest.raises(ValueError, match="together"):
        ServerConfig(tls_cert=pki.server_cert)
    with pytest.raises(ValueError, match="mutual TLS"):
        ServerConfig(tls_client_ca=pki.ca)


# ------------------------------------------------------------------------------------ tokens


def _request(table="row"):
    idx, blk, w = random_queries(SPEC, 2, seed=3)
    req = pb.GatherRequest(table_id=table, table_version="v1")
    encode_tensor(idx, req.indices)
    encode_tensor(blk, req.blocks)
    encode_tensor(w, req.weights)
    return req


def _call(target, token=None, table="row", raw: bytes | None = None):
    md = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as ch:
        if raw is not None:
            fn = ch.unary_unary("/ultramem.v1.GatherPool/Gather")
            return fn(raw, metadata=md, timeout=5)
        return pb_grpc.GatherPoolStub(ch).Gather(_request(table), metadata=md, timeout=5)


@pytest.mark.parametrize(
    "token,table,code",
    [
        (None, "row", grpc.StatusCode.UNAUTHENTICATED),
        ("not-a-valid-token-at-all-0000", "row", grpc.StatusCode.UNAUTHENTICATED),
        (ROW_TOKEN, "dim", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_gather_without_a_valid_token_is_refused(auth_server, token, table, code):
    with pytest.raises(grpc.RpcError) as info:
        _call(auth_server.target, token, table)
    assert info.value.code() == code
    assert "token" in info.value.details()


def test_valid_tokens_within_their_scope_are_served(auth_server):
    assert list(_call(auth_server.target, FULL_TOKEN, "dim").pooled.shape) == [2, 4, 16]
    assert list(_call(auth_server.target, ROW_TOKEN, "row").pooled.shape) == [2, 4, 16]
    with grpc.insecure_channel(auth_server.target) as ch:  # Info needs a token too
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GatherPoolStub(ch).Info(pb.InfoRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unauthenticated_bytes_are_refused_before_parsing(auth_server):
    with pytest.raises(grpc.RpcError) as info:
        _call(auth_server.target, None, raw=b"\xff\xff\xff not a protobuf")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:  # authenticated garbage: a defined status
        _call(auth_server.target, FULL_TOKEN, raw=b"\xff\xff\xff not a protobuf")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection_stay_open_without_a_token(auth_server):
    with grpc.insecure_channel(auth_server.target) as ch:
        status = (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service="ultramem.v1.GatherPool"), timeout=5)
            .status
        )
        assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        assert replies[0].list_services_response.service


def test_gather_client_sends_its_token(auth_server):
    got, want = gather_via(auth_server.target, ChannelOptions(auth_token=ROW_TOKEN))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="PERMISSION_DENIED"):
        gather_via(auth_server.target, ChannelOptions(auth_token=ROW_TOKEN), table="dim")


async def _stream(target: str, token: str | None, tables: list[str]) -> list:
    """One GatherStream with a gather per table: each reply, or the call's (code, details)."""
    md = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(target) as ch:
        call = pb_grpc.GatherPoolStub(ch).GatherStream(metadata=md)
        try:
            for i, table in enumerate(tables):
                await call.write(pb.StreamGatherRequest(request_id=i, gather=_request(table)))
            await call.done_writing()
            return [r async for r in call]
        except grpc.aio.AioRpcError as exc:
            return [(exc.code(), exc.details())]


@pytest.mark.parametrize("token", [None, "not-a-valid-token-at-all-0000"])
async def test_gather_stream_without_a_valid_token_is_refused(auth_server, token):
    # no message written: a write racing the refusal fails as INTERNAL in grpc's aio client
    ((code, details),) = await _stream(auth_server.target, token, [])
    assert code == grpc.StatusCode.UNAUTHENTICATED and "token" in details


async def test_gather_stream_applies_the_token_scope_to_every_message(auth_server):
    replies = await _stream(auth_server.target, ROW_TOKEN, ["row", "dim", "row"])
    assert [r.request_id for r in replies] == [0, 1, 2]
    assert replies[1].code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "may not read table 'dim'" in replies[1].message
    assert replies[0].code == replies[2].code == 0 and replies[0].gather == replies[2].gather
    full = await _stream(auth_server.target, FULL_TOKEN, ["dim"])
    assert full[0].code == 0 and list(full[0].gather.pooled.shape) == [2, 4, 16]


def test_token_is_never_sent_in_cleartext_off_loopback():
    with pytest.raises(ValueError, match="cleartext"):
        make_channel(["10.255.0.1:50051"], ChannelOptions(auth_token=FULL_TOKEN))
    assert "full-access" not in repr(ChannelOptions(auth_token=FULL_TOKEN))


def test_token_file_parsing(tmp_path):
    p = TokenPolicy.from_lines([FULL_TOKEN, f"{ROW_TOKEN} tables=row,mem1", "", "# c"])
    assert p.check(FULL_TOKEN).tables is None
    assert p.check(ROW_TOKEN).tables == {"row", "mem1"}
    assert p.check("x" * 40) is None and p.check(None) is None and p.check("") is None
    for bad, match in [
        (["short"], "at least 16"),
        ([FULL_TOKEN + " scope=all"], "unknown option"),
        ([FULL_TOKEN + " tables="], "bad table list"),
        ([FULL_TOKEN, FULL_TOKEN], "duplicate"),
        (["# only comments"], "accepts no token"),
    ]:
        with pytest.raises(ValueError, match=match):
            TokenPolicy.from_lines(bad)
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("x-other", "Bearer abc")]) is None


# ------------------------------------------------------------------------- TLS + token, store


def test_remote_value_store_over_mutual_tls_with_a_token(store, pki, token_file):
    shard = InProcessShard(
        ServerConfig(
            store=store,
            tls_cert=pki.server_cert,
            tls_key=pki.server_key,
            tls_client_ca=pki.ca,
            auth_token_file=token_file,
        )
    )
    try:
        opts = ChannelOptions(
            tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key, auth_token=FULL_TOKEN
        )
        idx, blk, w = random_queries(SPEC, 4, seed=9)

        class Sel:
            indices, blocks, weights = idx, blk, w

        with RemoteValueStore(shard.target, options=opts) as rvs:
            torch.testing.assert_close(
                rvs.lookup("row", Sel, timeout=10), expected(idx, blk, w), rtol=1e-5, atol=1e-6
            )
        no_token = ChannelOptions(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            RemoteValueStore(shard.target, options=no_token, connect_timeout_s=3).close()
    finally:
        shard.stop()


# ------------------------------------------------------------------------------ CLI end to end


def test_serve_shard_and_lookup_cli_with_mtls_token_and_health_port(
    store, pki, token_file, spawn_shards
):
    from conftest import free_port

    health_port = free_port()
    (proc,) = spawn_shards(
        store,
        [0],
        extra_args=[
            "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key),
            "--tls-client-ca", str(pki.ca),
            "--auth-token-file", str(token_file),
            "--health-port", str(health_port),
            "--max-concurrent-streams", "16",
            "--max-message-bytes", str(8 << 20),
        ],
    )  # fmt: skip
    assert proc.extra["tls"] is True and proc.extra["health_port"] == health_port
    client_token = token_file.parent / "client-token"
    client_token.write_text(ROW_TOKEN + "\n")
    tls = [
        "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
        "--tls-key", str(pki.client_key),
    ]  # fmt: skip
    runner = CliRunner()
    ok = runner.invoke(
        app,
        ["lookup", "--target", proc.target, "--table", "row", *tls,
         "--auth-token-file", str(client_token)],
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert '"shape": [4, 4, 16]' in ok.output
    denied = runner.invoke(app, ["lookup", "--target", proc.target, "--table", "row", *tls])
    assert denied.exit_code == 1 and "UNAUTHENTICATED" in " ".join(denied.output.split())
    info = runner.invoke(
        app, ["info", "--target", proc.target, *tls, "--auth-token-file", str(client_token)]
    )
    assert info.exit_code == 0 and '"table_version": "v1"' in info.output
    # kubelet-style plaintext probe on the health-only port (the TLS port refuses plaintext)
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:  # only health lives on that port
            pb_grpc.GatherPoolStub(ch).Info(pb.InfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_serve_shard_refuses_unreadable_tls_and_token_files(store, tmp_path, pki):
    runner = CliRunner()
    missing = tmp_path / "missing.pem"
    res = runner.invoke(
        app,
        ["serve-shard", str(store), "--shard", "0",
         "--tls-cert", str(missing), "--tls-key", str(pki.server_key)],
    )  # fmt: skip
    assert res.exit_code == 2 and "refusing to serve" in res.output
    weak = tmp_path / "weak-tokens"
    weak.write_text("abc\n")
    res = runner.invoke(
        app, ["serve-shard", str(store), "--shard", "0", "--auth-token-file", str(weak)]
    )
    assert res.exit_code == 2 and "at least 16" in " ".join(res.output.split())
