"""Fuzz the gRPC gateway of a real stack with random SynthesizeRequests (hypothesis, bounded).

Every answer is OK or a client-error status (INVALID_ARGUMENT / NOT_FOUND), never INTERNAL, UNKNOWN or a hang,
and health stays SERVING throughout. Lengths are drawn small so valid requests finish fast on the tiny CPU
model. FUZZ_EXAMPLES (default 20) sets the number of examples.
"""
from __future__ import annotations

import io
import os

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_gateway.testing import prompt_wav_bytes

pytestmark = [pytest.mark.stack, pytest.mark.slow]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
CALL_TIMEOUT_S = 60.0


def _wav(seconds: float, rate: int, channels: int, subtype: str) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * 200 * t)
    data = mono if channels == 1 else np.stack([mono] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, data.astype(np.float32), rate, format="WAV", subtype=subtype)
    return buf.getvalue()


GOOD = prompt_wav_bytes(seed=31)
AUDIO = st.one_of(
    st.just(b""),
    st.just(GOOD),
    st.binary(max_size=512),
    st.builds(lambda cut: GOOD[:cut], st.integers(0, len(GOOD))),          # truncated WAV
    st.builds(_wav, st.sampled_from([0.0, 0.05, 0.6, 2.0]), st.sampled_from([8000, 16000, 44100]),
              st.sampled_from([1, 2]), st.sampled_from(["PCM_16", "PCM_U8", "FLOAT"])),
)
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["Hello.", "你好，世界。", "...", "🙂🙂", " ", "a" * 10_001]))
BOUND = st.sampled_from([-3, 0, 1, 4, 12, 30, 3001, 2**31 - 1])


SAMPLING = st.builds(
    tts_pb2.SamplingParams,
    temperature=st.sampled_from([0.0, 0.7, 1.0, -1.0, float("nan"), float("inf"), 1e30]),
    top_p=st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.1, float("nan")]),
    top_k=st.sampled_from([0, 1, 25, -4, 100_000]),
    seed=st.sampled_from([0, 1, 2**63 - 1, -1, -(2**63)]))
# One strategy per field: any value, good or hostile. A drawn request is a good one with some fields replaced,
# so that both valid and invalid paths are exercised.
FIELDS = {
    "text": TEXT,
    "speaker_id": st.sampled_from(["ghost", "bad id!", "x" * 300]),
    "prompt_audio": AUDIO,
    "prompt_text": st.text(max_size=20),
    "instruct": st.sampled_from(["Speak slowly.", "<|endofprompt|>", "x" * 200]),
    "sample_rate": st.sampled_from([0, 16000, 48000, 1, -1, 12345]),
    "encoding": st.sampled_from([0, 1, 2, 3, 4, 77]),
    "request_id": st.sampled_from(["", "dup", "x" * 500, "\u00e9\u4e2d"]),
    "sampling": SAMPLING,
    "min_speech_tokens": BOUND,
    "max_speech_tokens": BOUND.filter(lambda b: b != 0),   # 0 = model rule: too many tokens for a fuzz loop
}


@st.composite
def requests(draw) -> tts_pb2.SynthesizeRequest:
    fields = dict(text="Hello world.", prompt_audio=GOOD, prompt_text="a prompt", min_speech_tokens=6,
                  max_speech_tokens=6, sampling=tts_pb2.SamplingParams(seed=3))
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
        fields[name] = draw(FIELDS[name])
    if fields.get("speaker_id"):
        fields["prompt_audio"] = draw(st.sampled_from([b"", fields["prompt_audio"]]))
    return tts_pb2.SynthesizeRequest(**fields)


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(stack.gateway_grpc_url, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        yield ch


def _serving(channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_random_requests_get_only_expected_statuses_and_health_stays_serving(channel):
    stub = tts_pb2_grpc.TextToSpeechStub(channel)
    seen: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=requests(), streaming=st.booleans())
    def check(request, streaming):
        try:
            if streaming:
                for _ in stub.SynthesizeStream(request, timeout=CALL_TIMEOUT_S):
                    pass
            else:
                stub.Synthesize(request, timeout=CALL_TIMEOUT_S)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        seen[code.name] = seen.get(code.name, 0) + 1
        assert code in EXPECTED, f"{code.name}: {details}\nrequest: {request}"[:2000]
        assert code is grpc.StatusCode.OK or details, "an error status without a message"

    check()
    print("fuzz statuses:", seen)
    assert _serving(channel)
    assert seen.get("OK", 0) + seen.get("INVALID_ARGUMENT", 0) > 0
