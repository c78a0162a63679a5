"""Transport security and access control of a shard server.

* **TLS / mutual TLS** — :func:`server_credentials` builds the credentials of the gRPC port from
  PEM files; with a client CA every caller must present a certificate signed by it.
* **Bearer tokens** — :class:`TokenPolicy` reads a token file and :class:`BearerTokenInterceptor`
  checks the ``authorization: Bearer <token>`` metadata of every call to the GatherPool service:
  missing or unknown token -> ``UNAUTHENTICATED``; a valid token whose scope does not include the
  requested table -> ``PERMISSION_DENIED``. ``grpc.health.v1.Health`` and server reflection stay
  open on purpose (load-balancer and kubelet probes carry no credentials; reflection only
  describes the public ``ultramem.v1`` schema). An unauthenticated request is never parsed.
* **Hardened decoding** — :func:`add_hardened_gather_pool` registers the GatherPool methods with
  deserializers that turn undecodable bytes into ``INVALID_ARGUMENT`` (gRPC's default answers
  ``UNKNOWN`` with the Python exception text).

Token file format (UTF-8, one grant per line; ``#`` starts a comment)::

    # token                       [tables=ID,ID,...]
    3f9c1e...long-random-token...                       # may call every table
    a81d07...another-token...      tables=mem0,mem1     # may call only mem0 and mem1

Tokens must be at least :data:`MIN_TOKEN_CHARS` characters of ``[A-Za-z0-9._~+/=-]``; they are
compared in constant time (through their SHA-256 digests) and never logged.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ultramem_dist._private.pem import read_pem
from ultramem_dist.proto.ultramem.v1 import gather_pb2 as pb
from ultramem_dist.proto.ultramem.v1 import gather_pb2_grpc as pb_grpc

__all__ = [
    "AUTH_HEADER",
    "MIN_TOKEN_CHARS",
    "PROTECTED_SERVICE",
    "TABLE_SCOPE",
    "BearerTokenInterceptor",
    "TokenGrant",
    "TokenPolicy",
    "add_hardened_gather_pool",
    "read_gather_leniently",
    "read_leniently",
    "serialize_reply",
    "scope_refusal",
    "read_pem",
    "server_credentials",
]

AUTH_HEADER = "authorization"
PROTECTED_SERVICE = pb.DESCRIPTOR.services_by_name["GatherPool"].full_name
MIN_TOKEN_CHARS = 16
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
_TABLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# ----------------------------------------------------------------------------------------- TLS


def server_credentials(
    cert: str | Path, key: str | Path, client_ca: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials of the gRPC port; with ``client_ca`` clients must present a certificate
    signed by that CA (mutual TLS), otherwise the handshake fails."""
    chain = read_pem(cert, "TLS certificate")
    private = read_pem(key, "TLS private key")
    ca = read_pem(client_ca, "client CA") if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(private, chain)], root_certificates=ca, require_client_auth=ca is not None
    )


# --------------------------------------------------------------------------------- tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenGrant:
    """One accepted token (by digest) and the tables it may call (``None`` = all)."""

    digest: bytes
    tables: frozenset[str] | None
    line: int

    def allows(self, table_id: str) -> bool:
        return self.tables is None or table_id in self.tables


