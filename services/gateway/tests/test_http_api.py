"""The HTTP surface without stage servers: OpenAI-shaped errors, health gating, metrics, voice registry errors.

A real Gateway (gRPC + HTTP in one loop) over unreachable stage URLs and a private real Redis; the official
`openai` client and httpx talk to it over 127.0.0.1. Anything that needs audio out is in test_http_stack.py.
"""
import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from cosyvoice_gateway.http_api import HttpConfig
from cosyvoice_gateway.server import Gateway, GatewayConfig
from cosyvoice_gateway.testing import char_encoder, free_port, prompt_wav_bytes

UNREACHABLE = "127.0.0.1:1"


def _config(redis_url: str) -> GatewayConfig:
    return GatewayConfig(model_dir=Path("unused"), tokenizer_urls=UNREACHABLE, speaker_urls=UNREACHABLE,
                         llm_urls=UNREACHABLE, token2wav_urls=UNREACHABLE, redis_url=redis_url,
                         model_revision="test-http", grpc_port=free_port(), http_port=free_port(), metrics_port=0,
                         stage_timeout_s=0.5, readiness_interval_s=0.2, grace_s=1.0)


def run_with_http(redis_url: str, body):
    async def run():
        config = _config(redis_url)
        gateway = Gateway(config, encode_text=char_encoder)
        await gateway.start()
        base = f"http://127.0.0.1:{config.http_port}"
        try:
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                for _ in range(100):                 # uvicorn binds in a task of the same loop
                    try:
                        await http.get("/healthz")
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
                client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=10)
                await body(client, http)
        finally:
            await gateway.stop()
    asyncio.run(run())


