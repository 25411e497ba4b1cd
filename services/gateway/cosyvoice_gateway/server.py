"""`python -m cosyvoice_gateway.server`: the gRPC gateway (cosyvoice.v1.TextToSpeech + health + reflection).

Health is NOT_SERVING until every stage has a ready replica (server ready + model ready), re-checked
every `READINESS_INTERVAL_S`. SIGTERM/SIGINT: health goes NOT_SERVING, in-flight RPCs and HTTP requests get
`GRACE_S` to finish, then stage clients and Redis are closed. Config is read once, in main(), into GatewayConfig
(docs/CONFIGURATION.md lists every variable).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.audio import PROMPT_MAX_BYTES, encode_audio
from cosyvoice_common.constants import MAX_NAMED_SPEAKERS, SPEED_NEUTRAL
from cosyvoice_common.modelconfig import random_weights_notice
from cosyvoice_common.settings import ConfigError, check_knobs, from_env, knob
from cosyvoice_common.stages import (
    DEFAULT_REDIS_URL,
    DEFAULT_SPEAKER_ID,
    GATEWAY_GRPC_PORT,
    GATEWAY_HTTP_PORT,
    LLM,
    RELEASED_MODEL_DIR,
    SPEAKER,
    STAGE_NAMES,
    TOKEN2WAV,
    TOKENIZER,
    stage,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from cosyvoice_gateway import metrics
from cosyvoice_gateway.admission import Admission, AdmissionInterceptor
from cosyvoice_gateway.auth import API_KEY_ENV, ApiKeyInterceptor
from cosyvoice_gateway.encoding import StreamEncoder
from cosyvoice_gateway.http_api import RESPONSE_FORMATS, HttpConfig, create_app
from cosyvoice_gateway.model_dir import load_text_encoder, model_revision
from cosyvoice_gateway.pipeline import (
    Pipeline,
    PipelineConfig,
    RequestError,
    StageTimings,
    SynthesisRequest,
    invalid,
    stage_error_to_request_error,
)
from cosyvoice_gateway.seed_speakers import import_model_speakers
from cosyvoice_gateway.spk2info import (
    REDIS_SOCKET_TIMEOUT_S,
    RegistryUnavailableError,
    Spk2InfoCache,
    Spk2InfoConfig,
)
from cosyvoice_gateway.stage_client import StageError, Stages
from cosyvoice_gateway.textnorm import load_engines as load_text_engines

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("cosyvoice_gateway")

SERVICE_NAME = tts_pb2.DESCRIPTOR.services_by_name["TextToSpeech"].full_name
_LOGGED_ID_CHARS = 128                    # a refused request's id may be anything: log its start only
GRPC_MESSAGE_OVERHEAD_BYTES = 1 << 20     # a request beyond its prompt audio: texts, ids, settings
_ENCODING_NAMES = {
    tts_pb2.AUDIO_ENCODING_UNSPECIFIED: "pcm_s16le",
    tts_pb2.PCM_S16LE: "pcm_s16le",
    tts_pb2.FLOAT32: "float32",
    tts_pb2.WAV: "wav",
}


def _stage_urls(name: str):
    return knob(stage(name).urls_env, "", f"gRPC host:port of the {name} stage; several replicas "
                "comma-separated, or dns:///name:port to spread over what a name resolves to", required=True)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything one gateway process is configured with: read once in main() (`from_env(GatewayConfig,
    os.environ)`), validated here, handed to what needs it (docs/CONFIGURATION.md is generated from these)."""
    # one `{stage}_urls` per stage of the registry (stage_urls() reads them by name)
    tokenizer_urls: str = _stage_urls(TOKENIZER)
    speaker_urls: str = _stage_urls(SPEAKER)
    llm_urls: str = _stage_urls(LLM)
    token2wav_urls: str = _stage_urls(TOKEN2WAV)
    model_dir: Path = knob("MODEL_DIR", Path(RELEASED_MODEL_DIR), "model directory (the text tokenizer under "
                           "CosyVoice-BlankEN, spk2info.pt voices, the revision hash)")
    redis_url: str = knob("REDIS_URL", DEFAULT_REDIS_URL, "spk2info cache and speaker registry (empty cache: "
                          "slower, never wrong)")
    model_revision: str = knob("MODEL_REVISION", "", "spk2info key revision (empty = hashed from the model files)")
    host: str = knob("GATEWAY_HOST", "127.0.0.1", "address gRPC, HTTP and metrics listen on (0.0.0.0 in a "
                     "container)")
    grpc_port: int = knob("GRPC_PORT", GATEWAY_GRPC_PORT, "gRPC port", low=0, high=65535)
    http_port: int = knob("HTTP_PORT", GATEWAY_HTTP_PORT, "HTTP port (OpenAI API, /healthz, /metrics; 0 = none)",
                          low=0, high=65535)
    metrics_port: int = knob("METRICS_PORT", 0, "separate Prometheus port (0 = only /metrics on HTTP_PORT)",
                             low=0, high=65535)
    cache_ttl_s: int = knob("CACHE_TTL_S", 24 * 3600, "lifetime of an ad-hoc prompt's cached features "
                            "(named voices never expire)", low=1)
    redis_timeout_s: float = knob("REDIS_TIMEOUT_S", REDIS_SOCKET_TIMEOUT_S, "socket timeout of one Redis call",
                                  low=0.001)
    redis_retry_after_s: float = knob("REDIS_RETRY_AFTER_S", 5.0, "after a Redis failure, treat it as down "
                                      "this long", low=0)
    max_speakers: int = knob("MAX_SPEAKERS", MAX_NAMED_SPEAKERS, "named voices per model revision", low=1)
    stage_timeout_s: float = knob("STAGE_TIMEOUT_S", 30.0, "deadline of one tokenizer, speaker or token2wav call",
                                  low=0.001)
    llm_timeout_s: float = knob("LLM_TIMEOUT_S", 300.0, "deadline of a whole LLM stream", low=0.001)
    request_timeout_s: float = knob("REQUEST_TIMEOUT_S", 0.0, "deadline of a whole request (0 = the client's, "
                                    "if any)", low=0)
    max_inflight_per_replica: int = knob("MAX_INFLIGHT_PER_REPLICA", 0, "stage calls in flight per replica "
                                         "(0 = unbounded)", low=0)
    max_concurrent_rpcs: int = knob("MAX_CONCURRENT_RPCS", 256, "gRPC calls the server takes at once", low=1)
    max_inflight_requests: int = knob("MAX_INFLIGHT_REQUESTS", 64, "synthesis/registration requests in flight; "
                                      "more get RESOURCE_EXHAUSTED / 429 (0 = unbounded)", low=0)
    retry_after_s: float = knob("RETRY_AFTER_S", 1.0, "retry hint sent with a refusal", low=0.001)
    readiness_interval_s: float = knob("READINESS_INTERVAL_S", 2.0, "how often stage readiness is checked",
                                       low=0.001)
    grace_s: float = knob("GRACE_S", 5.0, "on SIGTERM, how long in-flight calls may finish", low=0)
    api_keys: tuple[str, ...] = knob(API_KEY_ENV, (), "API keys (comma-separated) required as `authorization: "
                                     "Bearer <key>`; empty = open", secret=True)
    http_max_upload_bytes: int = knob("HTTP_MAX_UPLOAD_BYTES", PROMPT_MAX_BYTES, "largest prompt upload", low=1)
    http_default_response_format: str = knob("HTTP_DEFAULT_RESPONSE_FORMAT", "", "response_format when a request "
                                             "names none (empty: mp3 where libsndfile has it, else wav)",
                                             choices=("", *RESPONSE_FORMATS))
    http_openai_voice: str = knob("HTTP_OPENAI_VOICE", DEFAULT_SPEAKER_ID, "registered voice that OpenAI's "
                                  "voice names (alloy, ...) speak with")
    cors_allow_origins: tuple[str, ...] = knob("CORS_ALLOW_ORIGINS", (), "browser origins (comma-separated, e.g. "
                                               "https://app.example.com; * = any) whose pages may call the HTTP "
                                               "API; empty = CORS off (the playground at / is same-origin)")
    log_level: str = knob("LOG_LEVEL", "INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    tls_cert_file: str = knob("TLS_CERT_FILE", "", "PEM certificate chain: TLS on the gRPC and HTTP ports (with "
                              "TLS_KEY_FILE; both empty = plaintext)")
    tls_key_file: str = knob("TLS_KEY_FILE", "", "PEM private key of TLS_CERT_FILE", secret=True)

    def __post_init__(self) -> None:
        check_knobs(self)
        for name, urls in self.stage_urls().items():
            if not urls:
                raise ValueError(f"{stage(name).urls_env} is empty")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("TLS needs both TLS_CERT_FILE and TLS_KEY_FILE (PEM certificate chain and its private "
                             "key), or neither for plaintext")
        for name, path in (("TLS_CERT_FILE", self.tls_cert_file), ("TLS_KEY_FILE", self.tls_key_file)):
            if path and not Path(path).is_file():
                raise ValueError(f"{name} {path} is not a readable file")
        if not self.model_revision:
            object.__setattr__(self, "model_revision", model_revision(self.model_dir))

    def stage_urls(self) -> dict[str, str]:
        """Each stage's replica addresses, by stage name."""
        return {name: getattr(self, f"{name}_urls") for name in STAGE_NAMES}

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(Path(self.tls_key_file).read_bytes(),
                                             Path(self.tls_cert_file).read_bytes())])

    def http_config(self) -> HttpConfig:
        return HttpConfig(max_upload_bytes=self.http_max_upload_bytes,
                          default_response_format=self.http_default_response_format,
                          api_keys=self.api_keys, openai_voice=self.http_openai_voice,
                          cors_allow_origins=self.cors_allow_origins, model_notice=self.model_notice)

    @property
    def model_notice(self) -> str:
        return random_weights_notice(self.model_dir)

    def spk2info_config(self) -> Spk2InfoConfig:
        return Spk2InfoConfig(url=self.redis_url, model_revision=self.model_revision, ttl_s=self.cache_ttl_s,
                              socket_timeout_s=self.redis_timeout_s, retry_after_s=self.redis_retry_after_s,
                              max_speakers=self.max_speakers)


