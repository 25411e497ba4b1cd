"""Hostile input at every public entry of a real stack (gateway + tritonserver stages + Redis).

Each bad request gets a clear status and message, the same on Synthesize and SynthesizeStream (and a 4xx
JSON error over HTTP), and the gateway keeps serving: health stays SERVING and a good request still works.
Prompts that are odd but usable (stereo, 8-bit, 48 kHz, FLAC) are served.
"""
from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import soundfile as sf
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.audio import PROMPT_MAX_BYTES
from cosyvoice_common.constants import SAMPLES_PER_TOKEN
from cosyvoice_gateway.server import GRPC_MESSAGE_OVERHEAD_BYTES
from cosyvoice_gateway.testing import prompt_wav_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.stack, pytest.mark.slow]
N_TOKENS = 8             # forced length of the good requests: one token2wav call, fast on CPU
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _voice(wav: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return mono if channels == 1 else np.stack([mono * (0.5 + 0.5 * c) for c in range(channels)], axis=1)


GOOD_PROMPT = prompt_wav_bytes(seed=21)


def _req(**kw) -> tts_pb2.SynthesizeRequest:
    kw.setdefault("text", "Hello there.")
    if "speaker_id" not in kw:
        kw.setdefault("prompt_audio", GOOD_PROMPT)
        kw.setdefault("prompt_text", "a prompt")
    kw.setdefault("min_speech_tokens", N_TOKENS)
    kw.setdefault("max_speech_tokens", N_TOKENS)
    return tts_pb2.SynthesizeRequest(**kw)


NAN_WAV = _voice(np.full(32000, np.nan, np.float32), 16000, subtype="FLOAT")
# (id, request, expected code, fragment of the message)
BAD = [
    ("empty-text", _req(text=""), INVALID, "text is empty"),
    ("blank-text", _req(text=" \n\t "), INVALID, "text is empty"),
    ("huge-text", _req(text="a" * 10_001), INVALID, "characters"),
    ("only-punctuation", _req(text="?!... ;;"), INVALID, "nothing to speak"),
    ("only-emoji", _req(text="😀🎉👍"), INVALID, "nothing to speak"),
    ("no-voice", _req(prompt_audio=b"", prompt_text=""), INVALID, "no voice"),
    ("undecodable-audio", _req(prompt_audio=b"RIFF not really a wav" * 10), INVALID, "decode"),
    ("random-bytes-audio", _req(prompt_audio=np.random.default_rng(0).bytes(5000)), INVALID, "prompt_audio"),
    ("header-only-wav", _req(prompt_audio=_voice(np.zeros(0, np.float32), 16000)), INVALID, "prompt_audio"),
    ("very-short-audio", _req(prompt_audio=_voice(_tone(0.05, 16000), 16000)), INVALID, "too short"),
    ("very-long-audio", _req(prompt_audio=_voice(_tone(40.0, 16000), 16000)), INVALID, "too long"),
    ("8khz-audio", _req(prompt_audio=_voice(_tone(2.0, 8000), 8000)), INVALID, "sample rate"),
    ("silent-audio", _req(prompt_audio=_voice(np.zeros(32000, np.float32), 16000)), INVALID, "silent"),
    ("nan-audio", _req(prompt_audio=NAN_WAV), INVALID, "NaN"),
    ("unknown-speaker", _req(speaker_id="nobody-here"), grpc.StatusCode.NOT_FOUND, "nobody-here"),
    ("weird-speaker-id", _req(speaker_id="../../etc/passwd\x00"), grpc.StatusCode.NOT_FOUND, "not registered"),
    ("speaker-and-prompt", _req(speaker_id="x", prompt_audio=GOOD_PROMPT), INVALID, "not both"),
    ("min-above-max", _req(min_speech_tokens=9, max_speech_tokens=3), INVALID, "min_speech_tokens"),
    ("negative-bound", _req(min_speech_tokens=-1, max_speech_tokens=0), INVALID, ">= 0"),
    ("absurd-length", _req(min_speech_tokens=0, max_speech_tokens=2_000_000_000), INVALID, "limit"),
    ("bad-rate", _req(sample_rate=11025), INVALID, "sample_rate"),
    ("negative-rate", _req(sample_rate=-24000), INVALID, "sample_rate"),
    ("bad-encoding", _req(encoding=99), INVALID, "encoding"),
    ("bad-top-p", _req(sampling=tts_pb2.SamplingParams(top_p=2.0)), INVALID, "top_p"),
    ("negative-temperature", _req(sampling=tts_pb2.SamplingParams(temperature=-1.0)), INVALID, "temperature"),
    ("nan-temperature", _req(sampling=tts_pb2.SamplingParams(temperature=float("nan"))), INVALID, "temperature"),
    ("negative-seed", _req(sampling=tts_pb2.SamplingParams(seed=-5)), INVALID, "seed"),
]

ODD_BUT_FINE = [
    ("stereo", _voice(_tone(2.0, 16000, channels=2), 16000)),
    ("six-channels", _voice(_tone(2.0, 16000, channels=6), 16000)),
    ("8-bit", _voice(_tone(2.0, 16000), 16000, subtype="PCM_U8")),
    ("48khz-24bit", _voice(_tone(2.0, 48000), 48000, subtype="PCM_24")),
    ("flac-22khz", _voice(_tone(2.0, 22050), 22050, subtype="PCM_16", fmt="FLAC")),
    ("float-44khz", _voice(_tone(2.0, 44100), 44100, subtype="FLOAT")),
]


def _call_both(stub, request, timeout_s: float = 60.0) -> list[tuple[grpc.StatusCode, str, bytes]]:
    out = []
    try:
        reply = stub.Synthesize(request, timeout=timeout_s)
        out.append((OK, "", reply.audio))
    except grpc.RpcError as exc:
        out.append((exc.code(), exc.details() or "", b""))
    try:
        audio = b"".join(c.audio for c in stub.SynthesizeStream(request, timeout=timeout_s))
        out.append((OK, "", audio))
    except grpc.RpcError as exc:
        out.append((exc.code(), exc.details() or "", b""))
    return out


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(stack.gateway_grpc_url) as ch:
        yield ch


def _serving(channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_grpc_input_gets_a_clear_status_on_both_rpcs(channel, case):
    _, request, code, fragment = case
    stub = tts_pb2_grpc.TextToSpeechStub(channel)
    (unary_code, unary_msg, _), (stream_code, stream_msg, _) = _call_both(stub, request)
    assert unary_code == stream_code == code, (unary_code, unary_msg, stream_code, stream_msg)
    assert fragment.lower() in unary_msg.lower() and fragment.lower() in stream_msg.lower(), unary_msg
    assert "Traceback" not in unary_msg


@pytest.mark.parametrize("case", ODD_BUT_FINE, ids=[c[0] for c in ODD_BUT_FINE])
def test_odd_but_usable_prompts_are_served(channel, case):
    stub = tts_pb2_grpc.TextToSpeechStub(channel)
    for code, message, audio in _call_both(stub, _req(prompt_audio=case[1])):
        assert code == OK, message
        assert len(audio) == 2 * N_TOKENS * SAMPLES_PER_TOKEN


def test_oversized_message_is_resource_exhausted_and_the_gateway_keeps_serving(channel):
    stub = tts_pb2_grpc.TextToSpeechStub(channel)
    too_big = PROMPT_MAX_BYTES + GRPC_MESSAGE_OVERHEAD_BYTES + 1   # above the gateway's gRPC receive limit
    request = _req(prompt_audio=b"\0" * too_big)
    for code, message, _ in _call_both(stub, request):
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    register = tts_pb2.RegisterSpeakerRequest(speaker_id="big", prompt_audio=b"\0" * too_big)
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterSpeaker(register, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _serving(channel)


def test_bad_register_speaker_input_is_rejected(channel):
    stub = tts_pb2_grpc.TextToSpeechStub(channel)
    cases = [("", GOOD_PROMPT, "speaker_id"), ("bad id!", GOOD_PROMPT, "speaker_id"), ("x" * 200, GOOD_PROMPT, "speaker_id"),
             ("ok-id", b"", "empty"), ("ok-id", b"garbage", "decode"),
             ("ok-id", _voice(_tone(0.05, 16000), 16000), "too short")]
    for speaker_id, audio, fragment in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(speaker_id=speaker_id, prompt_audio=audio), timeout=30)
        assert info.value.code() == INVALID and fragment in info.value.details(), info.value.details()
    ids = [s.speaker_id for s in stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), timeout=10).speakers]
    assert "ok-id" not in ids and "bad id!" not in ids


