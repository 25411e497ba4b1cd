"""HTTP front end of the gateway: OpenAI-compatible speech, the voice registry, health and metrics.

Served by the gateway process on HTTP_PORT, in the same asyncio loop as gRPC and over the same
`Pipeline` (stage clients, spk2info cache, named-voice registry in Redis), so a voice registered
through gRPC `RegisterSpeaker` is usable here and the other way round.

    GET    /                         the playground page (static; talks to the API below from the browser)
    POST   /v1/audio/speech          OpenAI `audio.speech.create` (+ our extras, see SpeechRequest)
    GET    /v1/audio/voices          registered voices
    POST   /v1/audio/voices          multipart: name, audio (file), prompt_text
    DELETE /v1/audio/voices/{name}
    GET    /v1/models                the one model (and whether its weights are random), for clients that list
                                     models first
    GET    /healthz                  200 once every stage has a ready replica, else 503
    GET    /metrics                  Prometheus text of the gateway's registry

Errors are JSON in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx
status mapped from the pipeline's gRPC status; never a traceback.

Streaming follows OpenAI's endpoint: the body streams by default for every format whose encoder can stream
(pcm, wav = a header of unknown length then PCM, mp3, opus, aac: encoded incrementally, `encoding.StreamEncoder`),
each chunk sent as soon as the pipeline produces it; `stream_format: "sse"` sends OpenAI's `speech.audio.delta`
events and a final `speech.audio.done` (with our per-stage timings beside OpenAI's usage). What cannot stream is
served whole, not refused: flac, a `speed` other than 1 (CosyVoice2 stretches the whole utterance's mel), or our
`stream: false` extra. Headers go out with the first chunk, so a request that fails before any audio still gets
its 4xx/5xx; a failure after that cuts the stream. A client that disconnects (streaming or not) cancels the
request's stage work.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import grpc
import numpy as np
from cosyvoice_common.audio import PROMPT_MAX_BYTES
from cosyvoice_common.constants import OUTPUT_SAMPLE_RATE_HZ, SUPPORTED_OUTPUT_RATES_HZ
from cosyvoice_common.stages import DEFAULT_SPEAKER_ID
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from cosyvoice_common.constants import SPEED_NEUTRAL
from cosyvoice_gateway import metrics
from cosyvoice_gateway.admission import Admission, HttpAdmission
from cosyvoice_gateway.auth import HttpApiKey
from cosyvoice_gateway.encoding import CODECS, StreamEncoder, check_rate, codec_formats_available, encode_whole
from cosyvoice_gateway.guards import BodyLimit
from cosyvoice_gateway.pipeline import (
    Pipeline,
    RequestError,
    StageTimings,
    SynthesisRequest,
    stage_error_to_request_error,
)
from cosyvoice_gateway.spk2info import RegistryUnavailableError, SpeakerInfo
from cosyvoice_gateway.stage_client import MS_PER_S, StageError

log = logging.getLogger("cosyvoice_gateway.http")

T = TypeVar("T")

MODEL_ID = "cosyvoice2"
MODEL_OWNER = "FunAudioLLM"
# OpenAI's response_format names -> encodings (cosyvoice_common.audio, encoding.CODECS), and the Content-Type of each.
RESPONSE_FORMATS = {"wav": "wav", "pcm": "pcm_s16le", "flac": "flac", "mp3": "mp3", "opus": "opus", "aac": "aac"}
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg; codecs=opus", "aac": "audio/aac"}
# Formats whose bytes can be sent chunk by chunk as produced; flac (libsndfile) is written whole.
STREAMABLE_FORMATS = ("pcm", "wav", "mp3", "opus", "aac")
STREAM_FORMATS = ("audio", "sse")
SSE_MEDIA_TYPE = "text/event-stream"
PLAYGROUND_FILE = "static/playground.html"      # package data of cosyvoice_gateway, served at /
# OpenAI's built-in voice names; one not registered here speaks with HttpConfig.openai_voice.
OPENAI_VOICES = frozenset(("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer",
                           "verse"))
# OpenAI's default is mp3; a process without PyAV's MP3 encoder falls back to wav.
OPENAI_DEFAULT_FORMAT = "mp3"
FALLBACK_FORMAT = "wav"
_DISCONNECT = "http.disconnect"
BODY_OVERHEAD_BYTES = 1 << 20     # request body beyond the upload bound: form fields, JSON text

# gRPC status of a pipeline error -> HTTP status and OpenAI error type.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
_INTERNAL = (500, "server_error")


def _soundfile_formats() -> frozenset[str]:
    try:
        import soundfile as sf
    except (ImportError, OSError):
        return frozenset()
    return frozenset(sf.available_formats())


def _available_formats() -> tuple[str, ...]:
    """response_format values this process can produce (flac needs libsndfile's FLAC, mp3/opus/aac PyAV's
    encoders)."""
    missing = {f for f in CODECS if f not in codec_formats_available()}
    if "FLAC" not in _soundfile_formats():
        missing.add("flac")
    return tuple(f for f in RESPONSE_FORMATS if f not in missing)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    max_upload_bytes: int = PROMPT_MAX_BYTES    # a 30 s prompt is ~3 MB as 48 kHz 16-bit WAV
    default_response_format: str = ""           # "" = OpenAI's mp3 when libsndfile has it, else wav
    formats: tuple[str, ...] = ()               # () = every format libsndfile and PyAV can write here
    api_keys: tuple[str, ...] = ()              # the gateway's COSYVOICE_API_KEY; empty = open
    openai_voice: str = DEFAULT_SPEAKER_ID      # the voice OpenAI's names (alloy, ...) speak with
    cors_allow_origins: tuple[str, ...] = ()    # browser origins allowed to call the API; () = CORS off
    model_notice: str = ""                      # said on /v1/models and the playground (random weights)

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise ValueError(f"bad max_upload_bytes {self.max_upload_bytes}")
        formats = self.formats or _available_formats()
        object.__setattr__(self, "formats", formats)
        default = self.default_response_format or (
            OPENAI_DEFAULT_FORMAT if OPENAI_DEFAULT_FORMAT in formats else FALLBACK_FORMAT)
        if default not in formats:
            raise ValueError(f"default response format {default!r} not in {formats}")
        object.__setattr__(self, "default_response_format", default)


class SpeechRequest(BaseModel):
    """OpenAI `POST /v1/audio/speech` body, plus our extras (all optional; 0 = model default)."""
    model_config = ConfigDict(extra="forbid")   # a misspelt extra gets a 400 naming it, not silence

    model: str
    input: str
    voice: str = ""                             # a registered voice (POST /v1/audio/voices or gRPC)
    response_format: str | None = None
    speed: float = SPEED_NEUTRAL               # [MIN_SPEED, MAX_SPEED]; not 1 = served whole (the reference's speed)
    instructions: str = ""                      # OpenAI's voice instructions -> CosyVoice2 instruct2 mode
    stream_format: str = "audio"                # "audio" = raw bytes; "sse" = OpenAI's speech.audio.delta events
    stream: bool | None = None                  # extra: unset/true = stream when the format can; false = whole
    ref_audio: str = ""                         # in-request cloning: base64 (or a data: URL) of a prompt file
    ref_text: str = ""                          # its transcript (empty = cross-lingual)
    # --- extras ---
    sample_rate: int = 0                        # 0 = 24000; 8000/16000/22050/24000/44100/48000
    seed: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_speech_tokens: int = 0
    max_speech_tokens: int = 0
    text_frontend: bool = True                  # spec 2.2 normalisation + splitting of `input` (the pipeline's)
    request_id: str = ""


# --- errors -------------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param, self.code = status, message, error_type, param, code


def _error_response(status: int, message: str, error_type: str, param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": error_type, "param": param, "code": code}},
                        status_code=status)


def _api_error(exc: Exception) -> ApiError:
    """Any error the pipeline raises, as the HTTP error clients see (message kept, status mapped)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StageError):
        exc = stage_error_to_request_error(exc)
    if isinstance(exc, RegistryUnavailableError):
        exc = RequestError(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, RequestError):
        status, error_type = _HTTP_STATUS.get(exc.code, _INTERNAL)
        return ApiError(status, exc.message, error_type, code=exc.code.name.lower())
    return ApiError(_INTERNAL[0], "internal error", _INTERNAL[1], code="internal")


