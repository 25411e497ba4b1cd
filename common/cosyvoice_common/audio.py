"""Audio in and out of the stack: decode prompt uploads, resample, validate, encode responses.

Everything here runs on the CPU at the request boundary (gateway, prompt preparation). Resampling
matches torchaudio's default (`sinc_interp_hann`, width 6, rolloff 0.99), which is what the reference
`load_wav` uses, so prompts prepared here give the same features as the reference frontend.
"""
from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cosyvoice_common.constants import (
    OUTPUT_SAMPLE_RATE_HZ,
    PROMPT_16K_SAMPLE_RATE_HZ,
    PROMPT_MAX_SECONDS,
    PROMPT_MIN_SECONDS,
    SUPPORTED_OUTPUT_RATES_HZ,
)

# Upload bounds checked before any decoding: the bytes, then the container header (soundfile.info), then a
# decode that reads at most PROMPT_MAX_SECONDS of frames, so a small compressed file that would expand to
# gigabytes (a long silent FLAC) is refused at the cost of reading its header.
PROMPT_MAX_BYTES = 16 << 20            # a 30 s prompt is ~3 MB as 48 kHz 16-bit WAV
PROMPT_MAX_CHANNELS = 8
PROMPT_MAX_SAMPLE_RATE_HZ = 192000

# A prompt whose peak is below this (about -80 dBFS) carries no usable voice.
SILENCE_PEAK_AMPLITUDE = 1e-4
# The reference asserts prompts are at least 16 kHz before downsampling (spec 3.1).
MIN_PROMPT_SAMPLE_RATE_HZ = PROMPT_16K_SAMPLE_RATE_HZ

# torchaudio.functional.resample defaults, named (spec 3.1).
RESAMPLE_LOWPASS_FILTER_WIDTH = 6
RESAMPLE_ROLLOFF = 0.99

# RIFF/WAVE numbers for the streaming header.
_WAV_FORMAT_PCM = 1
_PCM16_BYTES = 2
_PCM16_BITS = 16
_PCM16_MAX = 32767.0
# Header length field value for "unknown length" (streaming): the largest 32-bit size.
_WAV_UNKNOWN_SIZE = 0xFFFFFFFF
_WAV_HEADER_BYTES = 44

ENCODINGS = ("pcm_s16le", "float32", "wav", "flac", "mp3", "opus")
# Container formats soundfile/libsndfile writes, and the rates each codec accepts.
OPUS_RATES_HZ = (8000, 12000, 16000, 24000, 48000)
MP3_RATES_HZ = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


class AudioDecodeError(ValueError):
    """The uploaded bytes are not audio soundfile can read (or contain no samples)."""


class AudioValidationError(ValueError):
    """Decoded audio is unusable as a voice prompt (too short/long, silent, non-finite)."""


@dataclass(frozen=True, slots=True)
class PromptAudio:
    wav_16k: np.ndarray      # float32 mono, PROMPT_16K_SAMPLE_RATE_HZ
    wav_24k: np.ndarray      # float32 mono, OUTPUT_SAMPLE_RATE_HZ
    duration_s: float


