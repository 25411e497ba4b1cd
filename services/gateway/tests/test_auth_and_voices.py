"""API keys and voice replacement, against a real gateway process (COSYVOICE_API_KEY with two keys) over the
session's real stage servers and Redis: gRPC metadata `authorization: Bearer <key>`, HTTP via the official
OpenAI client's api_key; health stays open; registering an existing voice is ALREADY_EXISTS / 409 unless the
request asks to replace it."""
import os
import uuid

import grpc
import httpx
import openai
import pytest
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_gateway.testing import free_port, gateway_process, prompt_wav_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.stack, pytest.mark.slow]
KEYS = ("key-one", "key-two")
GOOD = (("authorization", f"Bearer {KEYS[1]}"),)
WRONG = (("authorization", "Bearer nope"),)


@pytest.fixture(scope="module")
def gateway(stage_servers, redis_server, tiny_model_dir, tmp_path_factory):
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, **stage_servers.urls_env(), REDIS_URL=redis_server.url, MODEL_DIR=str(tiny_model_dir),
               MODEL_REVISION=f"auth-{uuid.uuid4().hex[:8]}", GRPC_PORT=str(grpc_port), HTTP_PORT=str(http_port),
               METRICS_PORT="0", READINESS_INTERVAL_S="0.5", COSYVOICE_API_KEY=",".join(KEYS))
    log = tmp_path_factory.mktemp("auth") / "gateway.log"
    url = f"http://127.0.0.1:{http_port}"
    with gateway_process(env, log, f"{url}/healthz"):
        yield f"127.0.0.1:{grpc_port}", url


@pytest.fixture(scope="module")
def stub(gateway):
    channel = grpc.insecure_channel(gateway[0])
    yield tts_pb2_grpc.TextToSpeechStub(channel), channel
    channel.close()


def _synth_request() -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text="Hello.", prompt_audio=prompt_wav_bytes(), prompt_text="hi",
                                     min_speech_tokens=10, max_speech_tokens=10)


@pytest.mark.parametrize("metadata", [(), WRONG, (("authorization", KEYS[0]),)], ids=["none", "wrong", "no-bearer"])
def test_grpc_without_a_valid_key_is_unauthenticated_on_every_rpc(stub, metadata):
    tts, _ = stub
    calls = [lambda: tts.Synthesize(_synth_request(), metadata=metadata, timeout=30),
             lambda: list(tts.SynthesizeStream(_synth_request(), metadata=metadata, timeout=30)),
             lambda: tts.ListSpeakers(tts_pb2.ListSpeakersRequest(), metadata=metadata, timeout=30),
             lambda: tts.DeleteSpeaker(tts_pb2.DeleteSpeakerRequest(speaker_id="x"), metadata=metadata, timeout=30),
             lambda: tts.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(speaker_id="x"), metadata=metadata, timeout=30)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_with_any_configured_key_serves_and_health_stays_open(stub):
    tts, channel = stub
    for key in KEYS:
        response = tts.Synthesize(_synth_request(), metadata=(("authorization", f"Bearer {key}"),), timeout=120)
        assert response.timings.speech_tokens == 10
    chunks = list(tts.SynthesizeStream(_synth_request(), metadata=GOOD, timeout=120))
    assert chunks[-1].is_final
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_http_openai_client_needs_the_key(gateway):
    _, url = gateway
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).audio.speech.create(
            model="cosyvoice2", voice="001", input="Hello.")
    assert httpx.get(f"{url}/v1/audio/voices").status_code == 401
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[0], max_retries=0, timeout=120)
    audio = client.audio.speech.create(model="cosyvoice2", voice="001", input="Hello.", response_format="wav",
                                       extra_body={"min_speech_tokens": 10, "max_speech_tokens": 10})
    assert audio.content[:4] == b"RIFF"
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_registering_an_existing_voice_needs_replace(stub, gateway):
    tts, _ = stub
    name = f"dup-{uuid.uuid4().hex[:6]}"
    register = lambda **extra: tts.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(  # noqa: E731
        speaker_id=name, prompt_audio=prompt_wav_bytes(seed=2), prompt_text="hi", **extra), metadata=GOOD, timeout=120)
    register()
    with pytest.raises(grpc.RpcError) as info:
        register()
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "replace" in info.value.details()
    assert register(replace=True).speaker.speaker_id == name

    _, url = gateway
    headers = {"authorization": f"Bearer {KEYS[0]}"}
    files = {"audio": ("p.wav", prompt_wav_bytes(seed=3), "audio/wav")}
    response = httpx.post(f"{url}/v1/audio/voices", data={"name": name, "prompt_text": "hi"}, files=files,
                          headers=headers, timeout=120)
    assert response.status_code == 409, response.text
    response = httpx.post(f"{url}/v1/audio/voices", data={"name": name, "prompt_text": "hi", "replace": "true"},
                          files=files, headers=headers, timeout=120)
    assert response.status_code == 201, response.text
