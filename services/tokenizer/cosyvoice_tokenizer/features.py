"""Whisper 128-bin log-mel (the speech tokenizer's input), without librosa or whisper (spec 3.2)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from cosyvoice_common.audio import slaney_mel_filterbank
from cosyvoice_common.constants import PROMPT_16K_SAMPLE_RATE_HZ


@dataclass(frozen=True, slots=True)
class WhisperMelConfig:
    sample_rate_hz: int = PROMPT_16K_SAMPLE_RATE_HZ
    n_fft_samples: int = 400
    hop_samples: int = 160
    num_mels: int = 128
    log10_floor: float = 1e-10
    dynamic_range_log10: float = 8.0   # values below (max - 8) are floored
    offset: float = 4.0                # (x + 4) / 4 scaling of Whisper
    scale: float = 4.0


WHISPER = WhisperMelConfig()


@lru_cache(maxsize=8)
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    c = WHISPER
    filters = torch.from_numpy(np.array(slaney_mel_filterbank(c.sample_rate_hz, c.n_fft_samples, c.num_mels))).to(device)
    return filters, torch.hann_window(c.n_fft_samples, device=device)


def whisper_frames(num_samples: int) -> int:
    """Frames of the log-mel for a signal of `num_samples` (the centred STFT's last frame is dropped)."""
    return num_samples // WHISPER.hop_samples


def whisper_log_mel(wav_16k) -> torch.Tensor:
    """[128, floor(N / 160)] Whisper log-mel of a 16 kHz mono waveform, on the input's device."""
    c = WHISPER
    x = wav_16k if isinstance(wav_16k, torch.Tensor) else torch.from_numpy(np.asarray(wav_16k, dtype=np.float32))
    x = x.to(torch.float32)
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1:
        raise ValueError(f"expected a mono waveform [N] or [1, N], got {tuple(x.shape)}")
    filters, window = _constants(x.device)
    spec = torch.stft(x, c.n_fft_samples, c.hop_samples, window=window, return_complex=True)
    power = spec[..., :-1].abs() ** 2
    log_spec = torch.clamp(filters @ power, min=c.log10_floor).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - c.dynamic_range_log10)
    return (log_spec + c.offset) / c.scale
