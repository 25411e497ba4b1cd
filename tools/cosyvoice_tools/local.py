"""In-process stages: the gateway `Pipeline`, unchanged, over the stage packages called directly.

No tritonserver, no gRPC, no Redis needed: the second line of the benchmark (`bench --engine-only`),
and the recorder of real stage inputs for `cosyvoice_tools.stage_load`.

    local = LocalPipeline.create("models/cosyvoice2-tiny", "cpu")      # or "cuda"
    chunks, timings = await local.synthesize(SynthesisRequest(...))     # cosyvoice_tools.bench.EngineDriver
    await local.close()

Each local stage answers the two calls `Pipeline` makes on a `StageClient` with the same tensors:
`infer(tensors, outputs, request_id) -> (outputs, CallTiming)` and, for the LLM,
`stream(tensors, outputs, request_id, timing)` (an async generator of `output_ids`).

- tokenizer, speaker: a `_Batcher` per stage, like Triton's dynamic batcher: calls that arrive while a
  batch runs wait and form the next batch, run on the stage's own thread. queue_ms = waiting for the batch
  to start, compute_ms = the batch's run time.
- token2wav: the stage's own `Token2WavEngine` (its loop thread admits calls between Euler steps), requests
  parsed by the stage's own parser. queue_ms = waiting for admission, compute_ms = admission to answer.
- llm: the stage's own engine and request parser (`cosyvoice_llm.engine.build_engine`,
  `cosyvoice_llm.request.parse_request`) with the stage's settings, but `max_batch` slots (at least 32 on
  cuda); the engine's callbacks are bridged into one asyncio queue per request. Closing the stream early
  cancels the request in the engine.
- prompt cache: an in-memory dict (`MemorySpk2Info`, honours `skip_cache` through the pipeline), or
  the real Redis cache when `redis_url` is given.

`record_dir`: every stage call's input tensors are written to `<record_dir>/<stage>/<n>.npz` in the
stage's Triton contract (no batch dim), the inputs `stage_load` replays against a stage server.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from cosyvoice_common.constants import (
    MEL_BINS,
    SPEECH_ID_OFFSET,
)
from cosyvoice_common.contracts import LLM_CAPACITY_PARAMETER
from cosyvoice_common.errors import InvalidRequestError
from cosyvoice_common.stage_params import LLMParams, StageParams
from cosyvoice_common.stages import LLM, SPEAKER, TOKEN2WAV, TOKENIZER
from cosyvoice_gateway.pipeline import (
    Pipeline,
    PipelineConfig,
    StageTimings,
    SynthesisRequest,
)
from cosyvoice_gateway.spk2info import (
    PromptFeatures,
    SpeakerInfo,
    Spk2InfoCache,
    Spk2InfoConfig,
)
from cosyvoice_gateway.stage_client import MS_PER_S, CallTiming, StageError, Stages

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
_LLM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
    return np.asarray(value)


class _Recorder:
    """Writes each stage call's inputs as `<dir>/<stage>/<n>.npz` (Triton contract shapes)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._counters: dict[str, itertools.count] = {}
        self._lock = threading.Lock()

    def record(self, stage: str, tensors: Mapping[str, object]) -> None:
        with self._lock:
            n = next(self._counters.setdefault(stage, itertools.count()))
        arrays = {}
        for name, value in tensors.items():
            array = _as_numpy(value)
            if name == "cache_mel":          # device cache [1, 80, F] -> contract [80, F]
                array = array.reshape(MEL_BINS, -1)
            elif name in ("cache_source", "cache_speech"):
                array = array.reshape(-1)
            arrays[name] = array
        out = self.root / stage
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / f"{n:05d}.npz", **arrays)


# --- batching executor ---------------------------------------------------------------------------------
@dataclass(slots=True)
class _Pending:
    item: object
    future: asyncio.Future
    priority: int = 0          # as Triton's: 1 is the highest level, 0 the default (lowest here)
    enqueued_s: float = field(default_factory=time.perf_counter)


