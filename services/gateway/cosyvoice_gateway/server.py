"""`python -m cosyvoice_gateway.server`: the gRPC gateway (cosyvoice.v1.TextToSpeech + health + reflection).

Health is NOT_SERVING until every stage has a ready replica (server ready + model ready), re-checked
every `READINESS_INTERVAL_S`. SIGTERM/SIGINT: health goes NOT_SERVING, in-flight RPCs get `GRACE_S` to
finish, then stage clients and Redis are closed. Config is read once from the environment
(`GatewayConfig.from_env`); see the gateway README for every variable.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.audio import PROMPT_MAX_BYTES, encode_audio, wav_header
from cosyvoice_common.constants import MAX_NAMED_SPEAKERS, OUTPUT_SAMPLE_RATE_HZ
from cosyvoice_common.seed_speakers import import_model_speakers
from cosyvoice_common.spk2info import RegistryUnavailableError, Spk2InfoCache, Spk2InfoConfig
from cosyvoice_common.textnorm import load_engines as load_text_engines

from cosyvoice_gateway import metrics
from cosyvoice_gateway.admission import Admission, AdmissionInterceptor
from cosyvoice_gateway.auth import ApiKeyInterceptor, keys_from_env
from cosyvoice_gateway.pipeline import (
    Pipeline,
    PipelineConfig,
    RequestError,
    StageTimings,
    SynthesisRequest,
    invalid,
    stage_error_to_request_error,
)
from cosyvoice_gateway.stage_client import StageClient, StageError, Stages, stage_config

log = logging.getLogger("cosyvoice_gateway")

SERVICE_NAME = tts_pb2.DESCRIPTOR.services_by_name["TextToSpeech"].full_name
# Files whose content identifies a model for the spk2info key; hashing head and tail of each keeps
# start-up fast on multi-GB checkpoints while any re-export changes the revision.
_REVISION_FILES = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx")
_REVISION_PROBE_BYTES = 1 << 20
_PCM16_MAX = 32767.0
_LOGGED_ID_CHARS = 128                    # a refused request's id may be anything: log its start only
GRPC_MESSAGE_OVERHEAD_BYTES = 1 << 20     # a request beyond its prompt audio: texts, ids, settings
_ENCODING_NAMES = {
    tts_pb2.AUDIO_ENCODING_UNSPECIFIED: "pcm_s16le",
    tts_pb2.PCM_S16LE: "pcm_s16le",
    tts_pb2.FLOAT32: "float32",
    tts_pb2.WAV: "wav",
}


def model_revision(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in _REVISION_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(_REVISION_PROBE_BYTES))
            if size > _REVISION_PROBE_BYTES:
                f.seek(-_REVISION_PROBE_BYTES, os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "")
    return Path(value) if value else None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    model_dir: Path
    tokenizer_urls: str
    speaker_urls: str
    llm_urls: str
    token2wav_urls: str
    redis_url: str
    model_revision: str
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8080             # 0 = no HTTP front end (served when cosyvoice_gateway.http exists)
    metrics_port: int = 0             # separate Prometheus port; 0 = only /metrics on the HTTP port
    cache_ttl_s: int = 24 * 3600
    stage_timeout_s: float = 30.0     # tokenizer, speaker, one token2wav call
    llm_timeout_s: float = 300.0      # a whole LLM stream
    max_inflight_per_replica: int = 0
    max_concurrent_rpcs: int = 256
    readiness_interval_s: float = 2.0
    grace_s: float = 5.0
    api_keys: tuple[str, ...] = ()    # COSYVOICE_API_KEY (comma-separated); empty = no authentication
    max_speakers: int = MAX_NAMED_SPEAKERS  # named voices in the registry (MAX_SPEAKERS)
    max_inflight_requests: int = 64   # synthesis/registration requests in flight; more = RESOURCE_EXHAUSTED/429
    retry_after_s: float = 1.0        # the retry hint sent with a refusal
    request_timeout_s: float = 0.0    # per-request deadline for every stage call (0 = the client's, if any)
    # TLS_CERT_FILE / TLS_KEY_FILE (PEM; both or neither): TLS on the gRPC and HTTP ports; None = plaintext
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    def __post_init__(self) -> None:
        for port in (self.grpc_port, self.http_port, self.metrics_port):
            if not 0 <= port < 65536:
                raise ValueError(f"bad port {port}")
        if (self.max_concurrent_rpcs < 1 or self.grace_s < 0 or self.readiness_interval_s <= 0
                or self.max_inflight_requests < 0 or self.retry_after_s <= 0 or self.request_timeout_s < 0):
            raise ValueError(f"bad gateway config: {self}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both TLS_CERT_FILE and TLS_KEY_FILE (PEM certificate chain and its private "
                             "key), or neither for plaintext")
        for name, path in (("TLS_CERT_FILE", self.tls_cert_file), ("TLS_KEY_FILE", self.tls_key_file)):
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} is not a readable file")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.tls_key_file.read_bytes(), self.tls_cert_file.read_bytes())])

    @classmethod
    def from_env(cls) -> "GatewayConfig":
        model_dir = Path(os.environ.get("MODEL_DIR", "models/cosyvoice2-tiny"))
        missing = [n for n in ("TOKENIZER_URLS", "SPEAKER_URLS", "LLM_URLS", "TOKEN2WAV_URLS") if not os.environ.get(n)]
        if missing:
            raise ValueError(f"missing stage URLs: {', '.join(missing)}")
        return cls(
            model_dir=model_dir,
            tokenizer_urls=os.environ["TOKENIZER_URLS"],
            speaker_urls=os.environ["SPEAKER_URLS"],
            llm_urls=os.environ["LLM_URLS"],
            token2wav_urls=os.environ["TOKEN2WAV_URLS"],
            redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            model_revision=os.environ.get("MODEL_REVISION") or model_revision(model_dir),
            host=os.environ.get("GATEWAY_HOST", "127.0.0.1"),
            grpc_port=_env_int("GRPC_PORT", 50051),
            http_port=_env_int("HTTP_PORT", 8080),
            metrics_port=_env_int("METRICS_PORT", 0),
            cache_ttl_s=_env_int("CACHE_TTL_S", 24 * 3600),
            stage_timeout_s=_env_float("STAGE_TIMEOUT_S", 30.0),
            llm_timeout_s=_env_float("LLM_TIMEOUT_S", 300.0),
            max_inflight_per_replica=_env_int("MAX_INFLIGHT_PER_REPLICA", 0),
            max_concurrent_rpcs=_env_int("MAX_CONCURRENT_RPCS", 256),
            readiness_interval_s=_env_float("READINESS_INTERVAL_S", 2.0),
            grace_s=_env_float("GRACE_S", 5.0),
            api_keys=keys_from_env(os.environ),
            max_inflight_requests=_env_int("MAX_INFLIGHT_REQUESTS", 64),
            max_speakers=_env_int("MAX_SPEAKERS", MAX_NAMED_SPEAKERS),
            retry_after_s=_env_float("RETRY_AFTER_S", 1.0),
            request_timeout_s=_env_float("REQUEST_TIMEOUT_S", 0.0),
            tls_cert_file=_env_path("TLS_CERT_FILE"),
            tls_key_file=_env_path("TLS_KEY_FILE"),
        )


def load_text_encoder(model_dir: Path):
    from cosyvoice_common.text import TextTokenizer   # landed by the text-frontend engineer

    return TextTokenizer.from_dir(model_dir / "CosyVoice-BlankEN").encode


# --- proto <-> pipeline -----------------------------------------------------------------------------------
def to_request(msg: tts_pb2.SynthesizeRequest) -> SynthesisRequest:
    return SynthesisRequest(
        text=msg.text, speaker_id=msg.speaker_id, prompt_audio=msg.prompt_audio, prompt_text=msg.prompt_text,
        instruct=msg.instruct, sample_rate_hz=msg.sample_rate, request_id=msg.request_id,
        temperature=msg.sampling.temperature, top_p=msg.sampling.top_p, top_k=msg.sampling.top_k,
        seed=msg.sampling.seed, min_speech_tokens=msg.min_speech_tokens, max_speech_tokens=msg.max_speech_tokens,
        skip_cache=msg.skip_cache, text_frontend=msg.text_frontend)


def encoding_name(encoding: int) -> str:
    if encoding not in _ENCODING_NAMES:
        raise invalid(f"encoding {encoding} is not supported; use PCM_S16LE, FLOAT32 or WAV")
    return _ENCODING_NAMES[encoding]


def timings_proto(t: StageTimings) -> tts_pb2.StageTimings:
    stage = lambda s: tts_pb2.StageTiming(queue_ms=s.queue_ms, compute_ms=s.compute_ms, calls=s.calls)  # noqa: E731
    return tts_pb2.StageTimings(
        tokenizer=stage(t.tokenizer), speaker=stage(t.speaker), llm=stage(t.llm), token2wav=stage(t.token2wav),
        cache_hit=t.cache_hit, first_chunk_ms=t.first_chunk_ms, total_ms=t.total_ms,
        speech_tokens=t.speech_tokens, audio_seconds=t.audio_seconds)


class StreamEncoder:
    """Per-request streaming encoder: one soxr stream (no clicks at chunk joins), WAV header once."""

    def __init__(self, sample_rate_hz: int, encoding: str) -> None:
        import soxr

        self.sample_rate_hz = sample_rate_hz
        self.encoding = encoding
        self._resampler = (soxr.ResampleStream(OUTPUT_SAMPLE_RATE_HZ, sample_rate_hz, 1, dtype="float32")
                           if sample_rate_hz != OUTPUT_SAMPLE_RATE_HZ else None)
        self._header_sent = False

    def encode(self, wav_24k: np.ndarray, last: bool = False) -> bytes:
        wav = np.asarray(wav_24k, np.float32)
        if self._resampler is not None:
            wav = self._resampler.resample_chunk(wav, last=last)
        if self.encoding == "float32":
            body = wav.astype("<f4").tobytes()
        else:
            body = (np.clip(wav, -1.0, 1.0) * _PCM16_MAX).round().astype("<i2").tobytes()
        if self.encoding == "wav" and not self._header_sent:
            self._header_sent = True
            return wav_header(self.sample_rate_hz, None) + body
        return body


# --- the service ------------------------------------------------------------------------------------------
class TextToSpeechService(tts_pb2_grpc.TextToSpeechServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def _fail(self, context: grpc.aio.ServicerContext, rpc: str, request_id: str, exc: Exception):
        if isinstance(exc, StageError):
            exc = stage_error_to_request_error(exc)
        if isinstance(exc, RegistryUnavailableError):
            exc = RequestError(grpc.StatusCode.UNAVAILABLE, str(exc))
        metrics.REQUESTS.labels(rpc=rpc, code=exc.code.name).inc()
        log.info("rpc=%s request_id=%s status=%s: %s", rpc, request_id[:_LOGGED_ID_CHARS], exc.code.name,
                 exc.message)
        await context.abort(exc.code, exc.message)

    def _done(self, rpc: str, request_id: str, timings: StageTimings) -> None:
        metrics.REQUESTS.labels(rpc=rpc, code="OK").inc()
        metrics.REQUEST_LATENCY.labels(rpc=rpc).observe(timings.total_ms / 1000)
        if timings.first_chunk_ms:
            metrics.FIRST_CHUNK.observe(timings.first_chunk_ms / 1000)
        log.info("rpc=%s request_id=%s status=OK tokens=%d audio_s=%.2f first_chunk_ms=%.1f total_ms=%.1f "
                 "cache_hit=%s llm_ms=%.1f token2wav_ms=%.1f/%d calls", rpc, request_id, timings.speech_tokens,
                 timings.audio_seconds, timings.first_chunk_ms, timings.total_ms, timings.cache_hit,
                 timings.llm.compute_ms, timings.token2wav.compute_ms, timings.token2wav.calls)

    async def Synthesize(self, request, context):
        timings = StageTimings()
        try:
            encoding = encoding_name(request.encoding)
            prepared = await self.pipeline.prepare(to_request(request), timings)
            wav = await self.pipeline.synthesize(prepared, timings)
            audio = encode_audio(wav, prepared.sample_rate_hz, encoding)
        except (RequestError, StageError) as exc:
            await self._fail(context, "Synthesize", request.request_id, exc)
        self._done("Synthesize", prepared.request_id, timings)
        return tts_pb2.SynthesizeResponse(audio=audio, sample_rate=prepared.sample_rate_hz,
                                          encoding=request.encoding or tts_pb2.PCM_S16LE,
                                          timings=timings_proto(timings))

    async def SynthesizeStream(self, request, context):
        timings = StageTimings()
        request_id = request.request_id
        try:
            encoding = encoding_name(request.encoding)
            prepared = await self.pipeline.prepare(to_request(request), timings)
            request_id = prepared.request_id
            encoder = StreamEncoder(prepared.sample_rate_hz, encoding)
            proto_encoding = request.encoding or tts_pb2.PCM_S16LE
            index = 0
            # aclosing: when this handler is closed, the pipeline (and its llm reader) is closed with it, now.
            async with contextlib.aclosing(self.pipeline.stream(prepared, timings)) as chunks:
                async for wav in chunks:
                    yield tts_pb2.AudioChunk(audio=encoder.encode(wav), sample_rate=prepared.sample_rate_hz,
                                             encoding=proto_encoding, index=index)
                    index += 1
            # The final chunk carries the timings and whatever the resampler still held.
            tail = encoder.encode(np.zeros(0, np.float32), last=True)
        except (RequestError, StageError) as exc:
            await self._fail(context, "SynthesizeStream", request_id, exc)
        except (asyncio.CancelledError, GeneratorExit):
            # CancelledError: the client left while this handler awaited a stage. GeneratorExit: it left while
            # grpc was writing the last chunk, so grpc's task took the cancel and this generator is closed
            # at its `yield` instead (seen under load on CI).
            metrics.REQUESTS.labels(rpc="SynthesizeStream", code="CANCELLED").inc()
            log.info("rpc=SynthesizeStream request_id=%s status=CANCELLED after %.1f ms", request_id,
                     timings.elapsed_ms())
            raise
        self._done("SynthesizeStream", request_id, timings)
        yield tts_pb2.AudioChunk(audio=tail, sample_rate=prepared.sample_rate_hz, encoding=proto_encoding,
                                 index=index, is_final=True, timings=timings_proto(timings))

    @staticmethod
    def _speaker_proto(info) -> tts_pb2.Speaker:
        return tts_pb2.Speaker(speaker_id=info.speaker_id, prompt_text=info.prompt_text,
                               prompt_speech_tokens=info.prompt_speech_tokens, prompt_seconds=info.prompt_seconds)

    async def RegisterSpeaker(self, request, context):
        try:
            info = await self.pipeline.register_speaker(request.speaker_id, request.prompt_audio,
                                                        request.prompt_text, StageTimings(), replace=request.replace)
        except (RequestError, StageError) as exc:
            await self._fail(context, "RegisterSpeaker", request.speaker_id, exc)
        metrics.REQUESTS.labels(rpc="RegisterSpeaker", code="OK").inc()
        log.info("rpc=RegisterSpeaker speaker_id=%s tokens=%d", info.speaker_id, info.prompt_speech_tokens)
        return tts_pb2.RegisterSpeakerResponse(speaker=self._speaker_proto(info))

    async def ListSpeakers(self, request, context):
        try:
            speakers = await self.pipeline.cache.list_speakers()
        except RegistryUnavailableError as exc:
            await self._fail(context, "ListSpeakers", "", exc)
        return tts_pb2.ListSpeakersResponse(speakers=[self._speaker_proto(s) for s in speakers])

    async def DeleteSpeaker(self, request, context):
        try:
            self.pipeline.validate_voice_fields(request.speaker_id, b"", "")
            deleted = await self.pipeline.cache.delete_speaker(request.speaker_id)
        except (RegistryUnavailableError, RequestError) as exc:
            await self._fail(context, "DeleteSpeaker", request.speaker_id, exc)
        log.info("rpc=DeleteSpeaker speaker_id=%s deleted=%s", request.speaker_id, deleted)
        return tts_pb2.DeleteSpeakerResponse(deleted=deleted)


class Gateway:
    """Everything one gateway process holds: stage clients, cache, pipeline, gRPC server, health."""

    def __init__(self, config: GatewayConfig, encode_text=None) -> None:
        self.config = config
        self.stages = Stages(*(
            StageClient(stage_config(name, urls, config.llm_timeout_s if name == "llm" else config.stage_timeout_s,
                                     config.max_inflight_per_replica))
            for name, urls in (("tokenizer", config.tokenizer_urls), ("speaker", config.speaker_urls),
                               ("llm", config.llm_urls), ("token2wav", config.token2wav_urls))))
        self.cache = Spk2InfoCache(Spk2InfoConfig(url=config.redis_url, model_revision=config.model_revision,
                                                  ttl_s=config.cache_ttl_s, max_speakers=config.max_speakers))
        self.pipeline = Pipeline(PipelineConfig(), self.stages, self.cache,
                                 encode_text or load_text_encoder(config.model_dir))
        self.health = health.aio.HealthServicer()
        # Messages up to the prompt upload bound (plus the text around it), so the pipeline's own checks answer
        # an oversized prompt with INVALID_ARGUMENT and a message, as HTTP does.
        self.admission = Admission(config.max_inflight_requests, config.retry_after_s)
        # Order: authentication first (an unauthenticated call takes no slot), then admission.
        interceptors = [*([ApiKeyInterceptor(config.api_keys)] if config.api_keys else []),
                        AdmissionInterceptor(self.admission, config.request_timeout_s)]
        self.server = grpc.aio.server(maximum_concurrent_rpcs=config.max_concurrent_rpcs, interceptors=interceptors,
                                      options=[
            ("grpc.max_receive_message_length", PROMPT_MAX_BYTES + GRPC_MESSAGE_OVERHEAD_BYTES)])
        self.port = 0
        self._tasks: list[asyncio.Task] = []
        self._serving = False
        self._speakers_imported = False    # <model_dir>/spk2info.pt (seed drop-in) once Redis answers

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        if serving != self._serving:
            log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self._serving = serving

    async def _readiness_loop(self) -> None:
        # Text-frontend engines first (seconds of loading, off the event loop): not serving until they are loaded,
        # so no request pays for it while holding the loop.
        await asyncio.to_thread(load_text_engines)
        while True:
            if not self._speakers_imported:
                self._speakers_imported = await import_model_speakers(self.cache, self.config.model_dir,
                                                                      self.pipeline.encode_text)
            await self._set_serving(await self.stages.check_ready())
            await asyncio.sleep(self.config.readiness_interval_s)

    @property
    def serving(self) -> bool:
        return self._serving

    def _http_app(self):
        """Hook for the HTTP front end: the module `cosyvoice_gateway.http_api` with `create_app(gateway)`.

        Until it exists, a minimal app serves `/healthz` (200 once SERVING, else 503; the stack launcher
        waits on it) and `/metrics`."""
        try:
            module = importlib.import_module("cosyvoice_gateway.http_api")
        except ModuleNotFoundError:
            return _minimal_http_app(self)
        return module.create_app(self)

    async def start(self) -> None:
        tts_pb2_grpc.add_TextToSpeechServicer_to_server(TextToSpeechService(self.pipeline), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        await self._set_serving(False)
        address = f"{self.config.host}:{self.config.grpc_port}"
        if self.config.tls:
            self.port = self.server.add_secure_port(address, self.config.grpc_server_credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        await self.server.start()
        if self.config.metrics_port:
            start_http_server(self.config.metrics_port, addr=self.config.host)
        app = self._http_app() if self.config.http_port else None
        if app is not None:
            import uvicorn

            tls = ({"ssl_certfile": str(self.config.tls_cert_file), "ssl_keyfile": str(self.config.tls_key_file)}
                   if self.config.tls else {})
            http = uvicorn.Server(uvicorn.Config(app, host=self.config.host, port=self.config.http_port,
                                                 log_level="warning", **tls))
            self._tasks.append(asyncio.create_task(http.serve()))
        self._tasks.append(asyncio.create_task(self._readiness_loop()))
        log.info("gateway: gRPC on %s:%d, metrics on %d, model revision %s, %s", self.config.host, self.port,
                 self.config.metrics_port, self.config.model_revision,
                 "TLS on gRPC and HTTP" if self.config.tls else "plaintext")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._set_serving(False)
        await self.server.stop(self.config.grace_s)    # in-flight RPCs get the grace period
        await self.pipeline.close()
        await self.stages.close()
        await self.cache.close()
        log.info("gateway: stopped")


def _minimal_http_app(gateway: "Gateway"):
    from fastapi import FastAPI, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response("ok\n" if gateway.serving else "stages not ready\n",
                        status_code=200 if gateway.serving else 503, media_type="text/plain")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def serve(config: GatewayConfig) -> None:
    gateway = Gateway(config)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway: signal received, stopping (grace %.1f s)", config.grace_s)
    await gateway.stop()


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(GatewayConfig.from_env()))


if __name__ == "__main__":
    main()
