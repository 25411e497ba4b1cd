"""Admission control and per-request deadlines, for gRPC and HTTP alike.

`Admission` bounds the synthesis/registration requests in flight in one gateway process (`MAX_INFLIGHT_REQUESTS`):
one more is refused at once (a counter check, no queue) with RESOURCE_EXHAUSTED / HTTP 429 and a retry hint
(gRPC trailing metadata `retry-after`, HTTP `Retry-After`, seconds). Cheap calls (list, delete, health) are not
counted.

A request's deadline (the gRPC client's, capped by `REQUEST_TIMEOUT_S`; HTTP: `REQUEST_TIMEOUT_S`) is held in
a context variable for the request's task and the tasks it starts; every stage call takes the time left as its
own timeout (`cosyvoice_gateway.stage_client`), and one that starts past the deadline fails as DEADLINE_EXCEEDED.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import time

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

# Monotonic time (s) by which the current request must be answered; None = no deadline.
DEADLINE_S: contextvars.ContextVar[float | None] = contextvars.ContextVar("cosyvoice_deadline_s", default=None)

GUARDED_GRPC_METHODS = frozenset(f"/cosyvoice.v1.TextToSpeech/{m}"
                                 for m in ("Synthesize", "SynthesizeStream", "RegisterSpeaker"))
GUARDED_HTTP = frozenset((("POST", "/v1/audio/speech"), ("POST", "/v1/audio/voices")))


def time_left_s() -> float | None:
    """Seconds until the current request's deadline (may be <= 0), or None without one."""
    deadline = DEADLINE_S.get()
    return None if deadline is None else deadline - time.monotonic()


def deadline_after(timeout_s: float | None, request_timeout_s: float) -> float | None:
    """The deadline of a request whose client allows `timeout_s` (None = no limit), capped by the gateway's
    `request_timeout_s` (0 = none)."""
    limits = [t for t in (timeout_s, request_timeout_s or None) if t is not None]
    return time.monotonic() + min(limits) if limits else None


class Admission:
    """At most `limit` requests in flight (0 = unbounded); single event loop, so a plain counter."""

    def __init__(self, limit: int, retry_after_s: float = 1.0) -> None:
        if limit < 0 or retry_after_s <= 0:
            raise ValueError(f"bad admission settings: limit {limit}, retry_after_s {retry_after_s}")
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.inflight = 0

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))

    def try_enter(self) -> bool:
        if self.limit and self.inflight >= self.limit:
            return False
        self.inflight += 1
        return True

    def leave(self) -> None:
        self.inflight -= 1

    def message(self) -> str:
        return f"gateway is at its limit of {self.limit} requests in flight; retry after {self.retry_after_header} s"


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Counts guarded RPCs against `admission` and sets their deadline for the stage calls."""

    def __init__(self, admission: Admission, request_timeout_s: float = 0.0) -> None:
        self.admission = admission
        self.request_timeout_s = request_timeout_s

    async def _refuse(self, context) -> None:
        context.set_trailing_metadata((("retry-after", self.admission.retry_after_header),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.admission.message())

    def _enter(self, context) -> None:
        DEADLINE_S.set(deadline_after(context.time_remaining(), self.request_timeout_s))

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method not in GUARDED_GRPC_METHODS:
            return handler
        admission = self.admission
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                if not admission.try_enter():
                    await self._refuse(context)
                try:
                    self._enter(context)
                    async with contextlib.aclosing(inner_stream(request, context)) as responses:
                        async for response in responses:
                            yield response
                finally:
                    admission.leave()
            return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                        handler.response_serializer)
        inner_unary = handler.unary_unary

        async def unary(request, context):
            if not admission.try_enter():
                await self._refuse(context)
            try:
                self._enter(context)
                return await inner_unary(request, context)
            finally:
                admission.leave()
        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)


class HttpAdmission:
    """ASGI middleware: guarded routes count against `admission` (429 + Retry-After when full) and get the
    gateway's request deadline."""

    def __init__(self, app: ASGIApp, admission: Admission, request_timeout_s: float = 0.0) -> None:
        self.app = app
        self.admission = admission
        self.request_timeout_s = request_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("method"), scope.get("path")) not in GUARDED_HTTP:
            await self.app(scope, receive, send)
            return
        if not self.admission.try_enter():
            body = json.dumps({"error": {"message": self.admission.message(), "type": "rate_limit_error",
                                         "param": None, "code": "resource_exhausted"}}).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", self.admission.retry_after_header.encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        token = DEADLINE_S.set(deadline_after(None, self.request_timeout_s))
        try:
            await self.app(scope, receive, send)
        finally:
            DEADLINE_S.reset(token)
            self.admission.leave()