class _Batcher:
    """Calls that arrive while a batch runs form the next batch (at most `max_batch`), run on one thread.

    `run_batch(items) -> list[result | Exception]`, one entry per item: a failure answers only its item."""

    def __init__(self, name: str, run_batch: Callable[[list], list], max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"{name}: max_batch must be >= 1")
        self.name = name
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._pending: list[_Pending] = []
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"local-{name}")
        self.batches = 0
        self.items = 0

    async def submit(self, item, priority: int = 0) -> tuple[object, CallTiming]:
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future(), priority)
        self._pending.append(pending)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await pending.future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            # prioritised calls (a stream's first chunk) first, arrival order otherwise (a stable sort)
            self._pending.sort(key=lambda p: 0 if p.priority > 0 else 1)
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in batch])
            except Exception as exc:  # noqa: BLE001 - the whole batch failed: each caller gets the error
                results = [exc] * len(batch)
            compute_ms = (time.perf_counter() - start) * MS_PER_S
            self.batches += 1
            self.items += len(batch)
            for p, result in zip(batch, results, strict=True):
                if p.future.done():      # the caller was cancelled
                    continue
                if isinstance(result, Exception):
                    p.future.set_exception(result)
                else:
                    p.future.set_result((result, CallTiming((start - p.enqueued_s) * MS_PER_S, compute_ms)))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _per_item(fn: Callable[[object], object]) -> Callable[[list], list]:
    def run(items: list) -> list:
        out = []
        for item in items:
            try:
                out.append(fn(item))
            except Exception as exc:  # noqa: BLE001 - per item
                out.append(exc)
        return out
    return run


class LocalStage:
    """Base of the in-process stages: the `StageClient` surface `Pipeline` and `Stages` use."""

    name = ""

    def __init__(self, recorder: _Recorder | None = None) -> None:
        self.recorder = recorder

    async def check_ready(self) -> bool:
        return True

    def int_parameter(self, name: str) -> int | None:
        """A served model's config parameter (`StageClient.int_parameter`): in process, none is declared."""
        return None

    async def close(self) -> None:
        return None

    def _record(self, tensors: Mapping[str, object]) -> None:
        if self.recorder is not None:
            self.recorder.record(self.name, tensors)


class _BatchedStage(LocalStage):
    batcher: _Batcher

    async def infer(self, tensors: Mapping[str, np.ndarray], outputs: Sequence[str], request_id: str = "",
                    priority: int = 0) -> tuple[dict[str, np.ndarray], CallTiming]:
        self._record(tensors)
        try:
            out, timing = await self.batcher.submit(dict(tensors), priority)
        except StageError:
            raise
        except InvalidRequestError as exc:
            raise StageError(self.name, f"InvalidRequestError: {exc}", invalid=True) from exc
        except Exception as exc:  # noqa: BLE001 - same surface as a failed Triton call
            raise StageError(self.name, f"{type(exc).__name__}: {exc}") from exc
        return {name: out[name] for name in outputs}, timing

    async def close(self) -> None:
        self.batcher.close()


class LocalTokenizer(_BatchedStage):
    name = "tokenizer"

    def __init__(self, model_dir: Path, device: str, backend: str, max_batch: int,
                 recorder: _Recorder | None = None) -> None:
        from cosyvoice_tokenizer import SpeechTokenizer

        super().__init__(recorder)
        self.tokenizer = SpeechTokenizer(model_dir, backend, device)
        self.batcher = _Batcher(self.name, self._run, max_batch)

    def _run(self, items: list[dict]) -> list:
        from cosyvoice_tokenizer.request import parse_prompt

        try:
            codes = self.tokenizer.tokenize([parse_prompt(t) for t in items])
        except Exception:  # noqa: BLE001 - isolate the culprit, as the Triton model does
            if len(items) == 1:
                raise
            return _per_item(lambda t: self._run([t])[0])(items)
        return [{"prompt_speech_tokens": c.astype(np.int32) + np.int32(SPEECH_ID_OFFSET)} for c in codes]


