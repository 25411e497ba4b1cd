"""Audio chunks as the client asked for them: streaming resampling and the byte encodings of the public API."""
from __future__ import annotations

import numpy as np
from cosyvoice_common.audio import wav_header
from cosyvoice_common.constants import OUTPUT_SAMPLE_RATE_HZ

_PCM16_MAX = 32767.0


class StreamEncoder:
    """Per-request streaming encoder: one soxr stream (no clicks at chunk joins), WAV header once."""

    def __init__(self, sample_rate_hz: int, encoding: str) -> None:
        import soxr

        self.sample_rate_hz = sample_rate_hz
        self.encoding = encoding
        self._resampler = (soxr.ResampleStream(OUTPUT_SAMPLE_RATE_HZ, sample_rate_hz, 1, dtype="float32")
                           if sample_rate_hz != OUTPUT_SAMPLE_RATE_HZ else None)
        self._header_sent = False

    def encode(self, wav_24k: np.ndarray, last: bool = False) -> bytes:
        wav = np.asarray(wav_24k, np.float32)
        if self._resampler is not None:
            wav = self._resampler.resample_chunk(wav, last=last)
        if self.encoding == "float32":
            body = wav.astype("<f4").tobytes()
        else:
            body = (np.clip(wav, -1.0, 1.0) * _PCM16_MAX).round().astype("<i2").tobytes()
        if self.encoding == "wav" and not self._header_sent:
            self._header_sent = True
            return wav_header(self.sample_rate_hz, None) + body
        return body
