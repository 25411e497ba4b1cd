"""Request orchestration shared by every front end (gRPC server, HTTP API, seed-compatible Triton model).

Transport-neutral: takes a `SynthesisRequest`, raises `RequestError` (with a gRPC status code) for bad
input, yields float32 24 kHz audio. Two steps so that every validation error surfaces before the
first byte is sent, on streaming and offline RPCs alike:

    prepared = await pipeline.prepare(request, timings)      # validate, prompt features (cache)
    async for wav in pipeline.stream(prepared, timings): ...  # or: await pipeline.synthesize(...)

Text (spec 2.2, `cosyvoice_gateway.textnorm`): with `text_frontend` the target text is normalised and split
into segments (lengths in characters for zh, text-tokenizer tokens otherwise) and a zero-shot prompt
transcript is normalised (not split); without it the text is taken as given, and only a text longer than
`token_max_n` is cut after terminators (unnormalised) so that no segment runs into the per-segment
speech-token cap. Explicit min/max speech-token bounds keep the (normalised) text as one segment.

Streaming per segment: an LLM reader task appends speech tokens as the llm stage streams them; the
chunk schedule (`cosyvoice_gateway.schedule`) decides when token2wav runs on the whole prefix with the
token offset, and each chunk's audio is yielded as soon as it exists. token2wav calls are self-contained: the
vocoder overlap cache it returns travels with the next chunk. A stream's token2wav calls share an affinity key,
so they reach the replica whose state cache holds the stream's earlier blocks; as soon as the prompt's features
exist, a `prefill` call computes the prompt's blocks there while the LLM decodes the first chunk's tokens.
Closing the generator (client cancel, deadline) cancels the LLM stream and issues no further token2wav call.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from cosyvoice_common.audio import (
    PROMPT_MAX_BYTES,
    AudioDecodeError,
    AudioValidationError,
    PromptAudio,
    prepare_prompt,
)
from cosyvoice_common.constants import (
    FLAT_EOS1_ID,
    FLAT_SOS_ID,
    FLAT_TASK_ID,
    LLM_MAX_SEQ_LEN,
    MAX_SPEECH_TOKENS,
    MAX_SPEED,
    MEL_HOP_SAMPLES,
    MIN_SPEED,
    OUTPUT_SAMPLE_RATE_HZ,
    SPEECH_CODEBOOK_SIZE,
    SPEECH_ID_OFFSET,
    SPEED_NEUTRAL,
    SUPPORTED_OUTPUT_RATES_HZ,
    TOKEN_MEL_RATIO,
)
from cosyvoice_common.contracts import (
    LLM_CAPACITY_PARAMETER,
    TOKEN2WAV_CACHE,
    LLMIn,
    LLMOut,
    SpeakerIn,
    SpeakerOut,
    Token2WavIn,
    Token2WavOut,
    TokenizerIn,
    TokenizerOut,
)
from cosyvoice_common.stages import LLM, SPEAKER, STAGE_NAMES, TOKEN2WAV, TOKENIZER

from cosyvoice_gateway import limits, metrics
from cosyvoice_gateway.schedule import ChunkSchedule, ScheduleConfig, chunk_ends
from cosyvoice_gateway.spk2info import (
    PromptFeatures,
    RegistryUnavailableError,
    SpeakerExistsError,
    SpeakerLimitError,
    Spk2InfoCache,
)
from cosyvoice_gateway.stage_client import MS_PER_S, CallTiming, StageError, Stages
from cosyvoice_gateway.textnorm import (
    DEFAULT_SPLIT,
    SplitConfig,
    has_markup,
    is_only_punctuation,
    is_zh,
    split_paragraph,
    text_normalize,
)

log = logging.getLogger(__name__)

ENDOFPROMPT = "<|endofprompt|>"
SPEAKER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
REQUEST_ID_PATTERN = re.compile(r"^[\x21-\x7e]*$")     # printable ASCII, no spaces: it goes into every log line
_SEED_MODULUS = 1 << 63                  # the llm stage takes seeds in [0, 2^63)
# Triton priority of a stream's first token2wav chunk (1 = highest; the model's config.pbtxt declares the
# levels, and a server without them ignores the value): time to first audio never waits behind long chunks.
FIRST_CHUNK_PRIORITY = 1


class RequestError(Exception):
    """Bad input or an unservable request; `code` is the gRPC status both RPCs (and HTTP) map from."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def validate_speed(speed: float, streaming: bool) -> None:
    """Speed is the reference's: offline only (the whole utterance's mel is stretched before the vocoder), within
    [MIN_SPEED, MAX_SPEED]. A front end calls this before the first byte goes out."""
    if not MIN_SPEED <= speed <= MAX_SPEED:    # also refuses NaN
        raise invalid(f"speed {speed} is outside the supported range [{MIN_SPEED}, {MAX_SPEED}]")
    if streaming and speed != SPEED_NEUTRAL:
        raise invalid(f"speed {speed} needs offline synthesis: streaming supports only speed {SPEED_NEUTRAL} "
                      f"(the whole utterance's mel is stretched, as in the reference)")


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    max_text_chars: int = 10_000
    # Every other string and the prompt upload are bounded too (cheap refusals, no unbounded log lines).
    max_prompt_text_chars: int = 2_000       # a 30 s prompt's transcript is a few hundred characters
    max_instruct_chars: int = 2_000
    max_id_chars: int = 128                  # speaker_id, request_id
    max_prompt_audio_bytes: int = PROMPT_MAX_BYTES
    max_speech_tokens: int = MAX_SPEECH_TOKENS   # per segment: 120 s of audio; more is an absurd request
    llm_max_seq_len: int = LLM_MAX_SEQ_LEN   # the llm stage's positions until its model config was read
    split: SplitConfig = DEFAULT_SPLIT       # spec 2.2 lengths (characters for zh, text tokens otherwise)
    default_temperature: float = 1.0
    default_top_p: float = 0.8
    default_top_k: int = 25
    schedule: ScheduleConfig = ScheduleConfig()

    def __post_init__(self) -> None:
        if min(self.max_text_chars, self.max_speech_tokens, self.max_prompt_text_chars, self.max_instruct_chars,
               self.max_id_chars, self.max_prompt_audio_bytes) < 1 or self.llm_max_seq_len < 2:
            raise ValueError(f"bad pipeline limits: {self}")