class LocalSpeaker(_BatchedStage):
    name = "speaker"

    def __init__(self, model_dir: Path, device: str, backend: str, max_batch: int,
                 recorder: _Recorder | None = None) -> None:
        from cosyvoice_speaker import SpeakerEncoder

        super().__init__(recorder)
        self.device = device
        self.encoder = SpeakerEncoder(model_dir, backend, device)
        self.batcher = _Batcher(self.name, self._run, max_batch)

    def _mel(self, wav_24k: np.ndarray | None) -> np.ndarray:
        from cosyvoice_speaker.features import prompt_mel

        if wav_24k is None:
            return np.zeros((0, MEL_BINS), np.float32)
        return prompt_mel(torch.from_numpy(wav_24k.copy()).to(self.device)).float().cpu().numpy()

    def _run(self, items: list[dict]) -> list:
        from cosyvoice_speaker.request import parse_speaker_request

        try:
            parsed = [parse_speaker_request(t) for t in items]
            mels = [self._mel(p.wav_24k) for p in parsed]
            embeddings = np.asarray(self.encoder.embed([p.wav_16k for p in parsed]), np.float32)
        except Exception:  # noqa: BLE001
            if len(items) == 1:
                raise
            return _per_item(lambda t: self._run([t])[0])(items)
        return [{"prompt_spk_embedding": embeddings[i].reshape(-1), "prompt_speech_feat": mels[i]}
                for i in range(len(items))]


class LocalToken2Wav(LocalStage):
    """`Token2WavEngine` in this process, its loop on its own thread, requests parsed by the stage's own parser
    (`cosyvoice_token2wav.request`), exactly as the Triton model does. The vocoder overlap cache stays a tensor
    between chunks (no copies); affinity keys are moot (one engine)."""

    name = "token2wav"

    def __init__(self, model_dir: Path, device: str, flow_dtype: torch.dtype, max_batch: int,
                 recorder: _Recorder | None = None, stream_cache_gib: str = "auto") -> None:
        from cosyvoice_common.stage_params import stream_cache_bytes
        from cosyvoice_token2wav.engine import Token2WavEngine

        super().__init__(recorder)
        self.device = torch.device(device)
        self.engine = Token2WavEngine(model_dir, device, flow_dtype, max_batch=max_batch,
                                      cache_bytes=stream_cache_bytes(stream_cache_gib, str(device)),
                                      use_cuda_graphs=self.device.type == "cuda")
        self.engine.capture_graphs()
        self.engine.start()

    @staticmethod
    def _outputs(request, result, outputs: Sequence[str]) -> dict[str, object]:
        out: dict[str, object] = {"waveform": result.waveform.detach().float().reshape(-1).numpy()}
        cache = result.cache
        if cache is None:
            out.update(cache_mel=np.zeros((MEL_BINS, 0), np.float32), cache_source=np.zeros(0, np.float32),
                       cache_speech=np.zeros(0, np.float32))
        else:
            out.update(cache_mel=cache.mel[0], cache_source=cache.source.reshape(-1), cache_speech=cache.speech.reshape(-1))
        return {name: out[name] for name in outputs}

    async def infer(self, tensors: Mapping[str, np.ndarray], outputs: Sequence[str], request_id: str = "",
                    priority: int = 0, affinity: str | None = None) -> tuple[dict[str, np.ndarray], CallTiming]:
        from cosyvoice_token2wav.request import parse_chunk_request

        self._record(tensors)
        try:
            request = parse_chunk_request(tensors)
        except InvalidRequestError as exc:
            raise StageError(self.name, f"InvalidRequestError: {exc}", invalid=True) from exc
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def on_done(result, stats) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result((result, stats)))

        self.engine.submit(request, on_done)
        result, stats = await done
        if result.error is not None:
            invalid = isinstance(result.error, InvalidRequestError)
            raise StageError(self.name, f"{'InvalidRequestError: ' if invalid else ''}{result.error}", invalid=invalid)
        return self._outputs(request, result, outputs), CallTiming(stats.wait_ms, stats.compute_ms)

    def forget(self, affinity: str) -> None:
        return None

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.stop)


