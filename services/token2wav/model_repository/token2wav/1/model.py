"""Triton model `token2wav`: flat speech ids + prompt -> 24 kHz audio chunk, stateless.

Thin adapter over cosyvoice_token2wav.runner.Token2WavRunner: the vocoder overlap cache (mel frames, source
and speech tails) arrives as input tensors and leaves as output tensors, so any replica serves any chunk
and a cancelled stream leaves nothing behind. Without `token_offset` the call is offline (one pass).
With `seed` the vocoder's source noise is drawn from a generator seeded by `chunk_seed(seed, token_offset)`
(the same request replayed gives the same audio, on any replica); without it, from the process RNG.
The whole dynamic batch (streaming chunks and offline calls mixed) runs as one padded batch; each
request's failure answers only that request.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from cosyvoice_common.constants import MEL_BINS, SPEECH_ID_OFFSET
from cosyvoice_common.runtime import install_stack_dumps
from cosyvoice_common.triton_io import error_response, from_triton, get_dtype, get_parameter, to_triton
from cosyvoice_token2wav.runner import ChunkRequest, Token2WavRunner, chunk_seed
from cosyvoice_token2wav.token2wav import VocoderCache

@dataclass(frozen=True, slots=True)
class Token2WavStageConfig:
    model_dir: Path
    device: str
    flow_dtype: torch.dtype

    @classmethod
    def from_model_config(cls, model_config: dict) -> "Token2WavStageConfig":
        return cls(Path(get_parameter(model_config, "model_dir")), get_parameter(model_config, "device"),
                   get_dtype(model_config, "dtype", auto="float32"))   # auto: the reference's numerics


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
        feat = _one(_input(request, "prompt_speech_feat"), "prompt_speech_feat")
        embedding = _one(_input(request, "prompt_spk_embedding"), "prompt_spk_embedding")
        return cls(torch.from_numpy(codes[None].copy()), torch.from_numpy(prompt_codes[None].copy()),
                   torch.from_numpy(feat[None].copy()), torch.from_numpy(embedding.reshape(1, -1).copy()),
                   token_offset, is_final, streaming, cache, seed)


def chunk_response(wav: torch.Tensor, cache: VocoderCache | None):
    if cache is None:   # after the final chunk: empty caches, same ranks
        mel, source, speech = torch.zeros(1, MEL_BINS, 0), torch.zeros(1, 0), torch.zeros(1, 0)
    else:
        mel, source, speech = cache.mel, cache.source.reshape(1, -1), cache.speech.reshape(1, -1)
    outputs = {"waveform": wav.reshape(1, -1), "cache_mel": mel, "cache_source": source, "cache_speech": speech}
    return pb_utils.InferenceResponse([to_triton(name, t.float()) for name, t in outputs.items()])   # all float32


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        install_stack_dumps()
        model_config = json.loads(args["model_config"])
        self.config = Token2WavStageConfig.from_model_config(model_config)
        device = torch.device(self.config.device)
        self.runner = Token2WavRunner(self.config.model_dir, device, self.config.flow_dtype,
                                      use_cuda_graphs=device.type == "cuda" and os.environ.get("TOKEN2WAV_CUDA_GRAPHS", "1") != "0",
                                      max_batch=max(1, int(model_config.get("max_batch_size", 0) or 1)))

    def execute(self, requests):
        responses: list = [None] * len(requests)
        calls: list[tuple[int, ChunkRequest]] = []
        for i, request in enumerate(requests):
            try:
                call = ChunkCall.from_request(request)
                calls.append((i, ChunkRequest(tokens=call.tokens, prompt_tokens=call.prompt_tokens,
                                              prompt_feat=call.prompt_feat, embedding=call.embedding,
                                              token_offset=call.token_offset, finalize=call.finalize,
                                              streaming=call.streaming, cache=call.cache, seed=call.seed)))
            except Exception as exc:  # noqa: BLE001 - a malformed request answers only itself
                responses[i] = error_response(exc)
        if calls:
            try:
                results = self.runner.run_chunks([c for _, c in calls])
                for (i, _), res in zip(calls, results):
                    responses[i] = error_response(res.error) if res.error is not None else \
                        chunk_response(res.waveform, res.cache)
            except Exception as exc:  # noqa: BLE001 - a failed batch answers each of its requests
                for i, _ in calls:
                    responses[i] = error_response(exc)
        return responses
