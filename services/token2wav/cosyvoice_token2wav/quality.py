"""Quality gate of a reduced-precision token2wav against float32 on the same inputs.

The gate: every output finite; the flow mel's relative L2 error within ``mel_rel_l2_max`` (what the flow's
precision changes); the waveform's log-spectral distance (mean |dB| difference of STFT magnitudes, phase
blind) within ``spec_db_max``. The waveform's sample-wise error is reported but not gated: HiFT's phase is a
cumulative sum of F0 that turns any mel difference into a growing phase offset, and on random weights the F0
head moves whole harmonic combs. The stage test (CPU, tiny model) and tools/gpu/token2wav_speed.py (GPU, full
size) both call ``quality_gate``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import Token2WavEngine
from .sequence import ChunkRequest, ChunkResult

_LSD_N_FFT = 512
_LSD_HOP = 128
_LSD_FLOOR = 1e-3      # magnitudes 60 dB under the loudest bin are floored, so silence does not dominate


@dataclass(frozen=True, slots=True)
class QualityBounds:
    mel_rel_l2_max: float = 2e-2
    spec_db_max: float = 6.0


BF16_BOUNDS = QualityBounds()
FLOAT32_BOUNDS = QualityBounds(mel_rel_l2_max=1e-4, spec_db_max=0.5)


@dataclass(frozen=True, slots=True)
class QualityReport:
    mel_max_abs: float
    mel_rel_l2: float
    wav_max_abs: float
    wav_rel_l2: float
    spec_db: float
    finite: bool
    bounds: QualityBounds

    @property
    def passed(self) -> bool:
        return (self.finite and self.mel_rel_l2 <= self.bounds.mel_rel_l2_max
                and self.spec_db <= self.bounds.spec_db_max)

    def line(self) -> str:
        return (f"mel max|d| {self.mel_max_abs:.2e} relL2 {self.mel_rel_l2:.2e} (<= {self.bounds.mel_rel_l2_max:g}) | "
                f"wav max|d| {self.wav_max_abs:.2e} relL2 {self.wav_rel_l2:.2e} | spec {self.spec_db:.3f} dB "
                f"(<= {self.bounds.spec_db_max:g}) | {'PASS' if self.passed else 'FAIL'}")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def spec_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """Log-spectral distance of waveform `a` from `b`: mean |20 log10 |STFT|| difference in dB."""
    if a.numel() < _LSD_N_FFT:
        return 0.0
    win = torch.hann_window(_LSD_N_FFT, dtype=torch.float64)
    sa = torch.stft(a.double().flatten(), _LSD_N_FFT, _LSD_HOP, window=win, return_complex=True).abs()
    sb = torch.stft(b.double().flatten(), _LSD_N_FFT, _LSD_HOP, window=win, return_complex=True).abs()
    floor = float(sb.max()) * _LSD_FLOOR
    return float((20 * (sa + floor).log10() - 20 * (sb + floor).log10()).abs().mean())


def compare(got: list[ChunkResult], want: list[ChunkResult], bounds: QualityBounds) -> QualityReport:
    """Worst request of `got` against `want` (both with mel: ``run_chunks(..., keep_mel=True)``)."""
    rows = []
    for g, w in zip(got, want, strict=True):
        if g.error is not None or w.error is not None:
            raise RuntimeError(f"a quality request failed: {g.error or w.error}")
        if g.waveform.shape != w.waveform.shape or g.mel.shape != w.mel.shape:
            raise RuntimeError(f"shapes differ: wav {tuple(g.waveform.shape)} vs {tuple(w.waveform.shape)}, "
                               f"mel {tuple(g.mel.shape)} vs {tuple(w.mel.shape)}")
        if (g.cache is None) != (w.cache is None):
            raise RuntimeError("cache presence differs from the reference")
        rows.append((float((g.mel - w.mel).abs().max()), rel_l2(g.mel, w.mel),
                     float((g.waveform - w.waveform).abs().max()), rel_l2(g.waveform, w.waveform),
                     spec_db(g.waveform, w.waveform),
                     bool(torch.isfinite(g.waveform).all() and torch.isfinite(g.mel).all())))
    worst = [max(col) for col in list(zip(*rows))[:5]]
    return QualityReport(*worst, finite=all(r[5] for r in rows), bounds=bounds)


def quality_gate(fast: Token2WavEngine, reference: Token2WavEngine | list[ChunkResult],
                 requests: list[ChunkRequest], bounds: QualityBounds = BF16_BOUNDS) -> QualityReport:
    """Runs `requests` (seeded: both sides draw the same source noise) on `fast` and compares with the
    float32 `reference` engine (or its results, computed once with keep_mel=True)."""
    if any(r.seed is None or r.generator is not None for r in requests):
        raise ValueError("quality requests need a seed and no generator: both runners must draw the same noise")
    want = reference if isinstance(reference, list) else reference.run_chunks(requests, keep_mel=True)
    return compare(fast.run_chunks(requests, keep_mel=True), want, bounds)