def _metric_code(error: ApiError) -> str:
    return (error.code or f"http_{error.status}").upper()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = param or (".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


# --- disconnect-aware execution -----------------------------------------------------------------------------
async def _wait_disconnect(receive: Receive) -> None:
    """Return when the client goes away (the request body has already been read by then)."""
    while (await receive())["type"] != _DISCONNECT:
        pass


async def run_unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so its stage calls) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ApiError(499, "client disconnected", "cancelled", code="cancelled")
        return task.result()
    finally:
        watcher.cancel()
        if not task.done():                 # our own caller was cancelled
            task.cancel()


class AudioStreamResponse(StreamingResponse):
    """Streams `chunks` as they come; a client disconnect closes the generator (stopping stage work) even
    while it waits for the next chunk, instead of only noticing at the next write. The status line waits for the
    first chunk (no byte could go out earlier anyway), so a failure before it is still an HTTP error."""

    def __init__(self, chunks: AsyncIterator[bytes], media_type: str, headers: dict[str, str],
                 on_done: Callable[[str], None]) -> None:
        super().__init__(chunks, media_type=media_type, headers=headers)   # chunked: no Content-Length
        self.chunks = chunks
        self.on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = asyncio.ensure_future(_wait_disconnect(receive))
        outcome = "OK"
        started = False
        try:
            iterator = aiter(self.chunks)
            while True:
                step = asyncio.ensure_future(anext(iterator))
                await asyncio.wait({step, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()               # CancelledError inside the pipeline: the LLM stream stops
                    await asyncio.gather(step, return_exceptions=True)
                    outcome = "CANCELLED"
                    return
                try:
                    chunk = step.result()
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    error = _api_error(exc)
                    outcome = _metric_code(error)
                    if not started:
                        await _error_response(error.status, error.message, error.error_type, error.param,
                                              error.code)(scope, receive, send)
                        return
                    # headers are out: the only honest signal left is a cut stream
                    log.warning("http stream failed after the first byte: %s", exc)
                    return
                if not started:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
                    started = True
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not started:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:                         # the socket went away mid-write
            outcome = "CANCELLED"
        finally:
            disconnected.cancel()
            await self.chunks.aclose()          # type: ignore[attr-defined]
            self.on_done(outcome)


# --- the app ------------------------------------------------------------------------------------------------
def _voice_json(info: SpeakerInfo) -> dict[str, Any]:
    return {"id": info.speaker_id, "object": "voice", "name": info.speaker_id, "prompt_text": info.prompt_text,
            "prompt_speech_tokens": info.prompt_speech_tokens, "prompt_seconds": info.prompt_seconds}


def build_app(pipeline: Pipeline, is_ready: Callable[[], bool], config: HttpConfig | None = None,
              admission: Admission | None = None, request_timeout_s: float = 0.0) -> FastAPI:
    """The HTTP app over a shared pipeline; `is_ready()` gates /healthz (the gateway's stage readiness)."""
    config = config or HttpConfig()
    playground_html = resources.files("cosyvoice_gateway").joinpath(PLAYGROUND_FILE).read_text(encoding="utf-8")
    app = FastAPI(title="CosyVoice2 gateway", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    # A body is the upload plus a little form/JSON around it; anything beyond is refused unparsed.
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes + BODY_OVERHEAD_BYTES)
    if admission is not None:      # the gateway's, shared with gRPC
        app.add_middleware(HttpAdmission, admission=admission, request_timeout_s=request_timeout_s)
    app.add_middleware(HttpApiKey, keys=config.api_keys)     # no key, no body read
    if config.cors_allow_origins:     # outermost: a preflight (no Authorization header) is answered here
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["authorization", "content-type"],
                           expose_headers=["x-sample-rate", "x-request-id"])

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.error_type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("http %s %s failed", request.method, request.url.path)
        return _error_response(_INTERNAL[0], "internal error", _INTERNAL[1])

    def finish(route: str, request_id: str, code: str, timings: StageTimings) -> None:
        metrics.REQUESTS.labels(rpc=route, code=code).inc()
        if code == "OK":
            metrics.REQUEST_LATENCY.labels(rpc=route).observe(timings.total_ms / MS_PER_S)
            if timings.first_chunk_ms:
                metrics.FIRST_CHUNK.observe(timings.first_chunk_ms / MS_PER_S)
        log.info("http=%s request_id=%s status=%s tokens=%d audio_s=%.2f first_chunk_ms=%.1f total_ms=%.1f "
                 "cache_hit=%s", route, request_id, code, timings.speech_tokens, timings.audio_seconds,
                 timings.first_chunk_ms, timings.elapsed_ms(), timings.cache_hit)

    def to_request(body: SpeechRequest) -> SynthesisRequest:
        return SynthesisRequest(
            text=body.input, speaker_id=body.voice, instruct=body.instructions, sample_rate_hz=body.sample_rate,
            request_id=body.request_id, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            seed=body.seed, min_speech_tokens=body.min_speech_tokens, max_speech_tokens=body.max_speech_tokens,
            text_frontend=body.text_frontend, speed=body.speed)

    async def voice_fields(body: SpeechRequest) -> dict[str, Any]:
        """The voice: `ref_audio` (+ `ref_text`) cloned in-request (OpenAI clients always send a `voice` too; the
        reference audio wins); else the named voice, where an OpenAI voice
        name that is not registered speaks with `config.openai_voice`."""
        if body.ref_audio:
            encoded = body.ref_audio.split(",", 1)[1] if body.ref_audio.startswith("data:") else body.ref_audio
            if len(encoded) > (config.max_upload_bytes * 4) // 3 + 4:
                raise ApiError(413, f"ref_audio is larger than {config.max_upload_bytes} bytes", param="ref_audio")
            try:
                audio = base64.b64decode(encoded, validate=True)
            except ValueError as exc:
                raise ApiError(400, "ref_audio is not valid base64", param="ref_audio") from exc
            return {"speaker_id": "", "prompt_audio": audio, "prompt_text": body.ref_text}
        if body.voice in OPENAI_VOICES:
            try:
                registered = await pipeline.cache.get_speaker(body.voice)
            except RegistryUnavailableError as exc:
                raise _api_error(exc) from exc
            if registered is None:
                return {"speaker_id": config.openai_voice}
        return {}

    def check_speech(body: SpeechRequest) -> tuple[str, bool]:
        """The format and whether the audio streams (else: the whole utterance, then sent), or a 400."""
        fmt = body.response_format or config.default_response_format
        if fmt not in config.formats:
            raise ApiError(400, f"response_format {fmt!r} is not supported; use one of {list(config.formats)}",
                           param="response_format")
        if body.stream_format not in STREAM_FORMATS:
            raise ApiError(400, f"stream_format {body.stream_format!r} is not supported; use one of "
                           f"{list(STREAM_FORMATS)}", param="stream_format")
        if body.stream_format == "sse" and body.stream is False:
            raise ApiError(400, "stream_format 'sse' is a stream of events; drop stream: false or use "
                           "stream_format 'audio'", param="stream")
        rate_hz = body.sample_rate or OUTPUT_SAMPLE_RATE_HZ
        if rate_hz in SUPPORTED_OUTPUT_RATES_HZ:       # other rates: the pipeline's own message
            try:
                check_rate(fmt, rate_hz)
            except ValueError as exc:
                raise ApiError(400, str(exc), param="sample_rate") from exc
        if not body.voice and not body.ref_audio:
            raise ApiError(400, "voice is empty: give a registered voice (GET /v1/audio/voices) or ref_audio",
                           param="voice")
        # speed != 1 stretches the whole utterance's mel (the reference's offline-only speed): served whole.
        streamed = fmt in STREAMABLE_FORMATS and body.stream is not False and body.speed == SPEED_NEUTRAL
        return fmt, streamed

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest, request: Request) -> Response:
        timings = StageTimings()
        route = "http.speech"
        try:
            fmt, streamed = check_speech(body)
            route = "http.speech.stream" if streamed else route
            synthesis = dataclasses.replace(to_request(body), **await voice_fields(body))
            prepared = await run_unless_disconnected(request.receive, pipeline.prepare(synthesis, timings))
        except Exception as exc:
            error = _api_error(exc)
            finish(route, body.request_id, _metric_code(error), timings)
            raise error from exc
        headers = {"X-Sample-Rate": str(prepared.sample_rate_hz), "X-Request-Id": prepared.request_id}
        sse = body.stream_format == "sse"
        usage = _Usage(pipeline.count_tokens(body.input), timings) if sse else None
        if streamed:
            chunks = _encoded_stream(pipeline, prepared, timings, fmt)
            return AudioStreamResponse(_sse_events(chunks, usage) if sse else chunks,
                                       SSE_MEDIA_TYPE if sse else MEDIA_TYPES[fmt], headers,
                                       lambda code: finish(route, prepared.request_id, code, timings))
        try:
            wav = await run_unless_disconnected(request.receive, pipeline.synthesize(prepared, timings))
            audio = await asyncio.to_thread(encode_whole, wav, prepared.sample_rate_hz, RESPONSE_FORMATS[fmt])
        except ValueError as exc:               # a codec/rate pair the encoder refuses
            finish(route, prepared.request_id, "INVALID_ARGUMENT", timings)
            raise ApiError(400, str(exc), param="sample_rate") from exc
        except Exception as exc:
            error = _api_error(exc)
            finish(route, prepared.request_id, _metric_code(error), timings)
            raise error from exc
        finish(route, prepared.request_id, "OK", timings)
        if sse:
            return Response(_sse_delta(audio) + _sse_done(usage), media_type=SSE_MEDIA_TYPE, headers=headers)
        return Response(audio, media_type=MEDIA_TYPES[fmt], headers=headers)

    @app.get("/v1/audio/voices")
    async def list_voices() -> dict[str, Any]:
        try:
            speakers = await pipeline.cache.list_speakers()
        except RegistryUnavailableError as exc:
            raise _api_error(exc) from exc
        return {"object": "list", "data": [_voice_json(s) for s in speakers]}

    @app.post("/v1/audio/voices", status_code=201)
    async def register_voice(request: Request, name: str = Form(...), audio: UploadFile = File(...),
                             prompt_text: str = Form(""), text_frontend: bool = Form(True),
                             replace: bool = Form(False)) -> dict[str, Any]:
        data = await audio.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise ApiError(413, f"audio is larger than {config.max_upload_bytes} bytes", param="audio")
        timings = StageTimings()
        try:
            info = await run_unless_disconnected(
                request.receive, pipeline.register_speaker(name, data, prompt_text, timings, text_frontend, replace))
        except Exception as exc:
            error = _api_error(exc)
            metrics.REQUESTS.labels(rpc="http.voices.register", code=_metric_code(error)).inc()
            raise error from exc
        metrics.REQUESTS.labels(rpc="http.voices.register", code="OK").inc()
        log.info("http=voices.register voice=%s tokens=%d", info.speaker_id, info.prompt_speech_tokens)
        return _voice_json(info)

    @app.delete("/v1/audio/voices/{name}")
    async def delete_voice(name: str) -> dict[str, Any]:
        try:
            pipeline.validate_voice_fields(name, b"", "")
            deleted = await pipeline.cache.delete_speaker(name)
        except (RegistryUnavailableError, RequestError) as exc:
            raise _api_error(exc) from exc
        if not deleted:
            raise ApiError(404, f"voice {name!r} is not registered", param="name", code="not_found")
        log.info("http=voices.delete voice=%s", name)
        return {"id": name, "object": "voice.deleted", "deleted": True}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": MODEL_OWNER,
                                            "random_weights": bool(config.model_notice),
                                            "notice": config.model_notice}]}

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        """The playground: one self-contained page (no asset from the internet), open like /healthz; its API
        calls carry the key the user types when auth is on."""
        return HTMLResponse(playground_html)

    @app.get("/healthz")
    async def healthz() -> Response:
        ready = is_ready()
        return Response("ok\n" if ready else "stages not ready\n", status_code=200 if ready else 503,
                        media_type="text/plain")

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness (Kubernetes readinessProbe): every stage has a ready replica."""
        return await healthz()

    @app.get("/livez")
    async def livez() -> Response:
        """Liveness (Kubernetes livenessProbe): the process answers; stages may be down (not a restart reason)."""
        return Response("ok\n", media_type="text/plain")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


@dataclass(frozen=True, slots=True)
class _Usage:
    """What `speech.audio.done` reports: OpenAI's token usage, and our timings (read when the stream ends)."""
    input_tokens: int
    timings: StageTimings