class LocalLLM(LocalStage):
    """The llm stage in this process: its engine (`cosyvoice_llm.engine.build_engine`) and its request parser
    (`cosyvoice_llm.request`), with the engine's callbacks (engine thread) bridged into one asyncio queue per
    request. Unlike the Triton model it answers every engine output at once: no grouping at `stream_boundaries`,
    which saves IPC round trips that do not exist here."""

    name = "llm"

    def __init__(self, model_dir: Path, device: str, settings: LLMParams, recorder: _Recorder | None = None) -> None:
        from cosyvoice_llm.engine import build_engine

        super().__init__(recorder)
        self.engine = build_engine(model_dir, device, settings)
        self.engine.start()
        self._ids = itertools.count()

    def int_parameter(self, name: str) -> int | None:
        return self.engine.settings.max_seq_len if name == LLM_CAPACITY_PARAMETER else None

    async def stream(self, tensors: Mapping[str, np.ndarray], outputs: Sequence[str], request_id: str = "",
                     timing: CallTiming | None = None) -> AsyncIterator[dict[str, np.ndarray]]:
        from cosyvoice_llm.request import parse_request
        from cosyvoice_llm.sequence import FinishReason

        timing = timing if timing is not None else CallTiming()
        self._record(tensors)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        engine_id = f"{request_id or 'llm'}#{next(self._ids)}"
        start = time.perf_counter()
        finished = False
        try:
            def deliver(out) -> None:      # engine thread
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, out)
                except RuntimeError:       # the loop is gone (shutdown): nobody waits for this output
                    pass

            try:
                self.engine.submit(parse_request(tensors, engine_id).request, deliver)
            except InvalidRequestError as exc:
                raise StageError(self.name, f"InvalidRequestError: {exc}", invalid=True) from exc
            while True:
                out = await queue.get()
                if out.finished:
                    finished = True
                    if out.finish_reason is FinishReason.ERROR:
                        raise StageError(self.name, out.error or "llm failed")
                if out.tokens:
                    flat = np.asarray(out.tokens, np.int32).reshape(1, -1) + np.int32(SPEECH_ID_OFFSET)
                    yield {"output_ids": flat, "sequence_length": np.array([flat.shape[1]], np.int32)}
                if finished:
                    return
        finally:
            timing.compute_ms += (time.perf_counter() - start) * MS_PER_S
            if not finished:
                self.engine.cancel(engine_id)

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.stop)


# --- prompt cache ----------------------------------------------------------------------------------------
class MemorySpk2Info(Spk2InfoCache):
    """Spk2InfoCache in a dict: the same keys and interface, no Redis (engine-only benchmark)."""

    def __init__(self, model_revision: str) -> None:
        super().__init__(Spk2InfoConfig(url="", model_revision=model_revision))
        self._prompts: dict[str, PromptFeatures] = {}
        self._speakers: dict[str, PromptFeatures] = {}

    async def get(self, key: str) -> PromptFeatures | None:
        return self._prompts.get(key)

    async def put(self, key: str, features: PromptFeatures) -> bool:
        self._prompts[key] = features
        return True

    async def register_speaker(self, name: str, features: PromptFeatures) -> SpeakerInfo:
        self._speakers[name] = features
        return SpeakerInfo(name, features.prompt_text, int(features.speech_codes.shape[0]), features.prompt_seconds)

    async def get_speaker(self, name: str) -> PromptFeatures | None:
        return self._speakers.get(name)

    async def list_speakers(self) -> list[SpeakerInfo]:
        return [SpeakerInfo(n, f.prompt_text, int(f.speech_codes.shape[0]), f.prompt_seconds)
                for n, f in sorted(self._speakers.items())]

    async def delete_speaker(self, name: str) -> bool:
        return self._speakers.pop(name, None) is not None


