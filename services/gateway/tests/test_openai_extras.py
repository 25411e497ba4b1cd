"""OpenAI surface extras over the real stack (gateway process, tritonserver stages, Redis): OpenAI voice names
speak with the default voice, in-request cloning (ref_audio/ref_text), SSE streaming, /docs."""
import base64
import io
import json

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from cosyvoice_common.constants import SAMPLES_PER_TOKEN
from cosyvoice_gateway.testing import prompt_wav_bytes

pytestmark = [pytest.mark.stack, pytest.mark.slow]
N_TOKENS = 10
FORCED = {"min_speech_tokens": N_TOKENS, "max_speech_tokens": N_TOKENS, "seed": 3}


@pytest.fixture(scope="module")
def http_url(stack_http_url) -> str:
    return stack_http_url


@pytest.fixture(scope="module")
def client(http_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _samples(wav_bytes: bytes) -> int:
    return sf.info(io.BytesIO(wav_bytes)).frames


def test_openai_voice_names_speak_with_the_default_voice(client):
    audio = client.audio.speech.create(model="cosyvoice2", voice="alloy", input="Hello.", response_format="wav",
                                       extra_body=FORCED)
    assert _samples(audio.content) == N_TOKENS * SAMPLES_PER_TOKEN


def test_ref_audio_clones_in_request(client):
    ref = base64.b64encode(prompt_wav_bytes(seed=5)).decode()
    audio = client.audio.speech.create(model="cosyvoice2", voice="alloy", input="Hello.", response_format="wav",
                                       extra_body={**FORCED, "ref_audio": ref, "ref_text": "hi there"})
    assert _samples(audio.content) == N_TOKENS * SAMPLES_PER_TOKEN
    with pytest.raises(openai.BadRequestError):
        client.audio.speech.create(model="cosyvoice2", voice="alloy", input="Hello.",
                                   extra_body={"ref_audio": "not base64!"})


def _sse_events(http_url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{http_url}/v1/audio/speech", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]


def test_sse_stream_carries_base64_audio_deltas_then_done_with_usage_and_timings(http_url):
    tokens = 40                      # first chunk + one hop + final: several deltas
    events = _sse_events(http_url, {"model": "cosyvoice2", "voice": "001", "input": "Hello.", "response_format": "pcm",
                                    "stream_format": "sse", **FORCED, "min_speech_tokens": tokens,
                                    "max_speech_tokens": tokens})
    done = events[-1]
    assert done["type"] == "speech.audio.done" and done["usage"]["output_tokens"] == tokens
    assert done["usage"]["input_tokens"] > 0
    assert done["usage"]["total_tokens"] == done["usage"]["input_tokens"] + tokens
    assert len(events) >= 3 and all(e["type"] == "speech.audio.delta" for e in events[:-1])
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert np.frombuffer(pcm, "<i2").shape[0] == tokens * SAMPLES_PER_TOKEN
    timings = done["timings"]                 # ours, beside OpenAI's usage: what the playground shows
    assert 0 < timings["first_chunk_ms"] <= timings["total_ms"]
    assert timings["audio_seconds"] == pytest.approx(tokens / 25) and timings["speech_tokens"] == tokens
    assert timings["llm"]["calls"] == 1 and timings["token2wav"]["calls"] >= 2
    assert timings["token2wav"]["compute_ms"] > 0


def test_sse_carries_mp3_and_a_speed_as_one_whole_delta(http_url):
    events = _sse_events(http_url, {"model": "cosyvoice2", "voice": "001", "input": "Hello.", "response_format": "mp3",
                                    "stream_format": "sse", "speed": 0.5, **FORCED})
    assert [e["type"] for e in events] == ["speech.audio.delta", "speech.audio.done"]
    with av.open(io.BytesIO(base64.b64decode(events[0]["audio"]))) as mp3:
        samples = sum(frame.samples for frame in mp3.decode(audio=0))
    expected = int(N_TOKENS * 2 / 0.5) * SAMPLES_PER_TOKEN // 2
    assert abs(samples - expected) < 0.1 * expected


def test_sse_with_stream_false_is_a_400_naming_the_conflict(client):
    with pytest.raises(openai.BadRequestError, match="stream_format 'sse'"):
        client.audio.speech.create(model="cosyvoice2", voice="001", input="Hello.", extra_body={
            **FORCED, "stream": False, "stream_format": "sse"})


def test_docs_and_openapi_are_served(http_url):
    assert httpx.get(f"{http_url}/docs").status_code == 200
    assert "/v1/audio/speech" in httpx.get(f"{http_url}/openapi.json").json()["paths"]