def timings_json(t: StageTimings) -> dict[str, Any]:
    """The request's StageTimings (the gRPC message's fields) as JSON."""
    stages = {name: {"queue_ms": s.queue_ms, "compute_ms": s.compute_ms, "calls": s.calls}
              for name, s in t.per_stage.items()}
    return {**stages, "cache_hit": t.cache_hit, "first_chunk_ms": t.first_chunk_ms, "total_ms": t.total_ms,
            "speech_tokens": t.speech_tokens, "audio_seconds": t.audio_seconds}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _sse_delta(audio: bytes) -> bytes:
    return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode()})


def _sse_done(usage: _Usage) -> bytes:
    output_tokens = usage.timings.speech_tokens
    return _sse({"type": "speech.audio.done",
                 "usage": {"input_tokens": usage.input_tokens, "output_tokens": output_tokens,
                           "total_tokens": usage.input_tokens + output_tokens},
                 "timings": timings_json(usage.timings)})


async def _sse_events(chunks: AsyncIterator[bytes], usage: _Usage) -> AsyncIterator[bytes]:
    """OpenAI's speech SSE: one `speech.audio.delta` event (base64 audio) per chunk, then `speech.audio.done`."""
    try:
        async for data in chunks:
            yield _sse_delta(data)
        yield _sse_done(usage)
    finally:
        await chunks.aclose()      # type: ignore[attr-defined]


