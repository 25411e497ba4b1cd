"""Admission control and deadlines on real gateway processes (MAX_INFLIGHT_REQUESTS=1; REQUEST_TIMEOUT_S=2)
over the session's real stage servers and Redis: a request beyond the bound is refused at once (gRPC
RESOURCE_EXHAUSTED with retry-after, HTTP 429 with Retry-After) on both RPCs and HTTP; the slot comes back
when the request ends; the request deadline bounds the stage calls (HTTP 504, gRPC DEADLINE_EXCEEDED)."""
import os
import subprocess
import sys
import time
import uuid

import grpc
import httpx
import pytest

from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_gateway.testing import free_port, prompt_wav_bytes

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REFUSED_WITHIN_S = 0.05
REQUEST_TIMEOUT_S = 2.0


def _gateway(stage_servers, redis_server, tiny_model_dir, tmp_path_factory, **settings):
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, **stage_servers.urls_env(), REDIS_URL=redis_server.url, MODEL_DIR=str(tiny_model_dir),
               MODEL_REVISION=f"adm-{uuid.uuid4().hex[:8]}", GRPC_PORT=str(grpc_port), HTTP_PORT=str(http_port),
               METRICS_PORT="0", READINESS_INTERVAL_S="0.5", **settings)
    env.pop("COSYVOICE_API_KEY", None)
    log = tmp_path_factory.mktemp("admission") / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cosyvoice_gateway.server"], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    yield f"127.0.0.1:{grpc_port}", url
    proc.terminate()
    proc.wait(15)


@pytest.fixture(scope="module")
def gateway(stage_servers, redis_server, tiny_model_dir, tmp_path_factory):
    yield from _gateway(stage_servers, redis_server, tiny_model_dir, tmp_path_factory, MAX_INFLIGHT_REQUESTS="1",
                        RETRY_AFTER_S="2")


@pytest.fixture(scope="module")
def timed_gateway(stage_servers, redis_server, tiny_model_dir, tmp_path_factory):
    yield from _gateway(stage_servers, redis_server, tiny_model_dir, tmp_path_factory,
                        REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S))


def _request(tokens: int) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text="Hello there.", prompt_audio=prompt_wav_bytes(), prompt_text="hi",
                                     min_speech_tokens=tokens, max_speech_tokens=tokens)


def test_a_request_beyond_the_bound_is_refused_at_once_everywhere(gateway):
    addr, url = gateway
    with grpc.insecure_channel(addr) as channel, httpx.Client(timeout=30) as http:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        held = stub.Synthesize.future(_request(400), timeout=120)     # holds the only slot for seconds on CPU
        time.sleep(1.0)
        assert not held.done()
        try:
            for call in (lambda: stub.Synthesize(_request(10), timeout=10),
                         lambda: list(stub.SynthesizeStream(_request(10), timeout=10)),
                         lambda: stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(
                             speaker_id="busy", prompt_audio=prompt_wav_bytes()), timeout=10)):
                start = time.perf_counter()
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert time.perf_counter() - start < REFUSED_WITHIN_S
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert ("retry-after", "2") in tuple(info.value.trailing_metadata())
            start = time.perf_counter()
            response = http.post(f"{url}/v1/audio/speech", json={"model": "cosyvoice2", "input": "Hi.", "voice": "001"})
            assert time.perf_counter() - start < REFUSED_WITHIN_S
            assert response.status_code == 429 and response.headers["retry-after"] == "2"
            # cheap calls are not counted
            stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), timeout=10)
        finally:
            held.cancel()
        deadline = time.monotonic() + 10                                # the cancelled stream frees its slot
        while True:
            try:
                assert stub.Synthesize(_request(10), timeout=60).timings.speech_tokens == 10
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)


def test_the_request_deadline_bounds_the_stage_calls(timed_gateway):
    addr, url = timed_gateway
    start = time.perf_counter()
    response = httpx.post(f"{url}/v1/audio/speech", timeout=60, json={
        "model": "cosyvoice2", "input": "Hello there.", "voice": "001", "response_format": "wav",
        "min_speech_tokens": 3000, "max_speech_tokens": 3000})
    elapsed_s = time.perf_counter() - start
    assert response.status_code == 504, response.text
    assert elapsed_s < REQUEST_TIMEOUT_S + 5   # CPU shared under CI; without the deadline: minutes
    with grpc.insecure_channel(addr) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            stub.Synthesize(_request(3000), timeout=30)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.perf_counter() - start < REQUEST_TIMEOUT_S + 5   # CPU shared under CI; without the deadline: minutes