@dataclass(frozen=True, slots=True)
class SynthesisRequest:
    text: str
    speaker_id: str = ""
    prompt_audio: bytes = b""
    prompt_text: str = ""
    instruct: str = ""
    sample_rate_hz: int = 0                  # 0 = OUTPUT_SAMPLE_RATE_HZ
    request_id: str = ""
    temperature: float = 0.0                 # 0 = model default
    top_p: float = 0.0
    top_k: int = 0
    seed: int = 0                            # 0 = random (LLM sampling and the vocoder's source noise)
    min_speech_tokens: int = 0               # 0 = model rule
    max_speech_tokens: int = 0
    skip_cache: bool = False                 # recompute prompt features, neither read nor write the cache
    text_frontend: bool = False              # spec 2.2 normalisation of text and prompt_text (gRPC: off unless set)
    speed: float = SPEED_NEUTRAL             # offline only: `validate_speed`


@dataclass(slots=True)
class StageTiming:
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    calls: int = 0

    def add(self, call: CallTiming) -> None:
        self.queue_ms += call.queue_ms
        self.compute_ms += call.compute_ms
        self.calls += 1


@dataclass(slots=True)
class StageTimings:
    start_s: float = field(default_factory=time.perf_counter)   # request arrival
    # by stage name (cosyvoice_common.stages); the gRPC message has one field per stage under the same name
    per_stage: dict[str, StageTiming] = field(default_factory=lambda: {name: StageTiming() for name in STAGE_NAMES})
    cache_hit: bool = False
    first_chunk_ms: float = 0.0
    total_ms: float = 0.0
    speech_tokens: int = 0
    audio_seconds: float = 0.0
    segments_done: int = 0           # streaming: text segments fully spoken (progress for clients)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.start_s) * MS_PER_S

    def record(self, stage: str, call: CallTiming) -> None:
        self.per_stage[stage].add(call)
        metrics.observe_stage(stage, call.queue_ms, call.compute_ms)


@dataclass(frozen=True, slots=True)
class Segment:
    input_ids: np.ndarray        # int32, flat vocabulary
    min_tokens: int
    max_tokens: int
    seed: int                    # LLM sampling and token2wav source noise; [0, 2^63)


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    request_id: str
    sample_rate_hz: int
    voice: "asyncio.Future[PromptFeatures]"   # token2wav's prompt (mel, x-vector): may still be computing
    prompt_tokens_flat: np.ndarray   # int32[T], flow prompt tokens in the flat vocabulary
    segments: tuple[Segment, ...]
    temperature: float
    top_p: float
    top_k: int
    speed: float = SPEED_NEUTRAL
    # token2wav affinity of this request's streams (all segments share the prompt): random, so two requests that
    # reuse a client's request_id never share one
    stream_key: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """What the LLM needs of a prompt; known as soon as the tokenizer answers (the speaker stage may still run)."""
    speech_codes: np.ndarray    # int32[n], codes, cut to the mel frames the audio's length gives (spec 3.5)
    text_ids: np.ndarray        # int32[P]
    prompt_text: str
    voice: "asyncio.Future[PromptFeatures]"


