"""Shared-secret authentication for every gRPC service of the system (client API and chunk transfer alike).

Server side: `TokenAuthInterceptor(token)` (or `AioTokenAuthInterceptor` for grpc.aio servers) rejects any call
whose `authorization` metadata is not `Bearer <token>` with UNAUTHENTICATED, comparing in constant time.
Client side: `secure_channel_credentials` / `token_call_credentials` attach the token over TLS; over plaintext
(loopback, tests) `TokenClientInterceptor` adds the same header, since gRPC refuses call credentials without TLS.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable

import grpc

AUTH_HEADER = "authorization"


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def token_matches(metadata: Iterable[tuple[str, str | bytes]] | None, token: str) -> bool:
    """True when the metadata carries `authorization: Bearer <token>`; constant time in the token's content."""
    expected = bearer(token).encode()
    ok = False
    for key, value in metadata or ():
        if key.lower() == AUTH_HEADER:
            got = value if isinstance(value, bytes) else str(value).encode()
            ok |= hmac.compare_digest(got, expected)
    return ok


def _abort_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails the call with UNAUTHENTICATED."""

    def deny(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid authorization token")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer)


def _aio_abort_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid authorization token")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Require the shared token on every method (`open_methods`: full method names exempted, e.g. probes)."""

    def __init__(self, token: str, open_methods: Iterable[str] = ()) -> None:
        if not token:
            raise ValueError("an empty token would let every caller in")
        self._token = token
        self._open = frozenset(open_methods)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._open:
            return handler
        if token_matches(handler_call_details.invocation_metadata, self._token):
            return handler
        return _abort_handler(handler)


class AioTokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """The same check for grpc.aio servers."""

    def __init__(self, token: str, open_methods: Iterable[str] = ()) -> None:
        if not token:
            raise ValueError("an empty token would let every caller in")
        self._token = token
        self._open = frozenset(open_methods)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._open:
            return handler
        if token_matches(handler_call_details.invocation_metadata, self._token):
            return handler
        return _aio_abort_handler(handler)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class TokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a (plaintext) sync channel."""

    def __init__(self, token: str) -> None:
        self._header = (AUTH_HEADER, bearer(token))

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _ClientCallDetails(details, [*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def token_metadata(token: str | None) -> list[tuple[str, str]]:
    """Metadata to pass per call where interceptors do not fit (e.g. grpc.aio plaintext channels)."""
    return [(AUTH_HEADER, bearer(token))] if token else []


def token_call_credentials(token: str) -> grpc.CallCredentials:
    """Per-call credentials carrying the token (only sent over TLS or local credentials)."""
    return grpc.access_token_call_credentials(token)


def secure_channel_credentials(root_certificates: bytes | None, token: str | None) -> grpc.ChannelCredentials:
    """TLS trusting `root_certificates` (None: the system roots), plus the token on every call when given."""
    creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    if token:
        creds = grpc.composite_channel_credentials(creds, token_call_credentials(token))
    return creds


def make_channel(
    target: str, token: str | None = None, root_certificates: bytes | None = None, options: list | None = None
) -> grpc.Channel:
    """A sync channel to `target` that authenticates every call: TLS when `root_certificates` is given."""
    if root_certificates is not None:
        return grpc.secure_channel(target, secure_channel_credentials(root_certificates, token), options=options)
    channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, TokenClientInterceptor(token)) if token else channel


def server_credentials(cert_chain: bytes, private_key: bytes) -> grpc.ServerCredentials:
    """TLS server credentials from PEM bytes (no client certificates required: the token authenticates)."""
    return grpc.ssl_server_credentials([(private_key, cert_chain)])