# --- proto <-> pipeline -----------------------------------------------------------------------------------
def to_request(msg: tts_pb2.SynthesizeRequest) -> SynthesisRequest:
    return SynthesisRequest(
        text=msg.text, speaker_id=msg.speaker_id, prompt_audio=msg.prompt_audio, prompt_text=msg.prompt_text,
        instruct=msg.instruct, sample_rate_hz=msg.sample_rate, request_id=msg.request_id,
        temperature=msg.sampling.temperature, top_p=msg.sampling.top_p, top_k=msg.sampling.top_k,
        seed=msg.sampling.seed, min_speech_tokens=msg.min_speech_tokens, max_speech_tokens=msg.max_speech_tokens,
        skip_cache=msg.skip_cache, text_frontend=msg.text_frontend, speed=msg.speed or SPEED_NEUTRAL)


def encoding_name(encoding: int) -> str:
    if encoding not in _ENCODING_NAMES:
        raise invalid(f"encoding {encoding} is not supported; use PCM_S16LE, FLOAT32 or WAV")
    return _ENCODING_NAMES[encoding]


def timings_proto(t: StageTimings) -> tts_pb2.StageTimings:
    """The message has one StageTiming field per stage, named as the stage (a test holds the two together)."""
    per_stage = {name: tts_pb2.StageTiming(queue_ms=s.queue_ms, compute_ms=s.compute_ms, calls=s.calls)
                 for name, s in t.per_stage.items()}
    return tts_pb2.StageTimings(
        **per_stage, cache_hit=t.cache_hit, first_chunk_ms=t.first_chunk_ms, total_ms=t.total_ms,
        speech_tokens=t.speech_tokens, audio_seconds=t.audio_seconds)


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
                 timings.per_stage[LLM].compute_ms, timings.per_stage[TOKEN2WAV].compute_ms,
                 timings.per_stage[TOKEN2WAV].calls)

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
                                             encoding=proto_encoding, index=index, segment=timings.segments_done,
                                             segments=len(prepared.segments))
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
                                 index=index, is_final=True, timings=timings_proto(timings),
                                 segment=len(prepared.segments) - 1, segments=len(prepared.segments))

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
        self.stages = Stages.connect(config.stage_urls(), config.stage_timeout_s, config.llm_timeout_s,
                                     config.max_inflight_per_replica)
        self.cache = Spk2InfoCache(config.spk2info_config())
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
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task | None = None
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
        app = create_app(self) if self.config.http_port else None
        if app is not None:
            import uvicorn

            tls = ({"ssl_certfile": str(self.config.tls_cert_file), "ssl_keyfile": str(self.config.tls_key_file)}
                   if self.config.tls else {})
            http_config = uvicorn.Config(app, host=self.config.host, port=self.config.http_port,
                                         log_level="warning", timeout_graceful_shutdown=self.config.grace_s, **tls)
            http_config.load()   # resolves "auto": httptools when installed (the image has it), else pure-Python h11
            log.info("gateway: HTTP on %s:%d, parser %s", self.config.host, self.config.http_port,
                     http_config.http_protocol_class.__module__.rsplit(".", 1)[-1])
            self._http = uvicorn.Server(http_config)
            self._http_task = asyncio.create_task(self._http.serve())
        self._tasks.append(asyncio.create_task(self._readiness_loop()))
        log.info("gateway: gRPC on %s:%d, metrics on %d, model revision %s, %s", self.config.host, self.port,
                 self.config.metrics_port, self.config.model_revision,
                 "TLS on gRPC and HTTP" if self.config.tls else "plaintext")
        if notice := self.config.model_notice:
            log.warning("gateway: %s", notice)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._set_serving(False)
        if self._http is not None:     # uvicorn's own shutdown: no new connections, in-flight ones get the grace
            self._http.should_exit = True
        await asyncio.gather(self.server.stop(self.config.grace_s), self._stop_http())   # in-flight RPCs: the grace
        await self.pipeline.close()
        await self.stages.close()
        await self.cache.close()
        log.info("gateway: stopped")

    async def _stop_http(self) -> None:
        if self._http_task is None:
            return
        try:
            await asyncio.wait_for(self._http_task, self.config.grace_s + 1.0)
        except (TimeoutError, asyncio.CancelledError):
            log.warning("gateway: HTTP did not stop within the grace period; cancelled")


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
    try:
        config = from_env(GatewayConfig, os.environ)
    except ConfigError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