# --- the pipeline ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LocalConfig:
    model_dir: Path
    device: str = "cpu"
    max_batch: int = DEFAULT_MAX_BATCH          # token2wav / tokenizer / speaker batch, LLM slots (>= 32 on cuda)
    llm_dtype: str = "auto"                     # auto: bfloat16 on cuda, float32 on cpu (the stack's rule)
    token2wav_dtype: str = "float32"
    token2wav_stream_cache_gib: str = "auto"    # the token2wav stage's TOKEN2WAV_STREAM_CACHE_GIB
    tokenizer_backend: str = "onnx"
    speaker_backend: str = "onnx"
    redis_url: str = ""                         # "" = in-memory prompt cache
    record_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        for name in (self.token2wav_dtype, self.llm_dtype):
            if name != "auto" and name not in _LLM_DTYPES:
                raise ValueError(f"dtype must be auto or one of {list(_LLM_DTYPES)}, got {name!r}")

    def dtype(self, name: str) -> torch.dtype:
        if name == "auto":
            name = "bfloat16" if self.device.startswith("cuda") else "float32"
        return _LLM_DTYPES[name]


class LocalPipeline:
    def __init__(self, config: LocalConfig, pipeline: Pipeline, stages: Stages) -> None:
        self.config = config
        self.pipeline = pipeline
        self.stages = stages

    @classmethod
    def create(cls, model_dir: str | Path, device: str = "cpu",
               stage_settings: Mapping[str, StageParams] | None = None, **options) -> "LocalPipeline":
        """`options`: LocalConfig fields; unset ones follow `stage_settings` (the stage servers' settings,
        cosyvoice_common.stage_params, which the caller reads once), so both benchmark lines match."""
        from cosyvoice_gateway.model_dir import load_text_encoder, model_revision

        llm_settings = LLMParams()
        if stage_settings is not None:
            llm_settings = stage_settings["llm"]
            options.setdefault("tokenizer_backend", stage_settings["tokenizer"].backend)
            options.setdefault("speaker_backend", stage_settings["speaker"].backend)
            options.setdefault("llm_dtype", stage_settings["llm"].dtype)
            options.setdefault("token2wav_dtype", stage_settings["token2wav"].dtype)
            options.setdefault("token2wav_stream_cache_gib", stage_settings["token2wav"].stream_cache_gib)
            options.setdefault("max_batch", stage_settings["token2wav"].max_batch_size)
        if options.get("token2wav_dtype") == "auto":
            options["token2wav_dtype"] = "float32"      # the token2wav stage's `auto`
        config = LocalConfig(Path(model_dir), str(device), **options)
        max_slots = max(config.max_batch, 32 if config.device.startswith("cuda") else config.max_batch)
        recorder = _Recorder(config.record_dir) if config.record_dir else None
        d = config.device
        stages = Stages({
            TOKENIZER: LocalTokenizer(config.model_dir, d, config.tokenizer_backend, config.max_batch, recorder),
            SPEAKER: LocalSpeaker(config.model_dir, d, config.speaker_backend, config.max_batch, recorder),
            LLM: LocalLLM(config.model_dir, d, replace(llm_settings, dtype=config.llm_dtype,
                                                       max_batch_slots=str(max_slots)), recorder),
            TOKEN2WAV: LocalToken2Wav(config.model_dir, d, config.dtype(config.token2wav_dtype),
                                      config.max_batch, recorder, config.token2wav_stream_cache_gib)})
        revision = model_revision(config.model_dir)
        cache = (Spk2InfoCache(Spk2InfoConfig(url=config.redis_url, model_revision=revision))
                 if config.redis_url else MemorySpk2Info(revision))
        pipeline = Pipeline(PipelineConfig(), stages, cache, load_text_encoder(config.model_dir))
        return cls(config, pipeline, stages)

    async def synthesize(self, request: SynthesisRequest, streaming: bool = True
                         ) -> tuple[list[np.ndarray], StageTimings]:
        """One request through the pipeline; returns the chunks (one for offline) and the timings."""
        timings = StageTimings()
        prepared = await self.pipeline.prepare(request, timings)
        if streaming:
            chunks = [wav async for wav in self.pipeline.stream(prepared, timings)]
        else:
            chunks = [await self.pipeline.synthesize(prepared, timings)]
        return chunks, timings

    async def close(self) -> None:
        await self.pipeline.close()
        await self.stages.close()
        await self.pipeline.cache.close()