# --- decode ------------------------------------------------------------------------------------------
def decode_audio(data: bytes, max_seconds: float | None = None, max_bytes: int = PROMPT_MAX_BYTES
                 ) -> tuple[np.ndarray, int]:
    """Decode any soundfile-readable container to float32 mono in [-1, 1] (channels averaged).

    Bounded: more than `max_bytes` bytes, a header that says more than `max_seconds` (None = no duration
    bound), too many channels or an absurd rate are refused before decoding, and the decode itself reads at
    most `max_seconds` of frames (a header that understates its length is caught there)."""
    import soundfile as sf  # imported here so feature code that only needs the filter banks does not need libsndfile

    if not data:
        raise AudioDecodeError("audio is empty (0 bytes)")
    if len(data) > max_bytes:
        raise AudioValidationError(f"audio is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:  # libsndfile raises several types (RuntimeError, LibsndfileError, TypeError)
        raise AudioDecodeError(f"cannot decode audio ({len(data)} bytes): {exc}") from exc
    sample_rate_hz, channels = int(info.samplerate), int(info.channels)
    if not 0 < sample_rate_hz <= PROMPT_MAX_SAMPLE_RATE_HZ:
        raise AudioValidationError(f"audio sample rate {sample_rate_hz} Hz is outside (0, {PROMPT_MAX_SAMPLE_RATE_HZ}]")
    if not 0 < channels <= PROMPT_MAX_CHANNELS:
        raise AudioValidationError(f"audio has {channels} channels; the limit is {PROMPT_MAX_CHANNELS}")
    max_frames = -1
    if max_seconds is not None:
        max_frames = int(math.ceil(max_seconds * sample_rate_hz))
        if info.frames > max_frames:
            raise AudioValidationError(
                f"audio is too long: {info.frames / sample_rate_hz:.3f} s (maximum {max_seconds} s)")
    try:
        # soundfile scales every integer PCM width (8/16/24/32 bit) to [-1, 1) when dtype is float.
        # One frame past the bound tells a header that understated the length.
        samples, _ = sf.read(io.BytesIO(data), frames=max_frames + 1 if max_frames >= 0 else -1, dtype="float32",
                             always_2d=True)
    except Exception as exc:
        raise AudioDecodeError(f"cannot decode audio ({len(data)} bytes): {exc}") from exc
    if max_frames >= 0 and samples.shape[0] > max_frames:
        raise AudioValidationError(f"audio is too long: more than {max_seconds} s")
    if samples.shape[0] == 0:
        raise AudioDecodeError("audio contains no samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    return np.ascontiguousarray(mono, dtype=np.float32), sample_rate_hz


# --- resample ----------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _resample_kernel(orig_hz: int, new_hz: int) -> tuple[np.ndarray, int]:
    """Polyphase sinc-Hann kernel for a reduced rate pair, float32 [new, 2*width+orig]; built once per pair.

    The same float32 arithmetic as torchaudio's `_get_sinc_resample_kernel`, in numpy: the gateway image has
    no torch."""
    base_hz = np.float32(min(orig_hz, new_hz) * RESAMPLE_ROLLOFF)
    width = math.ceil(RESAMPLE_LOWPASS_FILTER_WIDTH * orig_hz / float(base_hz))
    idx = np.arange(-width, width + orig_hz, dtype=np.float32)[None, :] / np.float32(orig_hz)
    phase = np.arange(0, -new_hz, -1, dtype=np.float32)[:, None] / np.float32(new_hz)
    t = np.clip((phase + idx) * base_hz, -RESAMPLE_LOWPASS_FILTER_WIDTH, RESAMPLE_LOWPASS_FILTER_WIDTH)
    window = np.cos(t * np.float32(math.pi / RESAMPLE_LOWPASS_FILTER_WIDTH / 2)) ** 2
    t = t * np.float32(math.pi)
    scale = base_hz / np.float32(orig_hz)
    safe_t = np.where(t == 0, np.float32(1), t)
    kernel = np.where(t == 0, np.float32(1), np.sin(safe_t) / safe_t) * window * scale
    kernel = np.ascontiguousarray(kernel, dtype=np.float32)
    kernel.flags.writeable = False
    return kernel, width


def resample(wav: np.ndarray, orig_hz: int, new_hz: int) -> np.ndarray:
    """Resample a 1-D float signal like torchaudio.functional.resample's default (sinc_interp_hann).

    The kernel for each rate pair is cached, so serving never rebuilds it per request. The strided
    convolution is one float32 matmul over the signal's windows (a view, no copy of the windows).
    """
    if orig_hz <= 0 or new_hz <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_hz} -> {new_hz}")
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if orig_hz == new_hz:
        return wav.copy()
    gcd = math.gcd(int(orig_hz), int(new_hz))
    orig, new = int(orig_hz) // gcd, int(new_hz) // gcd
    kernel, width = _resample_kernel(orig, new)
    length = wav.shape[0]
    padded = np.pad(wav, (width, width + orig))
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::orig]   # [frames, K]
    y = (windows @ kernel.T).reshape(-1)                                                  # frame-major
    target = math.ceil(new * length / orig)
    return np.ascontiguousarray(y[:target], dtype=np.float32)


