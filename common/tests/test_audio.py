import io
import struct

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from cosyvoice_common.audio import (AudioDecodeError, AudioValidationError, decode_audio, encode_audio,
                                    prepare_prompt, resample, slaney_mel_filterbank, wav_header)
from cosyvoice_common.constants import OUTPUT_SAMPLE_RATE_HZ, PROMPT_16K_SAMPLE_RATE_HZ


def _tone(seconds: float, rate_hz: int, freq_hz: float = 220.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    return (amp * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def _file(data: np.ndarray, rate_hz: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate_hz, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_stereo_wav_is_averaged_to_mono():
    left, right = _tone(1.0, 16000), _tone(1.0, 16000, 330.0, 0.25)
    wav, rate = decode_audio(_file(np.stack([left, right], 1), 16000, "WAV", "FLOAT"))
    assert rate == 16000 and wav.dtype == np.float32 and wav.ndim == 1
    np.testing.assert_allclose(wav, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("subtype,atol", [("PCM_U8", 1 / 64), ("PCM_16", 1e-4), ("PCM_24", 1e-6),
                                          ("PCM_32", 1e-6), ("FLOAT", 0), ("DOUBLE", 1e-7)])
def test_integer_and_float_wavs_decode_to_unit_range(subtype, atol):
    x = _tone(0.6, 22050)
    wav, rate = decode_audio(_file(x, 22050, "WAV", subtype))
    assert rate == 22050
    np.testing.assert_allclose(wav, x, atol=atol)


def test_flac_decodes():
    x = _tone(0.7, 44100)
    wav, rate = decode_audio(_file(x, 44100, "FLAC", "PCM_16"))
    assert rate == 44100
    np.testing.assert_allclose(wav, x, atol=1e-4)


@pytest.mark.parametrize("data", [b"", b"not audio at all" * 10])
def test_undecodable_bytes_raise_typed_error(data):
    with pytest.raises(AudioDecodeError):
        decode_audio(data)


def test_zero_sample_file_raises():
    with pytest.raises(AudioDecodeError, match="no samples"):
        decode_audio(_file(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"))


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 24000), (22050, 24000), (16000, 24000),
                                      (24000, 16000)])
def test_resample_matches_torchaudio_default(orig, new):
    x = np.random.default_rng(orig + new).standard_normal(9001).astype(np.float32) * 0.3
    want = AF.resample(torch.from_numpy(x), orig, new).numpy()
    got = resample(x, orig, new)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_prepare_prompt_gives_both_rates_from_the_original():
    x = _tone(1.5, 44100)
    prompt = prepare_prompt(_file(x, 44100, "WAV", "PCM_16"))
    assert prompt.duration_s == pytest.approx(1.5)
    assert prompt.wav_16k.shape == (int(1.5 * PROMPT_16K_SAMPLE_RATE_HZ),)
    assert prompt.wav_24k.shape == (int(1.5 * OUTPUT_SAMPLE_RATE_HZ),)
    assert 0.45 < np.abs(prompt.wav_24k).max() < 0.55


@pytest.mark.parametrize("x,message", [
    (_tone(0.2, 16000), "too short"),
    (_tone(31.0, 16000), "too long"),
    (np.zeros(16000, np.float32), "silent"),
    (np.where(np.arange(16000) == 5, np.nan, 0.3).astype(np.float32), "NaN"),
])
def test_bad_prompts_raise_validation_error(x, message):
    with pytest.raises(AudioValidationError, match=message):
        prepare_prompt(_file(x, 16000, "WAV", "FLOAT"))


def test_low_rate_prompt_is_rejected():
    with pytest.raises(AudioValidationError, match="below the minimum"):
        prepare_prompt(_file(_tone(1.0, 8000), 8000, "WAV", "PCM_16"))


def test_wav_header_fields():
    h = wav_header(24000, 100)
    assert len(h) == 44 and h[:4] == b"RIFF" and h[8:12] == b"WAVE"
    assert struct.unpack("<I", h[40:44])[0] == 200 and struct.unpack("<I", h[4:8])[0] == 236
    assert struct.unpack("<I", h[24:28])[0] == 24000
    assert struct.unpack("<I", wav_header(24000, None)[40:44])[0] == 0xFFFFFFFF


def test_wav_roundtrip_with_resampling():
    x = _tone(0.5, OUTPUT_SAMPLE_RATE_HZ)
    data = encode_audio(x, 16000, "wav")
    wav, rate = decode_audio(data)
    assert rate == 16000 and wav.shape == (8000,)
    np.testing.assert_allclose(wav[100:-100], _tone(0.5, 16000)[100:-100], atol=2e-3)


def test_streaming_wav_header_only_on_first_chunk():
    x = _tone(0.2, OUTPUT_SAMPLE_RATE_HZ)
    first = encode_audio(x, OUTPUT_SAMPLE_RATE_HZ, "wav", streaming_header=True, first_chunk=True)
    later = encode_audio(x, OUTPUT_SAMPLE_RATE_HZ, "wav", streaming_header=True, first_chunk=False)
    assert first[:4] == b"RIFF" and len(first) == 44 + 2 * x.size
    assert later == encode_audio(x, OUTPUT_SAMPLE_RATE_HZ, "pcm_s16le")


def test_raw_encodings():
    x = np.array([0.0, 0.5, -1.0, 2.0], np.float32)
    assert np.frombuffer(encode_audio(x, OUTPUT_SAMPLE_RATE_HZ, "pcm_s16le"), "<i2").tolist() == [0, 16384, -32767, 32767]
    np.testing.assert_array_equal(np.frombuffer(encode_audio(x, OUTPUT_SAMPLE_RATE_HZ, "float32"), "<f4"), x)


@pytest.mark.parametrize("encoding,rate", [("flac", 24000), ("flac", 44100), ("opus", 48000), ("mp3", 24000)])
def test_compressed_encodings_decode_back(encoding, rate):
    data = encode_audio(_tone(1.0, OUTPUT_SAMPLE_RATE_HZ), rate, encoding)
    wav, got_rate = decode_audio(data)
    assert got_rate == rate and abs(wav.shape[0] - rate) < rate * 0.1
    # Lossy codecs ring at the abrupt edges; the middle keeps the tone's RMS (0.5 / sqrt 2).
    middle = wav[rate // 4:-rate // 4]
    assert np.sqrt(np.mean(middle ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


@pytest.mark.parametrize("kwargs", [dict(encoding="aac"), dict(sample_rate_hz=12345), dict(encoding="opus", sample_rate_hz=44100),
                                    dict(encoding="flac", streaming_header=True)])
def test_unsupported_combinations_raise(kwargs):
    args = dict(sample_rate_hz=OUTPUT_SAMPLE_RATE_HZ, encoding="wav") | kwargs
    with pytest.raises(ValueError):
        encode_audio(_tone(0.1, OUTPUT_SAMPLE_RATE_HZ), **args)


def test_slaney_filterbank_is_cached_and_read_only():
    a = slaney_mel_filterbank(16000, 400, 128)
    assert a is slaney_mel_filterbank(16000, 400, 128)
    assert a.shape == (128, 201) and not a.flags.writeable