def _resolved(features: PromptFeatures) -> "asyncio.Future[PromptFeatures]":
    future = asyncio.get_running_loop().create_future()
    future.set_result(features)
    return future


def _consume_exception(task: asyncio.Future) -> None:
    """A voice task nobody awaited any more (the request ended first) must not log 'never retrieved'."""
    if not task.cancelled():
        task.exception()


# --- text ----------------------------------------------------------------------------------------------
def target_segments(text: str, count_tokens: Callable[[str], int], text_frontend: bool, split: bool,
                    config: SplitConfig = DEFAULT_SPLIT) -> list[str]:
    """The target text as the segments the LLM speaks one by one (spec 2.2, `cosyvoice_gateway.textnorm`).

    `text_frontend`: `text_normalize` (normalise, then split unless `split` is false). Off: the text as
    given (stripped), one segment unless it is longer than `config.token_max_n` (characters for zh,
    `count_tokens` otherwise) and `split` is set, then `split_paragraph` cuts it, unnormalised, after
    terminators. `<|...|>` markup is never touched. Punctuation-only segments are dropped."""
    if text_frontend:
        out = text_normalize(text, count_tokens, split=split, config=config)
        segments = out if split else [out]
    else:
        text = text.strip()
        zh = is_zh(text)
        count = len if zh else count_tokens
        if not split or has_markup(text) or count(text) <= config.token_max_n:
            segments = [text]
        else:
            segments = [s.strip() for s in split_paragraph(text, count, zh, config)]
    return [s for s in segments if not is_only_punctuation(s)]


