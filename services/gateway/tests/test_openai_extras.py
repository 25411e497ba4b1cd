"""OpenAI surface extras over the real stack (gateway process, tritonserver stages, Redis): OpenAI voice names
speak with the default voice, in-request cloning (ref_audio/ref_text), SSE streaming, /docs."""
import base64
import io
import json
import time

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
def http_url(stack) -> str:
    url = stack.gateway_http_url
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return url


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


def test_sse_stream_carries_base64_audio_deltas_then_done(http_url):
    body = {"model": "cosyvoice2", "voice": "001", "input": "Hello.", "response_format": "pcm",
            "stream_format": "sse", **FORCED}
    with httpx.stream("POST", f"{http_url}/v1/audio/speech", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] == N_TOKENS
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert all(e["type"] == "speech.audio.delta" for e in events[:-1])
    assert np.frombuffer(pcm, "<i2").shape[0] == N_TOKENS * SAMPLES_PER_TOKEN


def test_docs_and_openapi_are_served(http_url):
    assert httpx.get(f"{http_url}/docs").status_code == 200
    assert "/v1/audio/speech" in httpx.get(f"{http_url}/openapi.json").json()["paths"]