class TokenPolicy:
    """The set of accepted bearer tokens (see the module docstring for the file format)."""

    def __init__(self, grants: Iterable[TokenGrant]) -> None:
        self.grants = tuple(grants)
        if not self.grants:
            raise ValueError("the token policy accepts no token (empty token file?)")

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "token file") -> TokenPolicy:
        grants: list[TokenGrant] = []
        seen: set[bytes] = set()
        for n, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            token, *rest = line.split()
            if len(token) < MIN_TOKEN_CHARS or not _TOKEN_RE.match(token):
                raise ValueError(
                    f"{source} line {n}: a token must be at least {MIN_TOKEN_CHARS} characters "
                    "of [A-Za-z0-9._~+/=-]"
                )
            tables: frozenset[str] | None = None
            for opt in rest:
                name, sep, value = opt.partition("=")
                if name != "tables" or not sep:
                    raise ValueError(f"{source} line {n}: unknown option {opt!r}; expected tables=")
                ids = [t for t in value.split(",") if t]
                if not ids or not all(_TABLE_RE.match(t) for t in ids):
                    raise ValueError(f"{source} line {n}: bad table list {value!r}")
                tables = frozenset(ids) | (tables or frozenset())
            digest = _digest(token)
            if digest in seen:
                raise ValueError(f"{source} line {n}: duplicate token")
            seen.add(digest)
            grants.append(TokenGrant(digest, tables, n))
        return cls(grants)

    @classmethod
    def from_file(cls, path: str | Path) -> TokenPolicy:
        p = Path(path)
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the auth token file {p}: {exc}") from None
        return cls.from_lines(text.splitlines(), source=str(p))

    def check(self, token: str | None) -> TokenGrant | None:
        """The grant of ``token`` or ``None``; every grant is compared (no early exit)."""
        if not token:
            return None
        digest = _digest(token)
        found = None
        for g in self.grants:
            if hmac.compare_digest(g.digest, digest):
                found = g
        return found


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, if present."""
    for item in metadata or ():
        key, value = item[0], item[1]
        if key.lower() != AUTH_HEADER:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


#: Tables the caller of the current RPC may read (``None``: all). Set by
#: :class:`BearerTokenInterceptor` around a ``GatherStream``, whose servicer checks every message.
TABLE_SCOPE: contextvars.ContextVar[Collection[str] | None] = contextvars.ContextVar(
    "ultramem_table_scope", default=None
)


def scope_refusal(tables: Collection[str] | None, table_id: object) -> str | None:
    """Why a caller whose token grants ``tables`` (``None``: all) may not read ``table_id``, or
    ``None`` if it may. Shared by the unary ``Gather`` and every ``GatherStream`` message."""
    if tables is None or not isinstance(table_id, str) or table_id in tables:
        return None
    return f"this token may not read table {table_id!r}"


def _ignore_body(_: bytes) -> None:
    return None


def _refusal(code: grpc.StatusCode, message: str, streaming: bool = False) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    # The request bytes of a refused caller are never parsed.
    if streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, request_deserializer=_ignore_body)
    return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=_ignore_body)


def _scoped_stream(inner: Callable[..., Any], tables: frozenset[str]) -> Callable[..., Any]:
    """A stream handler that runs ``inner`` with :data:`TABLE_SCOPE` = ``tables``: the servicer
    refuses each message for another table with PERMISSION_DENIED (the stream goes on)."""

    async def scoped(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        token = TABLE_SCOPE.set(tables)
        try:
            return await inner(request_iterator, context)
        finally:
            TABLE_SCOPE.reset(token)

    return scoped


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Require a valid bearer token for every method of ``protected`` services."""

    def __init__(
        self, policy: TokenPolicy, protected: Iterable[str] = (PROTECTED_SERVICE,)
    ) -> None:
        self.policy = policy
        self.protected = frozenset(protected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        service = method.strip("/").split("/", 1)[0]
        if service not in self.protected:
            return await continuation(handler_call_details)
        grant = self.policy.check(bearer_token(handler_call_details.invocation_metadata))
        if grant is None:
            return _refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token (send 'authorization: Bearer <token>')",
                streaming=method.endswith("/GatherStream"),
            )
        handler = await continuation(handler_call_details)
        if grant.tables is None or handler is None:
            return handler
        tables = frozenset(grant.tables)
        if method.endswith("/GatherStream") and handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _scoped_stream(handler.stream_stream, tables),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if not method.endswith("/Gather") or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def scoped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refusal = scope_refusal(tables, getattr(request, "table_id", None))
            if refusal is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            scoped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


# ------------------------------------------------------------------------ hardened decoding


class _Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf raises DecodeError; be defensive about the rest
            return _Undecodable(type(exc).__name__)

    return deserialize


read_leniently = _lenient(pb.StreamGatherRequest.FromString)
"""A stream message as the generated code reads it, or the stand-in for undecodable bytes."""
read_gather_leniently = _lenient(pb.GatherRequest.FromString)
"""The same for a unary ``Gather``'s request."""


def _guarded(
    method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], message_name: str
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if type(request) is _Undecodable:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request is not a valid ultramem.v1.{message_name} protobuf message",
            )
        return await method(request, context)

    return behaviour


def serialize_reply(reply: bytes | pb.GatherReply | pb.StreamGatherReply) -> bytes:
    """The gathers' response serializer: a fast-path reply is already its bytes."""
    return reply if type(reply) is bytes else reply.SerializeToString()


def add_hardened_gather_pool(servicer: Any, server: grpc.aio.Server) -> None:
    """Like the generated ``add_GatherPoolServicer_to_server``, but undecodable request bytes
    are answered with ``INVALID_ARGUMENT`` (never ``UNKNOWN``). ``GatherStream`` is served only
    by servicers that implement it; others answer it with ``UNIMPLEMENTED``."""
    handlers = {
        "Gather": grpc.unary_unary_rpc_method_handler(
            _guarded(servicer.Gather, "GatherRequest"),
            request_deserializer=getattr(servicer, "read_gather_message", read_gather_leniently),
            response_serializer=serialize_reply,
        ),
        # the servicer ends a stream with INVALID_ARGUMENT at an undecodable message; a
        # servicer may read messages itself (the shard's fast path: serving/wire.py)
        "GatherStream": grpc.stream_stream_rpc_method_handler(
            servicer.GatherStream,
            request_deserializer=getattr(servicer, "read_stream_message", read_leniently),
            response_serializer=serialize_reply,
        ),
        "Info": grpc.unary_unary_rpc_method_handler(
            _guarded(servicer.Info, "InfoRequest"),
            request_deserializer=_lenient(pb.InfoRequest.FromString),
            response_serializer=pb.InfoReply.SerializeToString,
        ),
    }
    if type(servicer).GatherStream is pb_grpc.GatherPoolServicer.GatherStream:
        del handlers["GatherStream"]  # the generated placeholder: let gRPC say UNIMPLEMENTED
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(PROTECTED_SERVICE, handlers),)
    )
    server.add_registered_method_handlers(PROTECTED_SERVICE, handlers)