# --- prompt alignment (spec 3.5) ------------------------------------------------------------------------
def align_prompt(speech_ids_flat: np.ndarray, mel_frames: int) -> np.ndarray:
    """Codes the LLM and the flow see: n = min(mel_frames // 2, T) of them (the flow takes 2n mel frames).
    `mel_frames` follows from the 24 kHz length alone, so this needs no speaker-stage answer."""
    codes = np.asarray(speech_ids_flat, dtype=np.int32).reshape(-1) - SPEECH_ID_OFFSET
    return codes[: min(mel_frames // TOKEN_MEL_RATIO, codes.shape[0])].copy()


def speech_ids_from_llm(output_ids: np.ndarray) -> tuple[list[int], bool]:
    """Speech ids of one LLM response, and whether a stop id ended it (TRT-LLM may echo end_id)."""
    ids = []
    for token in np.asarray(output_ids).reshape(-1).tolist():
        if token >= FLAT_EOS1_ID:
            return ids, True
        if SPEECH_ID_OFFSET <= token < SPEECH_ID_OFFSET + SPEECH_CODEBOOK_SIZE:
            ids.append(token)
        # ids below the speech range (spec 8.3: possible with a mis-exported head) are dropped.
    return ids, False


def speech_token_bounds(req: SynthesisRequest, target_text_tokens: int, limit: int, room: int | None = None
                        ) -> tuple[int, int]:
    """Request bounds, else the model's rule (spec 4.4: 2x / 20x target text tokens), capped at `limit` and
    at `room` (positions the input leaves in the llm stage; `cosyvoice_gateway.limits`)."""
    return limits.speech_token_bounds(req.min_speech_tokens, req.max_speech_tokens, target_text_tokens, limit,
                                      room)


class Pipeline:
    def __init__(self, config: PipelineConfig, stages: Stages, cache: Spk2InfoCache,
                 encode_text: Callable[[str], Sequence[int]]) -> None:
        self.config = config
        self.stages = stages
        self.cache = cache
        self.encode_text = encode_text
        self._background: set[asyncio.Task] = set()   # cache writes that must not delay audio

    def count_tokens(self, text: str) -> int:
        """Text-tokenizer length: spec 2.2's length unit for non-zh text."""
        return len(self.encode_text(text))

    def normalize_prompt_text(self, prompt_text: str, text_frontend: bool) -> str:
        """Spec 2.2: a zero-shot transcript is normalised like the target text, never split."""
        if not text_frontend or not prompt_text:
            return prompt_text
        return text_normalize(prompt_text, self.count_tokens, split=False, config=self.config.split)

    def llm_capacity(self) -> int:
        """Positions per llm slot: the served llm model's `max_seq_len` parameter, else the config default."""
        return self.stages[LLM].int_parameter(LLM_CAPACITY_PARAMETER) or self.config.llm_max_seq_len

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # --- validation ------------------------------------------------------------------------------
    def validate_voice_fields(self, speaker_id: str, audio: bytes, prompt_text: str) -> None:
        """Bounds of the voice fields (synthesis and registration alike), before any decoding."""
        cfg = self.config
        if len(speaker_id) > cfg.max_id_chars:
            raise invalid(f"speaker_id is {len(speaker_id)} characters; the limit is {cfg.max_id_chars}")
        if len(audio) > cfg.max_prompt_audio_bytes:
            raise invalid(f"prompt_audio is {len(audio)} bytes; the limit is {cfg.max_prompt_audio_bytes}")
        if len(prompt_text) > cfg.max_prompt_text_chars:
            raise invalid(f"prompt_text is {len(prompt_text)} characters; the limit is {cfg.max_prompt_text_chars}")

    def _validate(self, req: SynthesisRequest) -> None:
        self.validate_voice_fields(req.speaker_id, req.prompt_audio, req.prompt_text)
        if len(req.instruct) > self.config.max_instruct_chars:
            raise invalid(f"instruct is {len(req.instruct)} characters; the limit is {self.config.max_instruct_chars}")
        if len(req.request_id) > self.config.max_id_chars or not REQUEST_ID_PATTERN.match(req.request_id):
            raise invalid(f"request_id must be at most {self.config.max_id_chars} printable ASCII characters "
                          f"without spaces")
        if not req.text.strip():
            raise invalid("text is empty")
        if len(req.text) > self.config.max_text_chars:
            raise invalid(f"text is {len(req.text)} characters; the limit is {self.config.max_text_chars}")
        if is_only_punctuation(req.text):
            raise invalid("text has nothing to speak: only punctuation, symbols or emoji")
        if not req.speaker_id and not req.prompt_audio:
            raise invalid("no voice: give speaker_id or prompt_audio")
        if req.speaker_id and req.prompt_audio:
            raise invalid("give either speaker_id or prompt_audio, not both")
        if req.sample_rate_hz and req.sample_rate_hz not in SUPPORTED_OUTPUT_RATES_HZ:
            raise invalid(f"sample_rate {req.sample_rate_hz} is not supported; use 0 or one of "
                          f"{SUPPORTED_OUTPUT_RATES_HZ}")
        validate_speed(req.speed, streaming=False)
        lo, hi, limit = req.min_speech_tokens, req.max_speech_tokens, self.config.max_speech_tokens
        if lo < 0 or hi < 0:
            raise invalid("min_speech_tokens and max_speech_tokens must be >= 0")
        if hi and lo > hi:
            raise invalid(f"min_speech_tokens {lo} > max_speech_tokens {hi}")
        if max(lo, hi) > limit:
            raise invalid(f"speech token bound {max(lo, hi)} exceeds the limit {limit}")
        capacity = self.llm_capacity()
        if max(lo, hi) + limits.LLM_FRAME_POSITIONS + 1 > capacity:
            raise invalid(f"speech token bound {max(lo, hi)} does not fit the llm stage's max_seq_len {capacity} "
                          f"(input ids + speech tokens)")
        # Written so that NaN fails too.
        if not (0 <= req.temperature < float("inf") and 0 <= req.top_p <= 1 and req.top_k >= 0):
            raise invalid("sampling: temperature >= 0, 0 <= top_p <= 1, top_k >= 0 required")
        if req.seed < 0:
            raise invalid(f"sampling: seed must be >= 0 (0 = random), got {req.seed}")

    # --- prompt features ---------------------------------------------------------------------------
    async def _decode_prompt(self, audio: bytes) -> PromptAudio:
        try:
            return await asyncio.to_thread(prepare_prompt, audio)   # resampling is CPU work
        except (AudioDecodeError, AudioValidationError) as exc:
            raise invalid(f"prompt_audio: {exc}") from exc

    async def prompt_features(self, audio: bytes, prompt_text: str, request_id: str, timings: StageTimings,
                              skip_cache: bool = False) -> PromptFeatures:
        """All features of an uploaded prompt (speaker registration): cache, else tokenizer + speaker."""
        return await (await self.prompt_tokens(audio, prompt_text, request_id, timings, skip_cache)).voice

    async def prompt_tokens(self, audio: bytes, prompt_text: str, request_id: str, timings: StageTimings,
                            skip_cache: bool = False) -> PromptTokens:
        """The LLM's share of an uploaded prompt as soon as it exists; token2wav's share as a future.

        From the spk2info cache both are there at once. Otherwise the tokenizer and the speaker stage start
        together and this returns when the tokenizer answers: the LLM needs only the speech tokens, cut to
        half the prompt mel's frame count, and that count follows from the audio's length alone (the speaker
        stage's mel has floor(24 kHz samples / hop) frames). The speaker stage finishes beside the LLM; the
        first token2wav call awaits it. `skip_cache` (benchmarks' cache-off row): compute, leave the cache alone.
        """
        prompt = await self._decode_prompt(audio)
        key = None
        if not skip_cache:
            key = self.cache.prompt_key(prompt.wav_16k, prompt_text)
            cached = await self.cache.get(key)
            metrics.CACHE_LOOKUPS.labels(result="hit" if cached else "miss").inc()
            if cached is not None:
                timings.cache_hit = True
                return PromptTokens(cached.speech_codes, cached.text_ids, cached.prompt_text, _resolved(cached))
        wav_len = np.array([prompt.wav_16k.shape[0]], np.int32)
        wav_24k_len = np.array([prompt.wav_24k.shape[0]], np.int32)
        speaker = asyncio.ensure_future(self.stages[SPEAKER].infer(
            {SpeakerIn.REFERENCE_WAV: prompt.wav_16k, SpeakerIn.REFERENCE_WAV_LEN: wav_len,
             SpeakerIn.REFERENCE_WAV_24K: prompt.wav_24k, SpeakerIn.REFERENCE_WAV_24K_LEN: wav_24k_len},
            [SpeakerOut.PROMPT_SPK_EMBEDDING, SpeakerOut.PROMPT_SPEECH_FEAT], request_id))
        try:
            tok_out, tok_timing = await self.stages[TOKENIZER].infer(
                {TokenizerIn.REFERENCE_WAV: prompt.wav_16k, TokenizerIn.REFERENCE_WAV_LEN: wav_len},
                [TokenizerOut.PROMPT_SPEECH_TOKENS], request_id)
        except BaseException:
            speaker.cancel()
            speaker.add_done_callback(_consume_exception)
            raise
        timings.record(TOKENIZER, tok_timing)
        codes = align_prompt(tok_out[TokenizerOut.PROMPT_SPEECH_TOKENS], prompt.wav_24k.shape[0] // MEL_HOP_SAMPLES)
        if codes.shape[0] == 0:
            speaker.cancel()
            speaker.add_done_callback(_consume_exception)
            raise invalid("prompt_audio gave no speech tokens (too short)")
        text_ids = np.asarray(self.encode_text(prompt_text) if prompt_text else [], np.int32)

        async def finish() -> PromptFeatures:
            spk_out, spk_timing = await speaker
            timings.record(SPEAKER, spk_timing)
            mel = np.asarray(spk_out[SpeakerOut.PROMPT_SPEECH_FEAT], np.float32)
            need = TOKEN_MEL_RATIO * codes.shape[0]
            if mel.shape[0] < need:
                raise RequestError(grpc.StatusCode.INTERNAL,
                                   f"speaker stage gave {mel.shape[0]} prompt mel frames, {need} expected from "
                                   f"{prompt.wav_24k.shape[0]} samples at 24 kHz")
            features = PromptFeatures(
                speech_codes=codes, speech_feat=np.ascontiguousarray(mel[:need]),
                spk_embedding=np.ascontiguousarray(spk_out[SpeakerOut.PROMPT_SPK_EMBEDDING], np.float32).reshape(-1),
                text_ids=text_ids, prompt_text=prompt_text, prompt_seconds=prompt.duration_s)
            if key is not None:
                task = asyncio.create_task(self.cache.put(key, features))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return features

        voice = asyncio.ensure_future(finish())
        voice.add_done_callback(_consume_exception)
        return PromptTokens(codes, text_ids, prompt_text, voice)

    async def _speaker_features(self, speaker_id: str) -> PromptFeatures:
        try:
            features = await self.cache.get_speaker(speaker_id)
        except RegistryUnavailableError as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        if features is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"speaker {speaker_id!r} is not registered")
        return features

    async def register_speaker(self, speaker_id: str, audio: bytes, prompt_text: str, timings: StageTimings,
                               text_frontend: bool = False, replace: bool = False):
        self.validate_voice_fields(speaker_id, audio, prompt_text)
        if not SPEAKER_ID_PATTERN.match(speaker_id):
            raise invalid(f"speaker_id {speaker_id!r} must match {SPEAKER_ID_PATTERN.pattern}")
        if not audio:
            raise invalid("prompt_audio is empty")
        prompt_text = self.normalize_prompt_text(prompt_text, text_frontend)
        features = await self.prompt_features(audio, prompt_text, f"register-{speaker_id}", timings)
        try:
            return await self.cache.register_speaker(speaker_id, features, replace=replace)
        except SpeakerLimitError as exc:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except SpeakerExistsError as exc:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                               f"speaker {speaker_id!r} is already registered; set replace to overwrite it") from exc
        except RegistryUnavailableError as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc

    # --- request preparation -----------------------------------------------------------------------
    async def prepare(self, req: SynthesisRequest, timings: StageTimings) -> PreparedRequest:
        self._validate(req)
        # Explicit bounds are for the whole text (the benchmark forces exact lengths): no splitting then.
        explicit = bool(req.min_speech_tokens or req.max_speech_tokens)
        texts = target_segments(req.text, self.count_tokens, req.text_frontend, split=not explicit,
                                config=self.config.split)
        if not texts:
            raise invalid("text has nothing to speak after normalisation")
        request_id = req.request_id or uuid.uuid4().hex
        if req.speaker_id:
            features = await self._speaker_features(req.speaker_id)
            timings.cache_hit = True
            prompt = PromptTokens(features.speech_codes, features.text_ids, features.prompt_text, _resolved(features))
        else:
            prompt_text = self.normalize_prompt_text(req.prompt_text, req.text_frontend)
            prompt = await self.prompt_tokens(req.prompt_audio, prompt_text, request_id, timings,
                                              skip_cache=req.skip_cache)

        # Mode (spec 2.3): instruct2 = I ++ X, no LLM speech prompt; zero-shot = P_txt ++ X + S_p;
        # cross-lingual (no transcript) = X only.
        if req.instruct:
            instruct = req.instruct if req.instruct.endswith(ENDOFPROMPT) else req.instruct + ENDOFPROMPT
            prefix_ids, llm_prompt = list(self.encode_text(instruct)), np.zeros(0, np.int32)
        elif prompt.prompt_text:
            prefix_ids, llm_prompt = prompt.text_ids.tolist(), prompt.speech_codes + SPEECH_ID_OFFSET
        else:
            prefix_ids, llm_prompt = [], np.zeros(0, np.int32)

        base_seed = req.seed or secrets.randbits(63)
        segments = []
        capacity = self.llm_capacity()
        fixed_positions = limits.LLM_FRAME_POSITIONS + len(prefix_ids) + llm_prompt.shape[0]
        if not explicit:
            texts = limits.fit_segments(texts, self.count_tokens, fixed_positions, capacity)
        for i, text in enumerate(texts):
            target_ids = list(self.encode_text(text))
            ids = [FLAT_SOS_ID, *prefix_ids, *target_ids, FLAT_TASK_ID]
            input_ids = np.concatenate([np.asarray(ids, np.int32), llm_prompt.astype(np.int32)])
            try:
                min_tokens, max_tokens = speech_token_bounds(req, len(target_ids), self.config.max_speech_tokens,
                                                             room=capacity - input_ids.shape[0])
            except limits.LimitError as exc:
                raise invalid(f"{input_ids.shape[0]} input ids (prompt and text) + speech tokens exceed the llm "
                              f"stage's max_seq_len {capacity}: {exc}") from exc
            segments.append(Segment(input_ids, min_tokens, max_tokens, (base_seed + i) % _SEED_MODULUS))
        return PreparedRequest(
            request_id=request_id,
            sample_rate_hz=req.sample_rate_hz or OUTPUT_SAMPLE_RATE_HZ,
            voice=prompt.voice,
            prompt_tokens_flat=(prompt.speech_codes + SPEECH_ID_OFFSET).astype(np.int32),
            segments=tuple(segments),
            temperature=req.temperature or self.config.default_temperature,
            top_p=req.top_p or self.config.default_top_p,
            top_k=req.top_k or self.config.default_top_k,
            speed=req.speed,
        )

    # --- stage calls -------------------------------------------------------------------------------
    def _llm_tensors(self, prepared: PreparedRequest, segment: Segment, streaming: bool) -> dict[str, np.ndarray]:
        one = lambda value, dtype: np.array([value], dtype)  # noqa: E731 - every scalar is a [1] tensor
        tensors = {
            LLMIn.INPUT_IDS: segment.input_ids,
            LLMIn.INPUT_LENGTHS: one(segment.input_ids.shape[0], np.int32),
            LLMIn.REQUEST_OUTPUT_LEN: one(segment.max_tokens, np.int32),
            LLMIn.END_ID: one(FLAT_EOS1_ID, np.int32),
            LLMIn.PAD_ID: one(FLAT_EOS1_ID, np.int32),
            LLMIn.STREAMING: one(streaming, np.bool_),
            LLMIn.MIN_LENGTH: one(segment.min_tokens, np.int32),
            LLMIn.RUNTIME_TOP_K: one(prepared.top_k, np.int32),
            LLMIn.RUNTIME_TOP_P: one(prepared.top_p, np.float32),
            LLMIn.TEMPERATURE: one(prepared.temperature, np.float32),
            LLMIn.RANDOM_SEED: one(segment.seed, np.uint64),
        }
        # Our llm stage can hold tokens back until the chunk schedule needs them (one response per chunk instead
        # of one per token); the stage client leaves it out for a model that does not declare it (TensorRT-LLM).
        if streaming:
            tensors[LLMIn.STREAM_BOUNDARIES] = np.asarray(chunk_ends(segment.max_tokens, self.config.schedule),
                                                          np.int32)
        return tensors

    async def _prompt_tensors(self, prepared: PreparedRequest) -> dict[str, np.ndarray]:
        features = await prepared.voice   # the speaker stage may still be running beside the LLM
        return {
            Token2WavIn.PROMPT_SPEECH_TOKENS: prepared.prompt_tokens_flat,
            Token2WavIn.PROMPT_SPEECH_FEAT: features.speech_feat,
            Token2WavIn.PROMPT_SPK_EMBEDDING: features.spk_embedding,
        }

    async def _token2wav(self, prepared: PreparedRequest, segment: Segment, tokens: np.ndarray,
                         timings: StageTimings, extra: dict[str, np.ndarray], first: bool = False
                         ) -> dict[str, np.ndarray]:
        """One token2wav call; `seed` = the segment's seed (the stage mixes in each chunk's token_offset), so
        a seeded request's audio repeats exactly. A stream's first chunk goes ahead of queued later chunks
        (Triton priority levels of the token2wav model). Streaming calls carry the request's affinity key."""
        streaming = Token2WavIn.TOKEN_OFFSET in extra
        outputs = [Token2WavOut.WAVEFORM, *(TOKEN2WAV_CACHE if streaming else ())]
        out, call = await self.stages[TOKEN2WAV].infer(
            {Token2WavIn.TARGET_SPEECH_TOKENS: tokens, **await self._prompt_tensors(prepared),
             Token2WavIn.SEED: np.array([segment.seed], np.uint64), **extra}, outputs, prepared.request_id,
            priority=FIRST_CHUNK_PRIORITY if first else 0, affinity=prepared.stream_key if streaming else None)
        timings.record(TOKEN2WAV, call)
        return out

    async def _prefill(self, prepared: PreparedRequest) -> None:
        """The prompt's blocks into the state cache of the replica that will serve the stream, while the LLM
        decodes. Only saves work: a failure (an older token2wav, a replica going down) is logged and ignored. Off
        the path to audio, so it is in the stage metrics but not in the request's timings (which add up the
        calls its audio waited for)."""
        try:
            _, call = await self.stages[TOKEN2WAV].infer(
                {Token2WavIn.TARGET_SPEECH_TOKENS: np.zeros(0, np.int32), **await self._prompt_tensors(prepared),
                 Token2WavIn.PREFILL: np.array([True])}, [Token2WavOut.WAVEFORM], prepared.request_id,
                priority=FIRST_CHUNK_PRIORITY, affinity=prepared.stream_key)
            metrics.observe_stage(TOKEN2WAV, call.queue_ms, call.compute_ms)
        except Exception as exc:  # noqa: BLE001 - only saves work; the stream's own calls report real failures
            log.debug("request %s: token2wav prefill skipped: %s", prepared.request_id, exc)

    async def _read_llm(self, prepared: PreparedRequest, segment: Segment, streaming: bool,
                        tokens: list[int], arrived: asyncio.Event, timings: StageTimings) -> None:
        """Append the LLM's speech ids to `tokens` as they stream in; set `arrived` after each response."""
        call = CallTiming()
        try:
            async for out in self.stages[LLM].stream(self._llm_tensors(prepared, segment, streaming),
                                                     [LLMOut.OUTPUT_IDS], prepared.request_id, call):
                ids, stopped = speech_ids_from_llm(out[LLMOut.OUTPUT_IDS])
                tokens.extend(ids)
                arrived.set()
                if stopped:
                    break
        finally:
            timings.record(LLM, call)
            arrived.set()

    async def _segment_stream(self, prepared: PreparedRequest, segment: Segment, timings: StageTimings
                              ) -> AsyncIterator[np.ndarray]:
        tokens: list[int] = []
        arrived = asyncio.Event()
        reader = asyncio.create_task(self._read_llm(prepared, segment, True, tokens, arrived, timings))
        schedule = ChunkSchedule(self.config.schedule)
        cache: dict[str, np.ndarray] = {}
        try:
            while not schedule.done:
                await arrived.wait()
                arrived.clear()
                if reader.done():
                    reader.result()          # re-raise an LLM failure here, in the consumer
                while (chunk := schedule.next_chunk(len(tokens), reader.done())) is not None:
                    out = await self._token2wav(
                        prepared, segment, np.asarray(tokens[: chunk.end], np.int32), timings,
                        {Token2WavIn.TOKEN_OFFSET: np.array([chunk.token_offset], np.int32),
                         Token2WavIn.FINALIZE: np.array([chunk.finalize], np.bool_), **cache},
                        first=chunk.index == 0 and not chunk.finalize)
                    cache = {name: out[name] for name in TOKEN2WAV_CACHE}   # sent back under the same names
                    yield out[Token2WavOut.WAVEFORM]
            timings.speech_tokens += len(tokens)
        finally:
            if not reader.done():            # consumer left early: stop generating in the llm stage
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def stream(self, prepared: PreparedRequest, timings: StageTimings) -> AsyncIterator[np.ndarray]:
        """Yield float32 24 kHz chunks as they are produced, segment after segment."""
        validate_speed(prepared.speed, streaming=True)
        prefill = asyncio.create_task(self._prefill(prepared))
        try:
            for segment in prepared.segments:
                async with contextlib.aclosing(self._segment_stream(prepared, segment, timings)) as chunks:
                    async for wav in chunks:
                        if wav.size == 0:
                            continue
                        if not timings.first_chunk_ms:
                            timings.first_chunk_ms = timings.elapsed_ms()
                        timings.audio_seconds += wav.shape[0] / OUTPUT_SAMPLE_RATE_HZ
                        yield wav
                timings.segments_done += 1
        finally:
            if not prefill.done():      # its stage call is left to finish (stage_client); stop waiting for it
                prefill.cancel()
            await asyncio.gather(prefill, return_exceptions=True)
            self.stages[TOKEN2WAV].forget(prepared.stream_key)
        timings.total_ms = timings.elapsed_ms()

    async def synthesize(self, prepared: PreparedRequest, timings: StageTimings) -> np.ndarray:
        """Offline: per segment, collect all tokens, then one token2wav call (no token_offset)."""
        pieces = []
        for segment in prepared.segments:
            tokens: list[int] = []
            await self._read_llm(prepared, segment, False, tokens, asyncio.Event(), timings)
            timings.speech_tokens += len(tokens)
            if tokens:
                # sent only when not 1: the stage client refuses it to a token2wav replica that cannot apply it
                speed = ({} if prepared.speed == SPEED_NEUTRAL
                         else {Token2WavIn.SPEED: np.array([prepared.speed], np.float32)})
                out = await self._token2wav(prepared, segment, np.asarray(tokens, np.int32), timings, speed)
                pieces.append(out[Token2WavOut.WAVEFORM].astype(np.float32, copy=False))
        wav = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        timings.total_ms = timings.first_chunk_ms = timings.elapsed_ms()
        timings.audio_seconds = wav.shape[0] / OUTPUT_SAMPLE_RATE_HZ
        return wav


def stage_error_to_request_error(exc: StageError) -> RequestError:
    if exc.timed_out:
        return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    if exc.unavailable:
        return RequestError(grpc.StatusCode.UNAVAILABLE, str(exc))
    if exc.invalid:
        return RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    return RequestError(grpc.StatusCode.INTERNAL, str(exc))
