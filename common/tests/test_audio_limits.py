"""Hostile prompt uploads are refused from their size and header, before decoding (cosyvoice_common.audio)."""
import io
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from cosyvoice_common.audio import (PROMPT_MAX_BYTES, PROMPT_MAX_CHANNELS, AudioValidationError, decode_audio,
                                    prepare_prompt)
from cosyvoice_common.constants import PROMPT_MAX_SECONDS


def silent_flac(seconds: float, sample_rate_hz: int = 48000) -> bytes:
    """A long silent FLAC: tiny on disk, ~`seconds * rate * 4` bytes once decoded to float32."""
    buf = io.BytesIO()
    block = np.zeros(sample_rate_hz * 60, np.float32)
    with sf.SoundFile(buf, "w", sample_rate_hz, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds // 60)):
            f.write(block)
    return buf.getvalue()


@pytest.fixture(scope="module")
def flac_bomb() -> bytes:
    return silent_flac(20 * 60)          # 20 minutes: ~0.2 MB of FLAC, 230 MB as float32


def test_flac_bomb_is_refused_from_its_header_without_decoding(flac_bomb):
    assert len(flac_bomb) < 1 << 20
    tracemalloc.start()
    with pytest.raises(AudioValidationError, match="too long"):
        prepare_prompt(flac_bomb)
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_bytes < 4 << 20, f"decoding happened: peak {peak_bytes} bytes"


def test_decode_reads_at_most_the_bound_even_when_not_refused_by_the_header(monkeypatch, flac_bomb):
    """A header that understates its length: the bounded read still stops one frame past the limit."""
    real_info = sf.info

    class Lying:
        def __init__(self, info):
            self.samplerate, self.channels, self.frames = info.samplerate, info.channels, 48000
    monkeypatch.setattr(sf, "info", lambda f: Lying(real_info(f)))
    tracemalloc.start()
    with pytest.raises(AudioValidationError, match="too long"):
        decode_audio(flac_bomb, max_seconds=PROMPT_MAX_SECONDS)
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_bytes < 2 * PROMPT_MAX_SECONDS * 48000 * 4 + (4 << 20)


def test_oversized_bytes_are_refused_before_reading_the_header():
    with pytest.raises(AudioValidationError, match="bytes"):
        decode_audio(b"RIFF" + b"\0" * PROMPT_MAX_BYTES)


def test_too_many_channels_are_refused():
    buf = io.BytesIO()
    sf.write(buf, np.zeros((16000, PROMPT_MAX_CHANNELS + 1), np.float32), 16000, format="WAV", subtype="PCM_16")
    with pytest.raises(AudioValidationError, match="channels"):
        decode_audio(buf.getvalue())


def test_a_prompt_of_the_maximum_length_still_decodes():
    buf = io.BytesIO()
    tone = 0.3 * np.sin(np.arange(int(PROMPT_MAX_SECONDS * 16000)) * 0.07).astype(np.float32)
    sf.write(buf, tone, 16000, format="FLAC", subtype="PCM_16")
    assert prepare_prompt(buf.getvalue()).duration_s == pytest.approx(PROMPT_MAX_SECONDS)