def _error(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


BAD_SPEECH = [
    (dict(voice="ghost"), openai.NotFoundError, "ghost"),
    (dict(voice="ghost", speed=1.5), openai.NotFoundError, "ghost"),      # a speed in range passes validation
    (dict(voice="ghost", response_format="wma"), openai.BadRequestError, "response_format"),
    (dict(voice="ghost", speed=4.0), openai.BadRequestError, "[0.5, 2.0]"),
    (dict(voice="ghost", speed=0.25), openai.BadRequestError, "speed"),
    # a streamed request with a speed is served whole, not refused: it gets as far as the voice
    (dict(voice="ghost", speed=1.5, extra_body={"stream": True}, response_format="pcm"), openai.NotFoundError,
     "ghost"),
    (dict(voice="ghost", speed=1.5, extra_body={"stream_format": "sse"}, response_format="mp3"),
     openai.NotFoundError, "ghost"),
    (dict(voice="ghost", extra_body={"stream": False, "stream_format": "sse"}), openai.BadRequestError,
     "stream_format 'sse'"),
    (dict(voice="ghost", response_format="opus", extra_body={"sample_rate": 44100}), openai.BadRequestError,
     "opus cannot be encoded at 44100 Hz"),
    (dict(voice="ghost", extra_body={"sample_rate": 11025}), openai.BadRequestError, "sample_rate"),
    (dict(voice="ghost", extra_body={"min_speech_tokens": 9, "max_speech_tokens": 3}), openai.BadRequestError,
     "min_speech_tokens"),
    (dict(voice="ghost", extra_body={"sample_rte": 8000}), openai.BadRequestError, "sample_rte"),
    (dict(voice=""), openai.BadRequestError, "voice"),
]


def test_bad_speech_requests_get_openai_shaped_4xx_errors(gateway_redis):
    async def body(client: openai.AsyncOpenAI, http: httpx.AsyncClient):
        for kwargs, error_class, fragment in BAD_SPEECH:
            with pytest.raises(error_class) as info:
                await client.audio.speech.create(model="cosyvoice2", input="hello there", **kwargs)
            error = _error(info.value)
            assert fragment in error["message"], (kwargs, error)
            assert error["type"] == "invalid_request_error"
            assert "Traceback" not in info.value.response.text
        with pytest.raises(openai.BadRequestError) as info:      # pipeline validation, same message as gRPC
            await client.audio.speech.create(model="cosyvoice2", input="   ", voice="ghost")
        assert "text is empty" in _error(info.value)["message"]
        missing = await http.post("/v1/audio/speech", json={"model": "cosyvoice2", "voice": "v"})
        assert missing.status_code == 400 and "input" in missing.json()["error"]["message"]
        broken = await http.post("/v1/audio/speech", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 400 and "error" in broken.json()
    run_with_http(gateway_redis.url, body)


def test_health_is_503_until_stages_are_ready_and_metrics_are_prometheus_text(gateway_redis):
    async def body(client, http: httpx.AsyncClient):
        assert (await http.get("/healthz")).status_code == 503
        with pytest.raises(openai.NotFoundError):
            await client.audio.speech.create(model="cosyvoice2", input="hi", voice="ghost")
        scraped = await http.get("/metrics")
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
        assert 'cosyvoice_gateway_requests_total{code="NOT_FOUND",rpc="http.speech"}' in scraped.text
        assert (await http.get("/v1/models")).json()["data"][0]["id"] == "cosyvoice2"
        unknown = await http.get("/v1/nothing-here")
        assert unknown.status_code == 404 and "error" in unknown.json()
    run_with_http(gateway_redis.url, body)


def test_liveness_is_up_while_readiness_waits_for_the_stages(gateway_redis):
    async def body(client, http: httpx.AsyncClient):
        assert (await http.get("/livez")).status_code == 200        # process up: no restart
        assert (await http.get("/readyz")).status_code == 503       # stages unreachable: no traffic
    run_with_http(gateway_redis.url, body)


def test_voice_registry_errors_are_clear(gateway_redis):
    async def body(client, http: httpx.AsyncClient):
        assert (await http.get("/v1/audio/voices")).json() == {"object": "list", "data": []}
        garbage = await http.post("/v1/audio/voices", data={"name": "v1", "prompt_text": "hi"},
                                  files={"audio": ("a.wav", b"garbage", "audio/wav")})
        assert garbage.status_code == 400 and "decode" in garbage.json()["error"]["message"]
        bad_name = await http.post("/v1/audio/voices", data={"name": "bad name!"},
                                   files={"audio": ("a.wav", prompt_wav_bytes(), "audio/wav")})
        assert bad_name.status_code == 400 and "speaker_id" in bad_name.json()["error"]["message"]
        no_file = await http.post("/v1/audio/voices", data={"name": "v1"})
        assert no_file.status_code == 400 and "audio" in no_file.json()["error"]["message"]
        # A valid prompt needs the tokenizer/speaker stages: unreachable here -> 503, not a traceback.
        down = await http.post("/v1/audio/voices", data={"name": "v1", "prompt_text": "hi"},
                               files={"audio": ("a.wav", prompt_wav_bytes(), "audio/wav")})
        assert down.status_code in (503, 504) and down.json()["error"]["message"]
        gone = await http.delete("/v1/audio/voices/ghost")
        assert gone.status_code == 404 and "ghost" in gone.json()["error"]["message"]
    run_with_http(gateway_redis.url, body)


def test_registry_outage_is_503(gateway_redis):
    async def body(client, http: httpx.AsyncClient):
        gateway_redis.stop()
        listed = await http.get("/v1/audio/voices")
        assert listed.status_code == 503 and listed.json()["error"]["type"] == "service_unavailable"
        with pytest.raises(openai.InternalServerError) as info:
            await client.audio.speech.create(model="cosyvoice2", input="hi", voice="someone")
        assert info.value.status_code == 503
    run_with_http(gateway_redis.url, body)


def test_http_config_is_validated():
    assert HttpConfig(max_upload_bytes=10).max_upload_bytes == 10
    with pytest.raises(ValueError):
        HttpConfig(default_response_format="wma")


def test_speech_hands_text_frontend_to_the_pipeline_unnormalised(gateway_redis, monkeypatch):
    """HTTP does not normalise by itself: the pipeline gets the raw input and the flag (default on), as gRPC."""
    from cosyvoice_gateway.pipeline import Pipeline

    seen = []
    prepare = Pipeline.prepare

    async def recording_prepare(self, req, timings):
        seen.append((req.text, req.text_frontend))
        return await prepare(self, req, timings)

    monkeypatch.setattr(Pipeline, "prepare", recording_prepare)

    async def body(client, http: httpx.AsyncClient):
        for extra in ({}, {"text_frontend": False}):
            answer = await http.post("/v1/audio/speech", json={"model": "cosyvoice2", "input": "I have 42 apples",
                                                               "voice": "ghost", **extra})
            assert answer.status_code == 404
    run_with_http(gateway_redis.url, body)
    assert seen == [("I have 42 apples", True), ("I have 42 apples", False)]
