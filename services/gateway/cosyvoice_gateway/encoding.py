"""Audio chunks as the client asked for them: streaming resampling and the byte encodings of the public API.

`StreamEncoder` turns the pipeline's float32 24 kHz chunks into bytes as they arrive: PCM (16-bit or float32),
WAV (a header of unknown length on the first chunk only, then PCM), or a compressed codec encoded incrementally
by FFmpeg through PyAV (mp3 = LAME in an MP3 stream, opus = libopus in Ogg, aac = FFmpeg's AAC in ADTS); each call
returns the bytes the muxer has written so far, so a client hears the first chunk before the last one exists.
"""
from __future__ import annotations

import numpy as np
from cosyvoice_common.audio import MP3_RATES_HZ, OPUS_RATES_HZ, encode_audio, wav_header
from cosyvoice_common.constants import OUTPUT_SAMPLE_RATE_HZ, SUPPORTED_OUTPUT_RATES_HZ

_PCM16_MAX = 32767.0

# Compressed formats: (FFmpeg muxer, encoder, bit rate, rates the encoder accepts). Speech-sized bit rates: a
# 24 kHz mono voice loses nothing audible at these, and a slow link gets its first chunk sooner.
CODECS: dict[str, tuple[str, str, int, tuple[int, ...]]] = {
    "mp3": ("mp3", "libmp3lame", 64_000, MP3_RATES_HZ),
    "opus": ("ogg", "libopus", 32_000, OPUS_RATES_HZ),
    "aac": ("adts", "aac", 64_000, SUPPORTED_OUTPUT_RATES_HZ),
}
# An Ogg page is written once it holds this much audio (FFmpeg's default, 1 s, would hold the first chunk back).
OGG_PAGE_DURATION_US = 20_000


def codec_formats_available() -> tuple[str, ...]:
    """The compressed formats this process can encode (PyAV installed, FFmpeg built with the encoder)."""
    try:
        import av
    except ImportError:
        return ()
    return tuple(fmt for fmt, (_, encoder, _, _) in CODECS.items() if encoder in av.codecs_available)


def check_rate(fmt: str, sample_rate_hz: int) -> None:
    """ValueError (with the rates that work) when `fmt` cannot be encoded at `sample_rate_hz`."""
    rates = CODECS[fmt][3] if fmt in CODECS else SUPPORTED_OUTPUT_RATES_HZ
    if sample_rate_hz not in rates:
        raise ValueError(f"{fmt} cannot be encoded at {sample_rate_hz} Hz; use one of {list(rates)}")


class _Sink:
    """A write-only file for the muxer: what it writes is kept until `drain()` hands it out."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class _CodecStream:
    """One PyAV output container + audio stream fed float32 frames; PyAV re-blocks them to the encoder's frame
    size and sample format."""

    def __init__(self, fmt: str, sample_rate_hz: int) -> None:
        import av

        container_format, encoder, bit_rate_bps, _ = CODECS[fmt]
        self._sink = _Sink()
        options = {"page_duration": str(OGG_PAGE_DURATION_US)} if container_format == "ogg" else {}
        self._container = av.open(self._sink, mode="w", format=container_format, options=options)
        self._stream = self._container.add_stream(encoder, rate=sample_rate_hz, layout="mono")
        self._stream.bit_rate = bit_rate_bps
        self._frame = av.AudioFrame
        self._sample_rate_hz = sample_rate_hz
        self._samples = 0

    def encode(self, wav: np.ndarray) -> bytes:
        if wav.size:
            frame = self._frame.from_ndarray(np.ascontiguousarray(wav, np.float32)[None, :], format="flt",
                                               layout="mono")
            frame.sample_rate = self._sample_rate_hz
            frame.pts = self._samples
            self._samples += wav.shape[0]
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.drain()

    def finish(self) -> bytes:
        for packet in self._stream.encode(None):     # the encoder's delayed frames
            self._container.mux(packet)
        self._container.close()                      # the muxer's trailer
        return self._sink.drain()


class StreamEncoder:
    """Per-request streaming encoder: one soxr stream (no clicks at chunk joins), WAV header once, or one codec
    stream for mp3/opus/aac. `encoding`: pcm_s16le, float32, wav, or a key of CODECS."""

    def __init__(self, sample_rate_hz: int, encoding: str) -> None:
        import soxr

        check_rate(encoding, sample_rate_hz)
        self.sample_rate_hz = sample_rate_hz
        self.encoding = encoding
        self._resampler = (soxr.ResampleStream(OUTPUT_SAMPLE_RATE_HZ, sample_rate_hz, 1, dtype="float32")
                           if sample_rate_hz != OUTPUT_SAMPLE_RATE_HZ else None)
        self._codec = _CodecStream(encoding, sample_rate_hz) if encoding in CODECS else None
        self._header_sent = False

    def encode(self, wav_24k: np.ndarray, last: bool = False) -> bytes:
        wav = np.asarray(wav_24k, np.float32)
        if self._resampler is not None:
            wav = self._resampler.resample_chunk(wav, last=last)
        if self._codec is not None:
            data = self._codec.encode(np.clip(wav, -1.0, 1.0))
            return data + self._codec.finish() if last else data
        if self.encoding == "float32":
            body = wav.astype("<f4").tobytes()
        else:
            body = (np.clip(wav, -1.0, 1.0) * _PCM16_MAX).round().astype("<i2").tobytes()
        if self.encoding == "wav" and not self._header_sent:
            self._header_sent = True
            return wav_header(self.sample_rate_hz, None) + body
        return body


def encode_whole(wav_24k: np.ndarray, sample_rate_hz: int, encoding: str) -> bytes:
    """A whole utterance: codecs through the same PyAV path as streams, the rest through libsndfile (a WAV header
    with the real length, FLAC)."""
    if encoding in CODECS:
        return StreamEncoder(sample_rate_hz, encoding).encode(wav_24k, last=True)
    return encode_audio(wav_24k, sample_rate_hz, encoding)
