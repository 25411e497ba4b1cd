"""Triton model `token2wav`: flat speech ids + prompt -> 24 kHz audio chunk, stateless.

Thin adapter over cosyvoice_token2wav.runner.Token2WavRunner: the vocoder overlap cache (mel frames, source
and speech tails) arrives as input tensors and leaves as output tensors, so any replica serves any chunk
and a cancelled stream leaves nothing behind. Without `token_offset` the call is offline (one pass).
With `seed` the vocoder's source noise is drawn from a generator seeded by `chunk_seed(seed, token_offset)`
(the same request replayed gives the same audio, on any replica); without it, from the process RNG.
`speed` (offline calls only) stretches the final mel linearly in time to int(frames / speed) before the
vocoder, as the reference does.
The dynamic batch (streaming chunks and offline calls mixed) runs as length-grouped padded batches, groups
holding a stream's first chunk first (Token2WavRunner.schedule); each group is answered through the
requests' response senders as soon as it is done, so a first chunk never waits for a long final chunk of
the same batch. Each request's failure answers only that request. On a GPU the flow runs in bfloat16
(`dtype` auto), each Euler step compiled (`compile` auto), and every graph bucket is compiled and captured
in initialize(), before the stage reports ready; no request ever captures or compiles.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from cosyvoice_common.constants import MEL_BINS, SPEECH_ID_OFFSET, SPEED_NEUTRAL
from cosyvoice_common.runtime import install_stack_dumps
from cosyvoice_common.settings import parse_flag
from cosyvoice_common.triton_io import error_response, from_triton, get_parameter, send_outputs
from cosyvoice_token2wav.runner import (CHUNK_KINDS, COMPILE_MODES, ChunkRequest, ChunkResult, GroupTiming,
                                        Token2WavRunner, chunk_seed)
from cosyvoice_token2wav.token2wav import VocoderCache

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OFF = ("off", "0", "false", "no")


@dataclass(frozen=True, slots=True)
class Token2WavStageConfig:
    """config.pbtxt parameters (filled from cosyvoice_common.stage_params.Token2WavParams). dtype: auto = bfloat16 flow on CUDA (it holds the quality gate against
    float32, cosyvoice_token2wav.quality), float32 on CPU (the reference's numerics; HiFT is always float32).
    compile: auto = on with CUDA graphs, off otherwise; on = Inductor's default mode; or a mode of
    COMPILE_MODES. padding_budget: Token2WavRunner.schedule's bound on length padding."""
    model_dir: Path
    device: str
    flow_dtype: torch.dtype
    cuda_graphs: bool
    compile_mode: str | None
    padding_budget: float

    def __post_init__(self) -> None:
        if self.cuda_graphs and torch.device(self.device).type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile must be auto, on, off or one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.padding_budget < 1.0:
            raise ValueError(f"padding_budget must be >= 1, got {self.padding_budget}")

    @classmethod
    def from_model_config(cls, model_config: dict) -> "Token2WavStageConfig":
        device = get_parameter(model_config, "device")
        cuda = torch.device(device).type == "cuda"
        dtype_name = get_parameter(model_config, "dtype")
        if dtype_name == "auto":
            dtype_name = "bfloat16" if cuda else "float32"
        if dtype_name not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {list(_DTYPES)}, got {dtype_name!r}")
        graphs = cuda and get_parameter(model_config, "cuda_graphs", lambda text: parse_flag(text, "cuda_graphs"))
        compile_name = get_parameter(model_config, "compile")
        if compile_name == "auto":
            compile_name = "on" if graphs else "off"
        compile_mode = None if compile_name in _OFF else ("default" if compile_name == "on" else compile_name)
        return cls(Path(get_parameter(model_config, "model_dir")), device, _DTYPES[dtype_name], graphs, compile_mode,
                   get_parameter(model_config, "padding_budget", float))


def _input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else from_triton(tensor)


def _one(array: np.ndarray, name: str) -> np.ndarray:
    if array.shape[0] != 1:
        raise ValueError(f"{name}: send one utterance per request (batch {array.shape[0]})")
    return array[0]


@dataclass(frozen=True, slots=True)
class ChunkCall:
    tokens: torch.Tensor           # [1, T] speech codes
    prompt_tokens: torch.Tensor    # [1, Tp]
    prompt_feat: torch.Tensor      # [1, 2 Tp, 80]
    embedding: torch.Tensor        # [1, 192]
    token_offset: int
    finalize: bool
    streaming: bool
    cache: VocoderCache | None
    seed: int | None               # this chunk's source-noise seed; None = the process RNG
    speed: float                   # offline only; SPEED_NEUTRAL otherwise

    @classmethod
    def from_request(cls, request) -> "ChunkCall":
        codes = _one(_input(request, "target_speech_tokens"), "target_speech_tokens").astype(np.int64) - SPEECH_ID_OFFSET
        prompt_codes = _one(_input(request, "prompt_speech_tokens"), "prompt_speech_tokens").astype(np.int64) - SPEECH_ID_OFFSET
        if codes.size == 0 or codes.min() < 0 or (prompt_codes.size and prompt_codes.min() < 0):
            raise ValueError(f"speech token ids must be flat ids >= {SPEECH_ID_OFFSET} (code + offset)")
        offset = _input(request, "token_offset")
        finalize = _input(request, "finalize")
        if offset is None:   # offline: one flow pass, one vocoder pass
            token_offset, is_final, streaming = 0, True, False
        else:
            token_offset = int(offset.reshape(-1)[0])
            is_final = bool(finalize.reshape(-1)[0]) if finalize is not None else False
            streaming = not is_final
        cache = None
        if token_offset > 0:
            mel, source, speech = (_input(request, n) for n in ("cache_mel", "cache_source", "cache_speech"))
            if mel is None or source is None or speech is None:
                raise ValueError("a chunk after the first (token_offset > 0) needs cache_mel, cache_source, cache_speech")
            cache = VocoderCache(mel=torch.from_numpy(_one(mel, "cache_mel")[None].copy()),
                                 source=torch.from_numpy(_one(source, "cache_source")[None, None].copy()),
                                 speech=torch.from_numpy(_one(speech, "cache_speech")[None].copy()))
        seed = _input(request, "seed")
        if seed is not None:
            seed = _one(seed, "seed").reshape(-1)
            if seed.size != 1:
                raise ValueError(f"seed must hold one value, got {seed.size}")
            seed = chunk_seed(int(seed[0]), token_offset)
        speed = _input(request, "speed")
        if speed is None:
            speed = SPEED_NEUTRAL
        else:
            speed = _one(speed, "speed").reshape(-1)
            if speed.size != 1:
                raise ValueError(f"speed must hold one value, got {speed.size}")
            speed = float(speed[0])
            if speed != SPEED_NEUTRAL and offset is not None:
                raise ValueError("speed applies to offline calls only (without token_offset), as in the reference")
        feat = _one(_input(request, "prompt_speech_feat"), "prompt_speech_feat")
        embedding = _one(_input(request, "prompt_spk_embedding"), "prompt_spk_embedding")
        return cls(torch.from_numpy(codes[None].copy()), torch.from_numpy(prompt_codes[None].copy()),
                   torch.from_numpy(feat[None].copy()), torch.from_numpy(embedding.reshape(1, -1).copy()),
                   token_offset, is_final, streaming, cache, seed, speed)


def chunk_outputs(wav: torch.Tensor, cache: VocoderCache | None) -> dict[str, torch.Tensor]:
    if cache is None:   # after the final chunk: empty caches, same ranks
        mel, source, speech = torch.zeros(1, MEL_BINS, 0), torch.zeros(1, 0), torch.zeros(1, 0)
    else:
        mel, source, speech = cache.mel, cache.source.reshape(1, -1), cache.speech.reshape(1, -1)
    outputs = {"waveform": wav.reshape(1, -1), "cache_mel": mel, "cache_source": source, "cache_speech": speech}
    return {name: t.float() for name, t in outputs.items()}   # all float32


class _KindMetrics:
    """Per chunk kind (first/middle/final/offline): chunks answered, in-stage wait (from execute() to the
    start of the chunk's group; Triton's own queue is nv_inference_queue_duration_us) and compute ms."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.families = families = {   # held: a family that is garbage collected takes its metrics along
            "chunks": pb_utils.MetricFamily(name="token2wav_chunks", description="token2wav chunks answered",
                                            kind=pb_utils.MetricFamily.COUNTER),
            "wait": pb_utils.MetricFamily(name="token2wav_chunk_wait_ms",
                                          description="ms a chunk waited inside execute() for its group to start",
                                          kind=pb_utils.MetricFamily.COUNTER),
            "compute": pb_utils.MetricFamily(name="token2wav_chunk_compute_ms",
                                             description="ms of compute of the group that answered a chunk",
                                             kind=pb_utils.MetricFamily.COUNTER)}
        self.metrics = {(name, kind): family.Metric(labels={**labels, "kind": kind})
                        for name, family in families.items() for kind in CHUNK_KINDS}

    def record(self, kind: str, timing: GroupTiming) -> None:
        self.metrics[("wait", kind)].increment(timing.wait_ms)
        self.metrics[("compute", kind)].increment(timing.compute_ms)
        self.metrics[("chunks", kind)].increment(1)    # last: a reader that sees the count sees its ms too


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        install_stack_dumps()
        model_config = json.loads(args["model_config"])
        self.config = cfg = Token2WavStageConfig.from_model_config(model_config)
        self.runner = Token2WavRunner(cfg.model_dir, torch.device(cfg.device), cfg.flow_dtype,
                                      use_cuda_graphs=cfg.cuda_graphs,
                                      max_batch=max(1, int(model_config.get("max_batch_size", 0) or 1)),
                                      compile_estimator=cfg.compile_mode is not None,
                                      compile_mode=cfg.compile_mode or "default", capture_on_demand=False,
                                      padding_budget=cfg.padding_budget)
        # every graph bucket compiled and captured now: the stage is ready only after this
        self.runner.capture_all(log=lambda msg: pb_utils.Logger.log_info(f"{msg}; flow {cfg.flow_dtype}"))
        self.kind_metrics = _KindMetrics({"model": args["model_name"], "version": args["model_version"]})

    def execute(self, requests):
        """Answers every request through its response sender (one final response each) and returns None."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        senders = [request.get_response_sender() for request in requests]
        answered = [False] * len(requests)

        def answer(i: int, outputs: dict | None = None, exc: BaseException | None = None) -> None:
            if answered[i]:
                return
            answered[i] = True
            if exc is not None:
                senders[i].send(error_response(exc), flags=final)
            else:   # only the outputs the client asked for, held past send(): see triton_io.send_outputs
                send_outputs(senders[i], outputs, frozenset(requests[i].requested_output_names()), flags=final)

        calls: list[tuple[int, ChunkRequest]] = []
        for i, request in enumerate(requests):
            try:
                call = ChunkCall.from_request(request)
                calls.append((i, ChunkRequest(tokens=call.tokens, prompt_tokens=call.prompt_tokens,
                                              prompt_feat=call.prompt_feat, embedding=call.embedding,
                                              token_offset=call.token_offset, finalize=call.finalize,
                                              streaming=call.streaming, cache=call.cache, seed=call.seed,
                                              speed=call.speed)))
            except Exception as exc:  # noqa: BLE001 - a malformed request answers only itself
                answer(i, exc=exc)

        def on_group(indices: list[int], results: list[ChunkResult], timing: GroupTiming) -> None:
            for j, res in zip(indices, results):
                i, call = calls[j]
                try:
                    if res.error is not None:
                        answer(i, exc=res.error)
                    else:   # answered first: the metric IPCs never delay a chunk (a reader may see them late)
                        answer(i, chunk_outputs(res.waveform, res.cache))
                        self.kind_metrics.record(call.kind, timing)
                except Exception as exc:  # noqa: BLE001 - a failed send concerns only its own request
                    pb_utils.Logger.log_error(f"token2wav: answering request {i} failed: {exc}")

        if calls:
            try:
                self.runner.run_chunks([c for _, c in calls], on_group=on_group)
            except Exception as exc:  # noqa: BLE001 - a failed group answers each request not yet answered
                for i, _ in calls:
                    answer(i, exc=exc)
        return None
