"""Chunked streaming token2wav: flow -> HiFT with the reference's chunk joining (spec 7.2).

The object is stateless per request: every call takes the previous chunk's :class:`VocoderCache`
(or None for the first chunk) and returns the next one (None after the final chunk), so any replica
can serve any chunk and nothing leaks when a stream is cancelled.

Joining, per chunk: the flow's mel from ``token_offset`` on is prefixed by the last
``HIFT_MEL_CACHE_FRAMES`` mel frames of the previous chunk (the vocoder gets left context again);
the previous excitation tail overwrites the start of this chunk's excitation (continuous harmonic
phase); the first ``HIFT_SOURCE_CACHE_SAMPLES`` output samples are cross-faded with the previous
chunk's withheld tail by a Hamming window; a non-final chunk withholds its own last
``HIFT_SOURCE_CACHE_SAMPLES`` samples. Total output is ``SAMPLES_PER_TOKEN`` per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


import numpy as np
import torch
import torch.nn.functional as F

from cosyvoice_common.constants import (
    HIFT_MEL_CACHE_FRAMES,
    HIFT_SOURCE_CACHE_SAMPLES,
    MEL_BINS,
    MEL_HOP_SAMPLES,
    PRE_LOOKAHEAD_TOKENS,
    SPEED_NEUTRAL,
    STREAM_SCALE_FACTOR,
    TOKEN_HOP_TOKENS,
    TOKEN_MAX_HOP_TOKENS,
    TOKEN_MEL_RATIO,
)

from .hift import HiFTGenerator, SourceDraws


@dataclass(frozen=True, slots=True)
class VocoderCache:
    """What one chunk hands to the next: mel [1, 80, 8], source [1, 1, 3840], speech [1, 3840]."""
    mel: torch.Tensor
    source: torch.Tensor
    speech: torch.Tensor

    def __post_init__(self) -> None:
        if self.mel.dim() != 3 or self.mel.shape[1] != MEL_BINS:
            raise ValueError(f"cache mel must be [B, {MEL_BINS}, frames], got {tuple(self.mel.shape)}")
        if self.source.dim() != 3 or self.speech.dim() != 2:
            raise ValueError(f"cache source must be [B, 1, K] and speech [B, K], got "
                             f"{tuple(self.source.shape)} / {tuple(self.speech.shape)}")
        if self.source.shape[-1] != self.mel.shape[-1] * MEL_HOP_SAMPLES:
            raise ValueError("cache source must cover exactly the cached mel frames")


@dataclass(frozen=True, slots=True)
class Token2WavConfig:
    mel_cache_frames: int = HIFT_MEL_CACHE_FRAMES
    samples_per_frame: int = MEL_HOP_SAMPLES
    token_mel_ratio: int = TOKEN_MEL_RATIO

    def __post_init__(self) -> None:
        if min(self.mel_cache_frames, self.samples_per_frame, self.token_mel_ratio) < 1:
            raise ValueError(f"all Token2WavConfig values must be positive: {self}")

    @property
    def source_cache_samples(self) -> int:
        return self.mel_cache_frames * self.samples_per_frame


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """One token2wav call of the reference schedule: tokens[:flow_token_len], audio from token_offset."""
    token_offset: int
    flow_token_len: int
    streaming: bool
    finalize: bool


def stretched_frames(frames: int, speed: float) -> int:
    """Mel frames after the speed stretch: the reference's int(frames / speed)."""
    if not speed > 0:
        raise ValueError(f"speed must be positive, got {speed}")
    return int(frames / speed)


def stretch_mel(mel: torch.Tensor, speed: float) -> torch.Tensor:
    """The reference's speed change: mel [B, 80, F] stretched linearly in time to int(F / speed) frames."""
    if speed == SPEED_NEUTRAL:
        return mel
    return F.interpolate(mel, size=stretched_frames(mel.shape[2], speed), mode="linear")


