"""The token2wav stage's one request parser: named input tensors in, a `ChunkRequest` out, or the stage's refusal.

Used by the Triton model (`model_repository/token2wav/1/model.py`) and by the in-process line
(`cosyvoice_tools.local`), so the two can never disagree on what a call means. Tensors are as the contract
(`cosyvoice_common.contracts.Token2WavIn`) names them, without Triton's batch dimension.

- No `token_offset`: an offline call (one pass over every token, finalize, full attention).
- `token_offset` (+ `finalize`): a streaming chunk; after the first it needs the previous chunk's vocoder cache.
- `prefill`: the prompt only (no target tokens): its complete blocks go into the state cache; no audio.
- `seed`: the request's seed; the chunk's source-noise seed is `chunk_seed(seed, token_offset)`.
- `speed` (offline only): the final mel is stretched in time before the vocoder, as the reference does.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from cosyvoice_common.constants import MEL_BINS, SPEECH_ID_OFFSET, SPEED_NEUTRAL
from cosyvoice_common.contracts import Token2WavIn
from cosyvoice_common.errors import InvalidRequestError
from cosyvoice_common.inputs import one_value

from .sequence import ChunkRequest, chunk_seed
from .token2wav import VocoderCache


def _codes(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    value = tensors.get(name)
    if value is None:
        raise InvalidRequestError(f"{name} is required")
    codes = np.asarray(value).reshape(-1).astype(np.int64) - SPEECH_ID_OFFSET
    if codes.size and codes.min() < 0:
        raise InvalidRequestError(f"{name}: speech token ids must be flat ids >= {SPEECH_ID_OFFSET} (code + offset)")
    return codes


def _float_tensor(value: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value, np.float32, copy=True))
    return tensor.float().reshape(shape)


def parse_chunk_request(tensors: Mapping[str, np.ndarray | torch.Tensor]) -> ChunkRequest:
    """One call's tensors -> ChunkRequest; InvalidRequestError names what is wrong."""
    prefill = bool(one_value(tensors, Token2WavIn.PREFILL, False))
    target = Token2WavIn.TARGET_SPEECH_TOKENS
    codes = _codes(tensors, target) if not prefill or target in tensors else np.zeros(0, np.int64)
    prompt_codes = _codes(tensors, Token2WavIn.PROMPT_SPEECH_TOKENS)
    if prefill and codes.size:
        raise InvalidRequestError("a prefill call carries the prompt only (target_speech_tokens must be empty)")
    if not prefill and codes.size == 0:
        raise InvalidRequestError("target_speech_tokens is empty")
    offset = one_value(tensors, Token2WavIn.TOKEN_OFFSET, None)
    finalize = one_value(tensors, Token2WavIn.FINALIZE, None)
    if prefill:
        token_offset, is_final, streaming = 0, False, True
    elif offset is None:   # offline: one flow pass, one vocoder pass
        token_offset, is_final, streaming = 0, True, False
    else:
        token_offset = int(offset)
        is_final = bool(finalize) if finalize is not None else False
        streaming = not is_final
    cache = None
    if token_offset > 0:
        mel, source, speech = (tensors.get(n) for n in (Token2WavIn.CACHE_MEL, Token2WavIn.CACHE_SOURCE,
                                                        Token2WavIn.CACHE_SPEECH))
        if mel is None or source is None or speech is None:
            raise InvalidRequestError("a chunk after the first (token_offset > 0) needs cache_mel, cache_source, "
                                      "cache_speech")
        cache = VocoderCache(mel=_float_tensor(mel, (1, MEL_BINS, -1)), source=_float_tensor(source, (1, 1, -1)),
                             speech=_float_tensor(speech, (1, -1)))
    seed = one_value(tensors, Token2WavIn.SEED, None)
    speed = one_value(tensors, Token2WavIn.SPEED, None)
    speed = SPEED_NEUTRAL if speed is None else float(speed)
    if speed != SPEED_NEUTRAL and offset is not None:
        raise InvalidRequestError("speed applies to offline calls only (without token_offset), as in the reference")
    feat = tensors.get(Token2WavIn.PROMPT_SPEECH_FEAT)
    embedding = tensors.get(Token2WavIn.PROMPT_SPK_EMBEDDING)
    if feat is None or embedding is None:
        raise InvalidRequestError("prompt_speech_feat and prompt_spk_embedding are required")
    return ChunkRequest(tokens=torch.from_numpy(codes[None].copy()), prompt_tokens=torch.from_numpy(prompt_codes[None].copy()),
                        prompt_feat=_float_tensor(feat, (1, -1, MEL_BINS)), embedding=_float_tensor(embedding, (1, -1)),
                        token_offset=token_offset, finalize=is_final, streaming=streaming, cache=cache,
                        seed=None if seed is None else chunk_seed(int(seed), token_offset), speed=speed,
                        prefill=prefill)