# --- prompt preparation ------------------------------------------------------------------------------
def validate_prompt(wav: np.ndarray, sample_rate_hz: int) -> float:
    """Check a decoded mono prompt; returns its duration in seconds or raises AudioValidationError."""
    if sample_rate_hz < MIN_PROMPT_SAMPLE_RATE_HZ:
        raise AudioValidationError(
            f"prompt sample rate {sample_rate_hz} Hz is below the minimum {MIN_PROMPT_SAMPLE_RATE_HZ} Hz")
    duration_s = wav.shape[-1] / sample_rate_hz
    if not np.all(np.isfinite(wav)):
        raise AudioValidationError("prompt audio contains NaN or infinite samples")
    if duration_s < PROMPT_MIN_SECONDS:
        raise AudioValidationError(
            f"prompt audio is too short: {duration_s:.3f} s (minimum {PROMPT_MIN_SECONDS} s)")
    if duration_s > PROMPT_MAX_SECONDS:
        raise AudioValidationError(
            f"prompt audio is too long: {duration_s:.3f} s (maximum {PROMPT_MAX_SECONDS} s)")
    if float(np.max(np.abs(wav))) < SILENCE_PEAK_AMPLITUDE:
        raise AudioValidationError("prompt audio is silent")
    return float(duration_s)


def prepare_prompt(data: bytes) -> PromptAudio:
    """Decode an uploaded prompt and produce the 16 kHz (tokens, x-vector) and 24 kHz (mel) signals.

    Like the reference `load_wav`, both rates are resampled from the original file (not 24k from 16k).
    """
    wav, sample_rate_hz = decode_audio(data, max_seconds=PROMPT_MAX_SECONDS)
    duration_s = validate_prompt(wav, sample_rate_hz)
    wav_16k = resample(wav, sample_rate_hz, PROMPT_16K_SAMPLE_RATE_HZ)
    wav_24k = resample(wav, sample_rate_hz, OUTPUT_SAMPLE_RATE_HZ)
    return PromptAudio(wav_16k=wav_16k, wav_24k=wav_24k, duration_s=duration_s)


# --- encode ------------------------------------------------------------------------------------------
def wav_header(sample_rate_hz: int, num_samples: int | None) -> bytes:
    """44-byte RIFF header for mono 16-bit PCM; `num_samples=None` writes the streaming (unknown) sizes."""
    if num_samples is None:
        riff_size = data_size = _WAV_UNKNOWN_SIZE
    else:
        data_size = num_samples * _PCM16_BYTES
        riff_size = data_size + _WAV_HEADER_BYTES - 8
    byte_rate = sample_rate_hz * _PCM16_BYTES
    return b"".join((
        b"RIFF", struct.pack("<I", riff_size), b"WAVE",
        b"fmt ", struct.pack("<IHHIIHH", 16, _WAV_FORMAT_PCM, 1, sample_rate_hz, byte_rate, _PCM16_BYTES,
                             _PCM16_BITS),
        b"data", struct.pack("<I", data_size),
    ))