def plan_reference_chunks(n_tokens: int, n_prompt_tokens: int, hop_tokens: int = TOKEN_HOP_TOKENS,
                          max_hop_tokens: int = TOKEN_MAX_HOP_TOKENS,
                          lookahead_tokens: int = PRE_LOOKAHEAD_TOKENS,
                          growth_factor: int = STREAM_SCALE_FACTOR) -> list[ChunkPlan]:
    """The reference ``tts(stream=True)`` schedule (spec 7.1) when all tokens exist up-front.

    The first hop is padded so the first chunk ends on a ``hop_tokens`` boundary counted from the
    prompt start; hops then grow by ``growth_factor`` up to ``max_hop_tokens``; the remainder goes into
    a final call that runs the flow without chunk masks (the reference passes no ``stream=``).
    The hop starts fresh per call (the reference's object-level hop is an upstream bug).
    """
    if n_tokens < 0 or n_prompt_tokens < 0:
        raise ValueError("token counts must be non-negative")
    prompt_pad = math.ceil(n_prompt_tokens / hop_tokens) * hop_tokens - n_prompt_tokens
    plans: list[ChunkPlan] = []
    offset, hop = 0, hop_tokens
    while True:
        this_hop = hop + prompt_pad if offset == 0 else hop
        if n_tokens - offset < this_hop + lookahead_tokens:
            break
        plans.append(ChunkPlan(offset, offset + this_hop + lookahead_tokens, streaming=True, finalize=False))
        offset += this_hop
        hop = min(max_hop_tokens, hop * growth_factor)
    plans.append(ChunkPlan(offset, n_tokens, streaming=False, finalize=True))
    return plans


