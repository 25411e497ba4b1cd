"""Optional API keys (`COSYVOICE_API_KEY`, several comma-separated): gRPC metadata `authorization: Bearer <key>`
and HTTP `Authorization: Bearer <key>` (what the OpenAI client sends as its api_key). No keys = open.

Health (gRPC `grpc.health.v1.Health`, HTTP `/healthz`, `/livez`, `/readyz`), reflection and `/metrics` stay open
so probes and scrapers need no secret. A missing or wrong key is UNAUTHENTICATED / 401."""
from __future__ import annotations

import hmac
import json
from collections.abc import Sequence

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

API_KEY_ENV = "COSYVOICE_API_KEY"
PROTECTED_GRPC_PREFIX = "/cosyvoice.v1.TextToSpeech/"
PROTECTED_HTTP_PREFIX = "/v1/"
_BEARER = "bearer "


def authorized(header: str | None, keys: Sequence[str]) -> bool:
    """Whether an `authorization` value carries one of `keys` (constant-time comparison per key)."""
    if not keys:
        return True
    if not header or not header.lower().startswith(_BEARER):
        return False
    given = header[len(_BEARER):].strip().encode()
    return any(hmac.compare_digest(given, key.encode()) for key in keys)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to cosyvoice.v1.TextToSpeech without a valid bearer key; other services pass."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_GRPC_PREFIX):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if authorized(metadata.get("authorization"), self.keys):
            return handler
        message = "missing or invalid API key (metadata authorization: Bearer <key>)"

        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - abort raises

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny_unary, handler.request_deserializer,
                                                   handler.response_serializer)


class HttpApiKey:
    """ASGI middleware: `/v1/...` needs `Authorization: Bearer <key>` when keys are set, else 401."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = tuple(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not scope.get("path", "").startswith(PROTECTED_HTTP_PREFIX):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        if authorized(header, self.keys):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": {"message": "missing or invalid API key (Authorization: Bearer <key>)",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
