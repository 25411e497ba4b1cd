"""Admission control and deadlines on real gateway processes (MAX_INFLIGHT_REQUESTS=1; REQUEST_TIMEOUT_S=2)
over the session's real stage servers and Redis: a request beyond the bound is refused at once (gRPC
RESOURCE_EXHAUSTED with retry-after, HTTP 429 with Retry-After) on both RPCs and HTTP while the held request still
runs; the slot comes back when the request ends; the request deadline bounds the stage calls (HTTP 504, gRPC
DEADLINE_EXCEEDED)."""
import os
import time
import uuid

import grpc
import httpx
import pytest
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_gateway.testing import free_port, gateway_process, prompt_wav_bytes

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REQUEST_TIMEOUT_S = 2.0
EVENT_BOUND_S = 120.0   # overall bound on waiting for an event (a loaded 2-core CI machine)
HELD_TOKENS = 3000      # the API's bound: minutes of work on CPU, so a request holds its slot until cancelled


def _gateway(stage_servers, redis_server, tiny_model_dir, tmp_path_factory, **settings):
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, **stage_servers.urls_env(), REDIS_URL=redis_server.url, MODEL_DIR=str(tiny_model_dir),
               MODEL_REVISION=f"adm-{uuid.uuid4().hex[:8]}", GRPC_PORT=str(grpc_port), HTTP_PORT=str(http_port),
               METRICS_PORT="0", READINESS_INTERVAL_S="0.5", **settings)
    env.pop("COSYVOICE_API_KEY", None)
    log = tmp_path_factory.mktemp("admission") / "gateway.log"
    url = f"http://127.0.0.1:{http_port}"
    with gateway_process(env, log, f"{url}/healthz"):
        yield f"127.0.0.1:{grpc_port}", url


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


def _llm_calls_issued(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith('cosyvoice_gateway_stage_calls_total{stage="llm"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(condition, failure: str, timeout_s: float = EVENT_BOUND_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.1)


def test_a_request_beyond_the_bound_is_refused_at_once_everywhere(gateway):
    addr, url = gateway
    with grpc.insecure_channel(addr) as channel, httpx.Client(timeout=30) as http:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        llm_calls = _llm_calls_issued(url)
        held = stub.Synthesize.future(_request(HELD_TOKENS))     # holds the only slot until cancelled below
        try:
            # The held request has its slot once it has reached the llm stage (the gateway's stage call counter).
            _wait_for(lambda: _llm_calls_issued(url) > llm_calls, "the held request never reached the llm stage")
            # Each call below is refused while the held request is still running: not queued behind it.
            for call in (lambda: stub.Synthesize(_request(10), timeout=EVENT_BOUND_S),
                         lambda: list(stub.SynthesizeStream(_request(10), timeout=EVENT_BOUND_S)),
                         lambda: stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(
                             speaker_id="busy", prompt_audio=prompt_wav_bytes()), timeout=EVENT_BOUND_S)):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert ("retry-after", "2") in tuple(info.value.trailing_metadata())
                assert not held.done(), held.exception()
            response = http.post(f"{url}/v1/audio/speech", json={"model": "cosyvoice2", "input": "Hi.", "voice": "001"})
            assert response.status_code == 429 and response.headers["retry-after"] == "2"
            assert not held.done(), held.exception()
            # cheap calls are not counted
            stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), timeout=EVENT_BOUND_S)
        finally:
            held.cancel()
        deadline = time.monotonic() + EVENT_BOUND_S                      # the cancelled request frees its slot
        while True:
            try:
                assert stub.Synthesize(_request(10), timeout=EVENT_BOUND_S).timings.speech_tokens == 10
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)


def test_the_request_deadline_bounds_the_stage_calls(timed_gateway):
    """No client deadline and a request that would run for minutes: 504 / DEADLINE_EXCEEDED can only be the
    gateway's REQUEST_TIMEOUT_S reaching the stage calls (without it the request would finish, 200 / OK)."""
    addr, url = timed_gateway
    response = httpx.post(f"{url}/v1/audio/speech", timeout=None, json={
        "model": "cosyvoice2", "input": "Hello there.", "voice": "001", "response_format": "wav",
        "stream": False, "min_speech_tokens": HELD_TOKENS, "max_speech_tokens": HELD_TOKENS})
    assert response.status_code == 504, response.text
    with grpc.insecure_channel(addr) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Synthesize(_request(HELD_TOKENS))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
