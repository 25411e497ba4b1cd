"""Speaker-stage features: the 24 kHz prompt mel for the flow (matcha) and Kaldi fbank for CAM++.

Window functions and filter banks are built once per (device, dtype) and reused; every function
accepts CPU or CUDA tensors (or numpy arrays) and computes on the input's device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from cosyvoice_common.audio import slaney_mel_filterbank
from cosyvoice_common.constants import MEL_BINS, MEL_HOP_SAMPLES, OUTPUT_SAMPLE_RATE_HZ, PROMPT_16K_SAMPLE_RATE_HZ


@dataclass(frozen=True, slots=True)
class MatchaMelConfig:
    """The yaml `feat_extractor` of CosyVoice2 (spec 3.4)."""
    sample_rate_hz: int = OUTPUT_SAMPLE_RATE_HZ
    n_fft_samples: int = 1920
    hop_samples: int = MEL_HOP_SAMPLES
    win_samples: int = 1920
    num_mels: int = MEL_BINS
    fmin_hz: float = 0.0
    fmax_hz: float = 8000.0
    magnitude_floor: float = 1e-9      # added under the sqrt (matcha)
    log_floor: float = 1e-5            # clamp before the natural log (matcha)


@dataclass(frozen=True, slots=True)
class KaldiFbankConfig:
    """torchaudio.compliance.kaldi.fbank defaults with num_mel_bins=80, dither=0 (spec 3.3)."""
    sample_rate_hz: int = PROMPT_16K_SAMPLE_RATE_HZ
    frame_length_samples: int = 400     # 25 ms
    frame_shift_samples: int = 160      # 10 ms
    num_mel_bins: int = MEL_BINS
    preemphasis: float = 0.97
    povey_exponent: float = 0.85
    low_freq_hz: float = 20.0
    high_freq_hz: float = 0.0           # <= 0 means offset from Nyquist (Kaldi convention)
    log_floor: float = float(torch.finfo(torch.float32).eps)

    @property
    def padded_window_samples(self) -> int:  # round_to_power_of_two
        return 1 << (self.frame_length_samples - 1).bit_length()


MATCHA = MatchaMelConfig()
KALDI = KaldiFbankConfig()


def _as_tensor(wav) -> torch.Tensor:
    x = wav if isinstance(wav, torch.Tensor) else torch.from_numpy(np.asarray(wav, dtype=np.float32))
    if x.dim() == 2:
        if x.shape[0] != 1:
            raise ValueError(f"expected a mono waveform [N] or [1, N], got {tuple(x.shape)}")
        x = x[0]
    if x.dim() != 1:
        raise ValueError(f"expected a mono waveform [N] or [1, N], got {tuple(x.shape)}")
    return x.to(torch.float32)


# --- matcha mel (prompt_speech_feat) -----------------------------------------------------------------
@lru_cache(maxsize=8)
def _matcha_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    c = MATCHA
    basis = torch.from_numpy(np.array(slaney_mel_filterbank(c.sample_rate_hz, c.n_fft_samples, c.num_mels,
                                                            c.fmin_hz, c.fmax_hz))).to(device)
    window = torch.hann_window(c.win_samples, device=device)
    return basis, window


def prompt_mel(wav_24k) -> torch.Tensor:
    """Matcha log-mel of a 24 kHz mono prompt: [floor(N / 480), 80] on the input's device."""
    c = MATCHA
    x = _as_tensor(wav_24k)
    basis, window = _matcha_constants(x.device)
    pad = (c.n_fft_samples - c.hop_samples) // 2
    x = torch.nn.functional.pad(x[None, None], (pad, pad), mode="reflect")[0, 0]
    spec = torch.stft(x, c.n_fft_samples, hop_length=c.hop_samples, win_length=c.win_samples, window=window,
                      center=False, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + c.magnitude_floor)
    mel = torch.log(torch.clamp(basis @ mag, min=c.log_floor))
    return mel.transpose(0, 1).contiguous()


# --- kaldi fbank (campplus input) --------------------------------------------------------------------
def _kaldi_mel(freq_hz: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log(1.0 + freq_hz / 700.0)


@lru_cache(maxsize=1)
def _kaldi_mel_banks_cpu() -> torch.Tensor:
    """Kaldi triangular mel banks [num_bins, padded/2 + 1] (Nyquist column zero).

    Built in float32 torch ops in the same order as torchaudio's compliance.kaldi, because the log of
    small band energies amplifies even 1e-5 differences in the bank weights.
    """
    c = KALDI
    n_fft = c.padded_window_samples
    num_fft_bins = n_fft // 2
    nyquist_hz = 0.5 * c.sample_rate_hz
    high_hz = c.high_freq_hz if c.high_freq_hz > 0 else nyquist_hz + c.high_freq_hz
    fft_bin_width_hz = c.sample_rate_hz / n_fft
    mel_low = 1127.0 * math.log(1.0 + c.low_freq_hz / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_hz / 700.0)
    mel_delta = (mel_high - mel_low) / (c.num_mel_bins + 1)
    b = torch.arange(c.num_mel_bins).unsqueeze(1)
    left = mel_low + b * mel_delta
    center = mel_low + (b + 1.0) * mel_delta
    right = mel_low + (b + 2.0) * mel_delta
    mel = _kaldi_mel(fft_bin_width_hz * torch.arange(num_fft_bins)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return torch.nn.functional.pad(banks, (0, 1)).to(torch.float32)


@lru_cache(maxsize=8)
def _kaldi_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    c = KALDI
    banks = _kaldi_mel_banks_cpu().to(device)
    window = torch.hann_window(c.frame_length_samples, periodic=False).pow(c.povey_exponent).to(device)
    return banks, window


def kaldi_fbank(wav_16k, mean_normalize: bool = False) -> torch.Tensor:
    """Kaldi fbank of a 16 kHz mono float waveform: [1 + (N - 400) // 160, 80] (snip_edges).

    `mean_normalize=True` subtracts the per-bin mean over frames: exactly what CAM++ receives.
    """
    c = KALDI
    x = _as_tensor(wav_16k)
    if x.shape[0] < c.frame_length_samples:
        raise ValueError(f"need at least {c.frame_length_samples} samples for one fbank frame, got {x.shape[0]}")
    banks, window = _kaldi_constants(x.device)
    frames = x.unfold(0, c.frame_length_samples, c.frame_shift_samples)          # [T, 400]
    frames = frames - frames.mean(dim=1, keepdim=True)                              # remove_dc_offset
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)                    # first sample repeats
    frames = (frames - c.preemphasis * previous) * window
    frames = torch.nn.functional.pad(frames, (0, c.padded_window_samples - c.frame_length_samples))
    power = torch.fft.rfft(frames).abs().pow(2)                                     # [T, 257]
    fbank = torch.log(torch.clamp(power @ banks.T, min=c.log_floor))
    if mean_normalize:
        fbank = fbank - fbank.mean(dim=0, keepdim=True)
    return fbank


def campplus_fbank(wav_16k) -> torch.Tensor:
    """What CAM++ receives: mean-normalised fbank, [T, 80]."""
    return kaldi_fbank(wav_16k, mean_normalize=True)
