"""Seed-compatible Triton front (`cosyvoice2`): the seed's tensors over the gateway's orchestration.

The seed (FunAudioLLM/CosyVoice `runtime/triton_trtllm`) serves a BLS model `cosyvoice2`:

    reference_wav      FP32  [1, N]  16 kHz, optional, may be zero-padded (the seed's client pads)
    reference_wav_len  INT32 [1, 1]  optional; true length of reference_wav
    reference_text     BYTES [1, 1]  optional
    target_text        BYTES [1, 1]
    -> waveform        FP32  [1, M]  24 kHz (decoupled: one response per chunk, then an empty final one)

plus our optional extras `min_speech_tokens` / `max_speech_tokens` INT32 [1, 1]. This module holds
everything of that front except the pb_utils glue (`model_repository/cosyvoice2/1/model.py`):

- `parse_seed_inputs(tensors)` -> `SeedInputs` (validation -> `SeedRequestError`);
- `to_synthesis_request(...)` -> the gateway's `SynthesisRequest` (seed semantics: no reference_wav =
  the default speaker of the spk2info registry, "001" like the seed's spk2info.pt; the benchmark
  length option `length_from_text`);
- `SeedFront`: its own asyncio loop on a thread, driving `cosyvoice_gateway.pipeline.Pipeline` over the
  stage servers by URL. `submit()` only schedules; a `Responder` (the model's per-request sender)
  gets audio, then exactly one final. A cancellation thread polls `Responder.is_cancelled()` and
  cancels the request's task, which stops the LLM stream and any further token2wav call.
- `ensure_stub_python(dir)` + `stub_environment(...)`: an interpreter environment with numpy < 2 for the
  front's Python-backend stub, and this interpreter's libpython first on the loader path. The wheel's
  stub copies request tensors with zero strides under numpy >= 2; numeric inputs survive through
  DLPack, but BYTES (`target_text`, `reference_text`) are deserialised by the stub before `execute()`
  runs and cannot be rescued (../shared/notes/TRITON.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from cosyvoice_common.constants import MAX_SPEECH_TOKENS, PROMPT_16K_SAMPLE_RATE_HZ
from cosyvoice_common.contracts import SeedIn
from cosyvoice_common.settings import check_knobs, knob, template_values
from cosyvoice_common.stages import DEFAULT_SPEAKER_ID, STAGE_NAMES, STAGES

DEFAULT_SPEAKER = DEFAULT_SPEAKER_ID      # the seed's spk2info.pt key
CANCEL_POLL_S = 0.02
READINESS_INTERVAL_S = 2.0
LENGTH_MODES = ("off", "ratio")
# Speech tokens per target-text token for `length_from_text: ratio`. 25 tokens/s of speech; read
# speech runs at ~2.5 English words/s (~3.3 Qwen2 tokens/s) or ~4.5 Chinese characters/s
# (~3.2 Qwen2 tokens/s), so ~7.5 speech tokens per text token with the real tokenizer.
DEFAULT_LENGTH_K = 7.5

log = logging.getLogger("cosyvoice_gateway.seed")


class SeedRequestError(ValueError):
    """The request's tensors do not follow the seed's contract; the message names the tensor."""


# --- tensors -> request ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SeedInputs:
    target_text: str
    reference_wav: np.ndarray | None = None     # float32 16 kHz, trimmed to reference_wav_len
    reference_text: str = ""
    min_speech_tokens: int = 0
    max_speech_tokens: int = 0


def _text(tensors: Mapping[str, np.ndarray], name: str) -> str | None:
    array = tensors.get(name)
    if array is None:
        return None
    flat = np.asarray(array, dtype=object).reshape(-1)
    if flat.size != 1:
        raise SeedRequestError(f"{name} must hold one string (shape [1, 1]), got {flat.size}")
    value = flat[0]
    try:
        return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)
    except UnicodeDecodeError as exc:
        raise SeedRequestError(f"{name} is not UTF-8: {exc}") from exc


def _int(tensors: Mapping[str, np.ndarray], name: str) -> int | None:
    array = tensors.get(name)
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise SeedRequestError(f"{name} must hold one value (shape [1, 1]), got {flat.size}")
    return int(flat[0])


def parse_seed_inputs(tensors: Mapping[str, np.ndarray]) -> SeedInputs:
    """Seed tensors (batch dim of 1 included or not) -> SeedInputs. Raises SeedRequestError."""
    target_text = _text(tensors, SeedIn.TARGET_TEXT)
    if target_text is None or not target_text.strip():
        raise SeedRequestError("target_text is missing or empty")
    reference_text = _text(tensors, SeedIn.REFERENCE_TEXT) or ""
    wav = tensors.get(SeedIn.REFERENCE_WAV)
    if wav is not None:
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim == 2 and wav.shape[0] == 1:
            wav = wav[0]
        if wav.ndim != 1:
            raise SeedRequestError(f"reference_wav must be [1, N], got {list(np.shape(tensors[SeedIn.REFERENCE_WAV]))}")
        length = _int(tensors, SeedIn.REFERENCE_WAV_LEN)
        if length is not None:
            if not 0 < length <= wav.shape[0]:
                raise SeedRequestError(f"reference_wav_len {length} outside [1, {wav.shape[0]}]")
            wav = wav[:length]            # the seed's client zero-pads to whole seconds
        if wav.size == 0:
            wav = None
    elif tensors.get(SeedIn.REFERENCE_WAV_LEN) is not None:
        raise SeedRequestError("reference_wav_len without reference_wav")
    lo, hi = _int(tensors, SeedIn.MIN_SPEECH_TOKENS) or 0, _int(tensors, SeedIn.MAX_SPEECH_TOKENS) or 0
    return SeedInputs(target_text, None if wav is None else np.ascontiguousarray(wav), reference_text, lo, hi)


def wav_bytes(wav_16k: np.ndarray) -> bytes:
    """16 kHz float samples as a float WAV file (what the pipeline's prompt decoder reads)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(wav_16k, np.float32), PROMPT_16K_SAMPLE_RATE_HZ, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@dataclass(frozen=True, slots=True)
class SeedSemantics:
    """How seed requests map onto the pipeline (front config parameters)."""
    default_speaker: str = DEFAULT_SPEAKER
    length_from_text: str = "off"          # off: the model's own rule (2x..20x text tokens, end token)
    length_k: float = DEFAULT_LENGTH_K     # ratio: min = max = round(k * target text tokens)
    max_speech_tokens: int = MAX_SPEECH_TOKENS

    def __post_init__(self) -> None:
        if self.length_from_text not in LENGTH_MODES:
            raise ValueError(f"length_from_text must be one of {LENGTH_MODES}, got {self.length_from_text!r}")
        if self.length_k <= 0 or not self.default_speaker:
            raise ValueError(f"bad seed semantics: {self}")


def forced_length(text_tokens: int, semantics: SeedSemantics) -> int:
    """`length_from_text: ratio`: speech tokens for a text of `text_tokens` tokens (>= 1, capped)."""
    return max(1, min(round(semantics.length_k * text_tokens), semantics.max_speech_tokens))


def to_synthesis_request(inputs: SeedInputs, semantics: SeedSemantics, encode_text: Callable[[str], Sequence[int]],
                         request_id: str = ""):
    """SeedInputs -> the gateway's SynthesisRequest (imported lazily: this module stays light)."""
    from cosyvoice_gateway.pipeline import SynthesisRequest

    lo, hi = inputs.min_speech_tokens, inputs.max_speech_tokens
    if not (lo or hi) and semantics.length_from_text == "ratio":
        lo = hi = forced_length(len(encode_text(inputs.target_text)), semantics)
    voice = ({"prompt_audio": wav_bytes(inputs.reference_wav), "prompt_text": inputs.reference_text}
             if inputs.reference_wav is not None else {"speaker_id": semantics.default_speaker})
    return SynthesisRequest(text=inputs.target_text, request_id=request_id, min_speech_tokens=lo,
                            max_speech_tokens=hi, **voice)


# --- front configuration ---------------------------------------------------------------------------------
def _urls_parameter(stage_name: str) -> str:
    """The config.pbtxt parameter holding a stage's replica addresses (`${llm_urls}` in the template)."""
    return f"{stage_name}_urls"


@dataclass(frozen=True, slots=True)
class SeedFrontConfig:
    model_dir: Path
    stage_urls: Mapping[str, str]          # stage name -> its replicas' gRPC host:port, comma-separated
    redis_url: str
    model_revision: str = ""               # "" = computed from the model files (as the gateway does)
    semantics: SeedSemantics = SeedSemantics()
    prompt_wav: str = ""                   # registered as the default speaker at start-up when set
    prompt_text: str = ""
    stage_timeout_s: float = 30.0
    llm_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in STAGE_NAMES:
            if not self.stage_urls.get(name):
                raise ValueError(f"seed front: {_urls_parameter(name)} is empty")
        if self.stage_timeout_s <= 0 or self.llm_timeout_s <= 0:
            raise ValueError(f"bad seed front timeouts: {self}")

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "SeedFrontConfig":
        """config.pbtxt string parameters; an unfilled `${...}` is an error, "" means the default."""
        def get(name: str, default: str = "") -> str:
            value = params.get(name, default)
            if value.startswith("${"):
                raise ValueError(f"config.pbtxt parameter {name!r} is not filled ({value})")
            return value or default

        semantics = SeedSemantics(default_speaker=get("default_speaker", DEFAULT_SPEAKER),
                                  length_from_text=get("length_from_text", "off"),
                                  length_k=float(get("length_k", str(DEFAULT_LENGTH_K))))
        return cls(model_dir=Path(get("model_dir")),
                   stage_urls={name: get(_urls_parameter(name)) for name in STAGE_NAMES}, redis_url=get("redis_url"),
                   model_revision=get("model_revision"), semantics=semantics,
                   prompt_wav=get("prompt_wav"), prompt_text=get("prompt_text"),
                   stage_timeout_s=float(get("stage_timeout_s", "30")),
                   llm_timeout_s=float(get("llm_timeout_s", "300")))


@dataclass(frozen=True, slots=True)
class SeedFrontSettings:
    """What a deployment sets for the two seed-compatible fronts, from the environment of `make up` or of the
    front's container (deploy/docker/seed_front.py); they become config.pbtxt parameters, which the front's
    model.py reads into SeedFrontConfig. Field names are the template's `${...}` names."""
    default_speaker: str = knob("SEED_SPEAKER", DEFAULT_SPEAKER,
                                "registered voice a request without reference audio speaks with")
    prompt_wav: str = knob("SEED_PROMPT_WAV", "", "audio file registered as SEED_SPEAKER at start-up (path as the "
                           "front sees it)")
    prompt_text: str = knob("SEED_PROMPT_TEXT", "", "transcript of SEED_PROMPT_WAV (empty = cross-lingual)")
    length_from_text: str = knob("SEED_LENGTH_FROM_TEXT", "off", "off: the model's own length rule; ratio: "
                                 "min = max = SEED_LENGTH_K x target text tokens", choices=LENGTH_MODES)
    length_k: float = knob("SEED_LENGTH_K", DEFAULT_LENGTH_K, "speech tokens per text token for ratio", low=0.01)
    model_revision: str = knob("MODEL_REVISION", "", "spk2info key revision (empty = hashed from the model files)")
    instance_count: int = knob("SEED_INSTANCES", 1, "Triton instances of each front", low=1)
    max_batch_size: int = knob("SEED_MAX_BATCH_SIZE", 16, "Triton max_batch_size of each front", low=1)
    max_queue_delay_us: int = knob("SEED_MAX_QUEUE_DELAY_US", 0, "Triton dynamic batcher delay of each front",
                                   low=0)
    stage_timeout_s: float = knob("STAGE_TIMEOUT_S", 30.0, "deadline of one tokenizer, speaker or token2wav call",
                                  low=0.001)
    llm_timeout_s: float = knob("LLM_TIMEOUT_S", 300.0, "deadline of a whole LLM stream", low=0.001)

    def __post_init__(self) -> None:
        check_knobs(self)


def template_params(decoupled: bool, model_dir: Path, stage_urls: Mapping[str, str], redis_url: str,
                    settings: SeedFrontSettings) -> dict[str, str]:
    """Everything `model_repository/cosyvoice2/config.pbtxt` needs, for one of the two variants."""
    pbtxt_text = {k: str(v).replace("\\", "\\\\").replace('"', '\\"') for k, v in template_values(settings).items()}
    return {**pbtxt_text, "decoupled": "true" if decoupled else "false", "model_dir": str(model_dir),
            "redis_url": redis_url, **{_urls_parameter(s.name): stage_urls[s.urls_env] for s in STAGES}}


# --- the front: an asyncio loop on its own thread ---------------------------------------------------------
class Responder(Protocol):
    """The model's side of one request (pb_utils response sender). Called from worker threads."""

    def send_audio(self, wav_24k: np.ndarray, final: bool) -> None: ...
    def finish(self) -> None: ...                   # final flag, no data (decoupled end / cancel)
    def fail(self, message: str) -> None: ...       # error response + final flag
    def is_cancelled(self) -> bool: ...


@dataclass(slots=True)
class _Active:
    responder: Responder
    task: asyncio.Task | None = None
    cancelled: bool = False


@dataclass(slots=True)
class FrontStats:
    requests: int = 0
    failed: int = 0
    cancelled: int = 0
    active: int = 0
    first_chunk_ms: list[float] = field(default_factory=list)


class SeedFront:
    """Drives the gateway pipeline for seed requests: `start()`, `submit(...)`, `stop()`."""

    def __init__(self, config: SeedFrontConfig, encode_text: Callable[[str], Sequence[int]] | None = None) -> None:
        self.config = config
        self._encode_text = encode_text
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="seed-front-loop", daemon=True)
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._stopping = threading.Event()
        self._canceller = threading.Thread(target=self._cancellation_loop, name="seed-front-cancel", daemon=True)
        self._readiness: asyncio.Task | None = None
        self.stats = FrontStats()
        self.pipeline = None

    # lifecycle ---------------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _call(self, coro, timeout_s: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def start(self) -> "SeedFront":
        from cosyvoice_gateway.model_dir import load_text_encoder, model_revision
        from cosyvoice_gateway.pipeline import Pipeline, PipelineConfig
        from cosyvoice_gateway.spk2info import Spk2InfoCache, Spk2InfoConfig
        from cosyvoice_gateway.stage_client import Stages

        cfg = self.config
        encode_text = self._encode_text or load_text_encoder(cfg.model_dir)
        revision = cfg.model_revision or model_revision(cfg.model_dir)
        self._thread.start()

        async def build():
            stages = Stages.connect(cfg.stage_urls, cfg.stage_timeout_s, cfg.llm_timeout_s)
            cache = Spk2InfoCache(Spk2InfoConfig(url=cfg.redis_url, model_revision=revision))
            pipeline = Pipeline(PipelineConfig(max_speech_tokens=cfg.semantics.max_speech_tokens), stages, cache,
                                encode_text)
            await stages.check_ready()     # also learns each replica's batch dim
            self._readiness = asyncio.create_task(self._readiness_loop(stages))
            return pipeline

        self.pipeline = self._call(build(), 60)
        self.encode_text = encode_text
        self._canceller.start()
        from cosyvoice_gateway.seed_speakers import (
            import_model_speakers,  # <model_dir>/spk2info.pt, if any
        )

        self._call(import_model_speakers(self.pipeline.cache, cfg.model_dir, encode_text), 60)
        if cfg.prompt_wav:
            self.register_default_speaker(Path(cfg.prompt_wav).read_bytes(), cfg.prompt_text)
        log.info("seed front: stages %s, speaker %r, length_from_text=%s (k=%.2f), revision %s",
                 dict(cfg.stage_urls), cfg.semantics.default_speaker, cfg.semantics.length_from_text,
                 cfg.semantics.length_k, revision)
        return self

    async def _readiness_loop(self, stages) -> None:
        while True:
            await asyncio.sleep(READINESS_INTERVAL_S)
            try:
                await stages.check_ready()
            except Exception as exc:  # noqa: BLE001 - readiness is advisory; requests still try
                log.warning("seed front: readiness check failed: %s", exc)

    def register_default_speaker(self, audio: bytes, prompt_text: str, timeout_s: float = 120.0):
        from cosyvoice_gateway.pipeline import StageTimings

        info = self._call(self.pipeline.register_speaker(self.config.semantics.default_speaker, audio,
                                                         prompt_text, StageTimings(), replace=True), timeout_s)
        log.info("seed front: registered default speaker %r (%d prompt tokens)", info.speaker_id,
                 info.prompt_speech_tokens)
        return info

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        if self._canceller.is_alive():
            self._canceller.join()
        if not self._thread.is_alive():
            return

        async def shutdown():
            with self._lock:
                tasks = [a.task for a in self._active.values() if a.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)   # each answers its final flag
            if self._readiness is not None:
                self._readiness.cancel()
            if self.pipeline is not None:
                await self.pipeline.close()
                await self.pipeline.stages.close()
                await self.pipeline.cache.close()

        try:
            self._call(shutdown(), timeout_s)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)

    # requests ----------------------------------------------------------------------------------------
    def submit(self, inputs: SeedInputs, request_id: str, responder: Responder, streaming: bool) -> Future:
        """Schedule one request; returns at once. The responder gets audio and exactly one final."""
        key = f"{request_id or 'seed'}#{id(responder)}"
        entry = _Active(responder)
        with self._lock:
            self._active[key] = entry
            self.stats.requests += 1
            self.stats.active = len(self._active)
        return asyncio.run_coroutine_threadsafe(self._serve(key, entry, inputs, request_id, streaming), self.loop)

    async def _serve(self, key: str, entry: _Active, inputs: SeedInputs, request_id: str, streaming: bool) -> None:
        entry.task = asyncio.current_task()
        responder = entry.responder
        try:
            if entry.cancelled:
                raise asyncio.CancelledError
            await self._run(inputs, request_id, responder, streaming)
        except asyncio.CancelledError:
            self.stats.cancelled += 1
            log.info("seed request %s cancelled", request_id)
            await asyncio.to_thread(responder.finish)
        except Exception as exc:  # noqa: BLE001 - a failure answers only its own request
            self.stats.failed += 1
            message = describe_error(exc)
            log.info("seed request %s failed: %s", request_id, message)
            await asyncio.to_thread(responder.fail, message)
        finally:
            with self._lock:
                self._active.pop(key, None)
                self.stats.active = len(self._active)

    async def _run(self, inputs: SeedInputs, request_id: str, responder: Responder, streaming: bool) -> None:
        from cosyvoice_gateway.pipeline import StageTimings

        timings = StageTimings()
        request = to_synthesis_request(inputs, self.config.semantics, self.encode_text, request_id)
        prepared = await self.pipeline.prepare(request, timings)
        if streaming:
            # aclosing: a cancel that lands in send_audio closes the pipeline (and its llm reader) now
            async with contextlib.aclosing(self.pipeline.stream(prepared, timings)) as chunks:
                async for wav in chunks:
                    await asyncio.to_thread(responder.send_audio, wav, False)
            await asyncio.to_thread(responder.finish)
        else:
            wav = await self.pipeline.synthesize(prepared, timings)
            await asyncio.to_thread(responder.send_audio, wav, True)
        log.info("seed request %s ok: tokens=%d audio_s=%.2f first_chunk_ms=%.1f total_ms=%.1f cache_hit=%s",
                 request_id, timings.speech_tokens, timings.audio_seconds, timings.first_chunk_ms,
                 timings.total_ms, timings.cache_hit)

    def _cancellation_loop(self) -> None:
        while not self._stopping.wait(CANCEL_POLL_S):
            with self._lock:
                pending = [e for e in self._active.values() if not e.cancelled]
            for entry in pending:
                try:
                    cancelled = entry.responder.is_cancelled()
                except Exception:  # noqa: BLE001 - a request torn down under us counts as cancelled
                    cancelled = True
                if cancelled:
                    entry.cancelled = True
                    if entry.task is not None:
                        self.loop.call_soon_threadsafe(entry.task.cancel)


def describe_error(exc: BaseException) -> str:
    """One line for the client: the gRPC status name the gateway would use, then the message."""
    from cosyvoice_gateway.pipeline import RequestError, stage_error_to_request_error
    from cosyvoice_gateway.stage_client import StageError

    if isinstance(exc, StageError):
        exc = stage_error_to_request_error(exc)
    if isinstance(exc, RequestError):
        return f"{exc.code.name}: {exc.message}"
    if isinstance(exc, SeedRequestError):
        return f"INVALID_ARGUMENT: {exc}"
    return f"INTERNAL: {type(exc).__name__}: {exc}"