async def _encoded_stream(pipeline: Pipeline, prepared, timings: StageTimings, fmt: str) -> AsyncIterator[bytes]:
    """Encode each pipeline chunk as it arrives: one soxr stream per request (no clicks at chunk joins) and, for
    mp3/opus/aac, one encoder whose output is sent as soon as the muxer writes it (off the event loop: a codec
    spends milliseconds per chunk)."""
    encoding = RESPONSE_FORMATS[fmt]
    encoder = StreamEncoder(prepared.sample_rate_hz, encoding)

    async def encode(wav: np.ndarray, last: bool = False) -> bytes:
        if encoding in CODECS:
            return await asyncio.to_thread(encoder.encode, wav, last)
        return encoder.encode(wav, last)

    chunks = pipeline.stream(prepared, timings)
    try:
        async for wav in chunks:
            data = await encode(wav)
            if data:
                yield data
        tail = await encode(np.zeros(0, np.float32), True)
        if tail:
            yield tail
    finally:
        await chunks.aclose()                   # on cancel: stops the LLM stream, no further token2wav call



def create_app(gateway) -> FastAPI:
    """The HTTP front of a `Gateway` (duck-typed: no import of server): its pipeline, admission and readiness."""
    return build_app(gateway.pipeline, lambda: gateway.serving, gateway.config.http_config(),
                     gateway.admission, gateway.config.request_timeout_s)


__all__ = ["AudioStreamResponse", "HttpConfig", "SpeechRequest", "build_app", "create_app",
           "run_unless_disconnected", "timings_json"]