def test_after_all_the_abuse_the_gateway_is_serving_and_synthesizes(channel):
    stub = tts_pb2_grpc.TextToSpeechStub(channel)
    assert _serving(channel)
    for code, message, audio in _call_both(stub, _req()):
        assert code == OK, message
        assert len(audio) == 2 * N_TOKENS * SAMPLES_PER_TOKEN


# --- HTTP (OpenAI-compatible) ----------------------------------------------------------------------------
def _http(url: str, body: bytes | None = None, content_type: str = "application/json", method: str = "POST"):
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "reliability-boundary-7d1f"
    parts = []
    for name, (filename, value) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def http_url(stack):
    status, body = _http(f"{stack.gateway_http_url}/v1/models", method="GET")
    assert status == 200, f"the gateway's HTTP API is not served: {status} {body[:200]!r}"
    return stack.gateway_http_url


def test_bad_http_input_gets_a_4xx_json_error_and_health_stays_ok(http_url):
    speech = f"{http_url}/v1/audio/speech"
    good = {"model": "cosyvoice2", "input": "hello", "voice": "nobody-here"}
    cases = [
        (b"{not json", "application/json", 400, 422),
        (b"", "application/json", 400, 422),
        (json.dumps({"model": "cosyvoice2"}).encode(), "application/json", 400, 422),
        (json.dumps({**good, "input": ""}).encode(), "application/json", 400, 422),
        (json.dumps({**good, "input": "x" * 10_001}).encode(), "application/json", 400, 422),
        (json.dumps(good).encode(), "application/json", 404, 404),
        (json.dumps({**good, "response_format": "exe"}).encode(), "application/json", 400, 422),
        (json.dumps({**good, "speed": -3}).encode(), "application/json", 400, 422),
        (json.dumps({**good, "min_speech_tokens": 9, "max_speech_tokens": 3}).encode(), "application/json", 400, 422),
        (json.dumps({**good, "surprise": 1}).encode(), "application/json", 400, 422),
        ("\udcff".encode("utf-8", "surrogatepass"), "application/json", 400, 422),
    ]
    for body, content_type, lo, hi in cases:
        status, payload = _http(speech, body, content_type)
        assert status in (lo, hi, 400, 404, 422), (body[:60], status, payload[:200])
        error = json.loads(payload)["error"]
        assert error["message"] and "Traceback" not in error["message"]
    for fields in ({"name": (None, b"v1"), "audio": ("a.wav", b"garbage")},
                   {"name": (None, b"bad name!"), "audio": ("a.wav", GOOD_PROMPT)},
                   {"name": (None, b"v2"), "audio": ("a.wav", _voice(_tone(0.05, 16000), 16000))}):
        body, content_type = _multipart(fields)
        status, payload = _http(f"{http_url}/v1/audio/voices", body, content_type)
        assert 400 <= status < 500, (status, payload[:200])
        assert json.loads(payload)["error"]["message"]
    status, _ = _http(f"{http_url}/healthz", method="GET")
    assert status == 200