class Token2Wav:
    """flow + HiFT with the reference chunk joining; holds weights and constants only, no request state."""

    def __init__(self, flow: torch.nn.Module | None, hift: HiFTGenerator,
                 config: Token2WavConfig = Token2WavConfig()) -> None:
        if hift.cfg.samples_per_frame != config.samples_per_frame:
            raise ValueError(f"HiFT makes {hift.cfg.samples_per_frame} samples per frame, "
                             f"token2wav expects {config.samples_per_frame}")
        self.flow = flow
        self.hift = hift
        self.config = config
        n = config.source_cache_samples
        # numpy.hamming semantics (symmetric, float64), built once: the rising half weights the new
        # chunk, the falling half the previous chunk's withheld tail. The fade is computed in float64.
        window = torch.from_numpy(np.hamming(2 * n))
        device = next(hift.parameters()).device
        self._fade_in = window[:n].to(device)
        self._fade_out = window[n:].to(device)

    @property
    def device(self) -> torch.device:
        return self._fade_in.device

    # --- flow ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def flow_mel(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
                 embedding: torch.Tensor, streaming: bool, finalize: bool) -> torch.Tensor:
        """tokens [1, T] (speech codes, not flat ids) -> mel [1, 80, 2T] (2(T-3) when not finalize)."""
        if self.flow is None:
            raise RuntimeError("Token2Wav was built without a flow")
        dev = self.device
        tokens = tokens.to(dev, torch.int32)
        prompt_tokens = prompt_tokens.to(dev, torch.int32)
        mel, _ = self.flow.inference(
            token=tokens,
            token_len=torch.tensor([tokens.shape[1]], dtype=torch.int32, device=dev),
            prompt_token=prompt_tokens,
            prompt_token_len=torch.tensor([prompt_tokens.shape[1]], dtype=torch.int32, device=dev),
            prompt_feat=prompt_feat.to(dev),
            prompt_feat_len=torch.tensor([prompt_feat.shape[1]], dtype=torch.int32, device=dev),
            embedding=embedding.to(dev),
            streaming=streaming,
            finalize=finalize)
        return mel

    # --- vocoder + joining -------------------------------------------------------------------------------
    def _cross_fade(self, speech: torch.Tensor, cache: VocoderCache) -> torch.Tensor:
        n = self.config.source_cache_samples
        head = (speech[:, :n].double() * self._fade_in + cache.speech.double() * self._fade_out).to(speech.dtype)
        return torch.cat([head, speech[:, n:]], dim=1)

    @torch.inference_mode()
    def vocode(self, mel: torch.Tensor, finalize: bool, cache: VocoderCache | None,
               generator: torch.Generator | None = None, source: torch.Tensor | None = None,
               draws: SourceDraws | None = None) -> tuple[torch.Tensor, VocoderCache | None]:
        """Vocode this chunk's new mel [1, 80, F] (already sliced at token_offset) and join it.

        ``source`` (the full excitation for the cache-prefixed mel, cache already applied) or ``draws``
        replace the random source (parity); normally the source is drawn from ``generator``.
        Returns (waveform [1, N], cache for the next chunk or None when ``finalize``).
        """
        hift_dtype = self.hift.stft_window.dtype
        mel = mel.to(self.device, hift_dtype)
        if cache is not None:   # a cache may arrive from anywhere (host memory after Triton): move it once
            cache = VocoderCache(cache.mel.to(mel), cache.source.to(mel), cache.speech.to(mel))
            mel = torch.cat([cache.mel, mel], dim=2)
        if not finalize and mel.shape[2] < self.config.mel_cache_frames:
            raise ValueError(f"a non-final chunk needs at least {self.config.mel_cache_frames} mel frames, "
                             f"got {mel.shape[2]}")
        if source is not None:
            source = source.to(mel)
            speech = self.hift.decode(mel, source)
        else:
            speech, source = self.hift.inference(mel, None if cache is None else cache.source,
                                                 generator=generator, draws=draws)
        if cache is not None:
            speech = self._cross_fade(speech, cache)
        if finalize:
            return speech, None
        n = self.config.source_cache_samples
        # clone(): the cache must not pin this chunk's full-length tensors.
        new_cache = VocoderCache(mel=mel[:, :, -self.config.mel_cache_frames:].clone(),
                                 source=source[:, :, -n:].clone(),
                                 speech=speech[:, -n:].clone())
        return speech[:, :-n], new_cache

    def chunk(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
              embedding: torch.Tensor, token_offset: int, finalize: bool, streaming: bool,
              cache: VocoderCache | None, generator: torch.Generator | None = None,
              speed: float = SPEED_NEUTRAL) -> tuple[torch.Tensor, VocoderCache | None]:
        """One token2wav call (spec 7.2). tokens: the whole prefix [1, T] of speech codes.

        Offline synthesis is one call with token_offset=0, finalize=True, streaming=False. ``speed`` (offline
        only, as the reference) stretches the mel to int(frames / speed) before the vocoder.
        """
        if token_offset < 0 or token_offset > tokens.shape[1]:
            raise ValueError(f"token_offset {token_offset} outside [0, {tokens.shape[1]}]")
        if (cache is None) != (token_offset == 0):
            raise ValueError("a cache is required exactly for chunks after the first (token_offset > 0)")
        if speed != SPEED_NEUTRAL and (not finalize or token_offset != 0):
            raise ValueError("speed applies to offline calls only (token_offset 0, finalize)")
        mel = self.flow_mel(tokens, prompt_tokens, prompt_feat, embedding, streaming=streaming, finalize=finalize)
        mel = stretch_mel(mel[:, :, token_offset * self.config.token_mel_ratio:], speed)
        return self.vocode(mel, finalize, cache, generator=generator)

    def offline(self, tokens: torch.Tensor, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
                embedding: torch.Tensor, generator: torch.Generator | None = None,
                speed: float = SPEED_NEUTRAL) -> torch.Tensor:
        wav, _ = self.chunk(tokens, prompt_tokens, prompt_feat, embedding, token_offset=0, finalize=True,
                            streaming=False, cache=None, generator=generator, speed=speed)
        return wav


def load_token2wav(model_dir: str | Path, device: torch.device | str = "cpu",
                   flow_dtype: torch.dtype = torch.float32) -> Token2Wav:
    """flow.pt + hift.pt of a model directory (HiFT always float32, weight norm folded)."""
    from .flow import load_flow  # lazy: the flow lands separately
    from .hift import load_hift

    flow = load_flow(model_dir, device, flow_dtype)
    return Token2Wav(flow, load_hift(model_dir, device))