def _resample_output(wav: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    if sample_rate_hz == OUTPUT_SAMPLE_RATE_HZ:
        return wav
    import soxr  # only needed when a client asks for another rate

    return soxr.resample(wav, OUTPUT_SAMPLE_RATE_HZ, sample_rate_hz).astype(np.float32, copy=False)


def _to_pcm16(wav: np.ndarray) -> np.ndarray:
    return (np.clip(wav, -1.0, 1.0) * _PCM16_MAX).round().astype("<i2")


def encode_audio(wav_24k: np.ndarray, sample_rate_hz: int = OUTPUT_SAMPLE_RATE_HZ, encoding: str = "wav",
                 *, streaming_header: bool = False, first_chunk: bool = True) -> bytes:
    """Encode a 24 kHz float waveform (resampled with soxr to `sample_rate_hz` first).

    `encoding="wav"` with `streaming_header=True` emits a header with unknown length on the first chunk
    only and raw PCM on the following chunks, so the concatenated chunks are a playable wav stream.
    Raises ValueError for unsupported encodings, rates, or codec/rate combinations.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported encoding {encoding!r}; expected one of {ENCODINGS}")
    if sample_rate_hz not in SUPPORTED_OUTPUT_RATES_HZ:
        raise ValueError(f"unsupported sample rate {sample_rate_hz} Hz; expected one of {SUPPORTED_OUTPUT_RATES_HZ}")
    if encoding == "opus" and sample_rate_hz not in OPUS_RATES_HZ:
        raise ValueError(f"opus does not support {sample_rate_hz} Hz; use one of {OPUS_RATES_HZ}")
    if encoding == "mp3" and sample_rate_hz not in MP3_RATES_HZ:
        raise ValueError(f"mp3 does not support {sample_rate_hz} Hz; use one of {MP3_RATES_HZ}")
    if streaming_header and encoding != "wav":
        raise ValueError("streaming_header applies only to encoding='wav'")
    wav = _resample_output(np.asarray(wav_24k, dtype=np.float32).reshape(-1), sample_rate_hz)

    if encoding == "pcm_s16le":
        return _to_pcm16(wav).tobytes()
    if encoding == "float32":
        return wav.astype("<f4").tobytes()
    if encoding == "wav":
        pcm = _to_pcm16(wav).tobytes()
        if streaming_header:
            return (wav_header(sample_rate_hz, None) + pcm) if first_chunk else pcm
        return wav_header(sample_rate_hz, wav.shape[0]) + pcm
    container = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}
    fmt, subtype = container[encoding]
    import soundfile as sf

    buf = io.BytesIO()
    try:
        sf.write(buf, np.clip(wav, -1.0, 1.0), sample_rate_hz, format=fmt, subtype=subtype)
    except Exception as exc:  # a libsndfile built without this codec
        raise ValueError(f"cannot encode {encoding} at {sample_rate_hz} Hz: {exc}") from exc
    return buf.getvalue()


# --- mel filter banks shared by the feature extractors -----------------------------------------------
_SLANEY_LINEAR_HZ_PER_MEL = 200.0 / 3
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_slaney_mel(freq_hz: np.ndarray) -> np.ndarray:
    freq_hz = np.asarray(freq_hz, dtype=np.float64)
    mel = freq_hz / _SLANEY_LINEAR_HZ_PER_MEL
    log_start_mel = _SLANEY_LOG_START_HZ / _SLANEY_LINEAR_HZ_PER_MEL
    above = freq_hz >= _SLANEY_LOG_START_HZ
    mel = np.where(above, log_start_mel + np.log(np.maximum(freq_hz, 1e-12) / _SLANEY_LOG_START_HZ)
                   / _SLANEY_LOG_STEP, mel)
    return mel


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    log_start_mel = _SLANEY_LOG_START_HZ / _SLANEY_LINEAR_HZ_PER_MEL
    freq_hz = mel * _SLANEY_LINEAR_HZ_PER_MEL
    return np.where(mel >= log_start_mel,
                    _SLANEY_LOG_START_HZ * np.exp(_SLANEY_LOG_STEP * (mel - log_start_mel)), freq_hz)


@lru_cache(maxsize=8)
def slaney_mel_filterbank(sample_rate_hz: int, n_fft: int, n_mels: int, fmin_hz: float = 0.0,
                          fmax_hz: float | None = None) -> np.ndarray:
    """librosa.filters.mel(htk=False, norm='slaney') computed in numpy float64, returned float32 [n_mels, 1+n_fft//2].

    Cached and read-only: callers share one array per configuration.
    """
    fmax_hz = sample_rate_hz / 2 if fmax_hz is None else fmax_hz
    fft_freqs_hz = np.linspace(0.0, sample_rate_hz / 2, 1 + n_fft // 2)
    mel_points = np.linspace(_hz_to_slaney_mel(fmin_hz), _hz_to_slaney_mel(fmax_hz), n_mels + 2)
    mel_freqs_hz = _slaney_mel_to_hz(mel_points)
    fdiff = np.diff(mel_freqs_hz)
    ramps = mel_freqs_hz[:, None] - fft_freqs_hz[None, :]
    weights = np.zeros((n_mels, fft_freqs_hz.shape[0]), dtype=np.float64)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(lower, upper))
    # Slaney area normalisation: each triangle integrates to a constant.
    weights *= (2.0 / (mel_freqs_hz[2:n_mels + 2] - mel_freqs_hz[:n_mels]))[:, None]
    out = weights.astype(np.float32)
    out.flags.writeable = False
    return out
