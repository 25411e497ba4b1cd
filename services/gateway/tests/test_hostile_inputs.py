"""Hostile inputs are refused cheaply and alike on both gRPC RPCs and HTTP, over the real stack (gateway
process, tritonserver stages, Redis): a decompression-bomb prompt, oversized uploads and bodies, and a bound on
every string field (text, prompt_text, instruct, speaker_id, request_id)."""
import socket
import time
from pathlib import Path

import grpc
import httpx
import pytest
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.audio import PROMPT_MAX_BYTES
from cosyvoice_gateway.testing import prompt_wav_bytes, silent_flac

pytestmark = [pytest.mark.stack, pytest.mark.slow]
GOOD = prompt_wav_bytes()
# The bomb decodes to 230 MB of float32: a gateway that decoded it would raise its peak memory by that much.
DECODED_BOMB_BYTES = 230 << 20


@pytest.fixture(scope="module")
def flac_bomb() -> bytes:
    return silent_flac(20)       # ~0.2 MB, 230 MB once decoded


def _peak_rss_bytes(pid: int) -> int:
    """The process's resident-memory high-water mark (VmHWM): it only grows, so no moment can be missed."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.fixture(scope="module")
def gateway_pid(stack) -> int:
    return stack._record("gateway").pid


@pytest.fixture(scope="module")
def stub(stack):
    channel = grpc.insecure_channel(stack.gateway_grpc_url,
                                    options=[("grpc.max_send_message_length", 64 << 20)])
    yield tts_pb2_grpc.TextToSpeechStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def http_url(stack) -> str:
    url = stack.gateway_http_url
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/healthz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return url


def _both_rpcs(stub, request) -> list[grpc.RpcError]:
    errors = []
    for call in (lambda: stub.Synthesize(request, timeout=30), lambda: list(stub.SynthesizeStream(request, timeout=30))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        errors.append(info.value)
    return errors


def test_flac_bomb_prompt_is_refused_without_decoding_on_both_rpcs(stub, flac_bomb, gateway_pid):
    request = tts_pb2.SynthesizeRequest(text="Hello.", prompt_audio=flac_bomb, prompt_text="hi")
    peak_before = _peak_rss_bytes(gateway_pid)
    for error in _both_rpcs(stub, request):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "too long" in error.details()
    assert _peak_rss_bytes(gateway_pid) - peak_before < DECODED_BOMB_BYTES // 2, "the gateway decoded the bomb"


def test_flac_bomb_registration_is_refused(stub, flac_bomb):
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(speaker_id="bomb", prompt_audio=flac_bomb), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "too long" in info.value.details()


def test_prompt_audio_beyond_the_upload_bound_is_invalid_argument_with_a_message(stub):
    request = tts_pb2.SynthesizeRequest(text="Hello.", prompt_audio=b"\0" * (PROMPT_MAX_BYTES + 1))
    for error in _both_rpcs(stub, request):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in error.details()


@pytest.mark.parametrize("field, value", [
    ("text", "a" * 10_001), ("prompt_text", "a" * 2_001), ("instruct", "a" * 2_001),
    ("speaker_id", "a" * 129), ("request_id", "a" * 129), ("request_id", "two words"),
])
def test_every_string_field_is_bounded_on_both_rpcs(stub, field, value):
    fields = {"text": "Hello.", "prompt_audio": GOOD, field: value}
    if field == "speaker_id":
        del fields["prompt_audio"]
    for error in _both_rpcs(stub, tts_pb2.SynthesizeRequest(**fields)):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert field.split("_")[0] in error.details()


@pytest.mark.parametrize("field, value", [("speaker_id", "a" * 129), ("prompt_text", "a" * 2_001)])
def test_registration_strings_are_bounded(stub, field, value):
    fields = {"speaker_id": "ok", "prompt_audio": GOOD, field: value}
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(**fields), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field.split("_")[0] in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.DeleteSpeaker(tts_pb2.DeleteSpeakerRequest(speaker_id="a" * 129), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("extra, fragment", [
    ({"input": "a" * 10_001}, "characters"), ({"instructions": "a" * 2_001}, "instruct"),
    ({"voice": "a" * 129}, "speaker_id"), ({"request_id": "a" * 129}, "request_id"),
])
def test_http_speech_strings_are_bounded(http_url, extra, fragment):
    body = {"model": "cosyvoice2", "input": "Hello.", "voice": "nobody", **extra}
    response = httpx.post(f"{http_url}/v1/audio/speech", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


def test_http_voice_upload_bomb_and_long_fields_are_400(http_url, flac_bomb, gateway_pid):
    peak_before = _peak_rss_bytes(gateway_pid)
    response = httpx.post(f"{http_url}/v1/audio/voices", data={"name": "bomb"},
                          files={"audio": ("p.flac", flac_bomb, "audio/flac")}, timeout=30)
    assert response.status_code == 400 and "too long" in response.json()["error"]["message"]
    assert _peak_rss_bytes(gateway_pid) - peak_before < DECODED_BOMB_BYTES // 2, "the gateway decoded the bomb"
    response = httpx.post(f"{http_url}/v1/audio/voices", data={"name": "ok", "prompt_text": "a" * 2_001},
                          files={"audio": ("p.wav", GOOD, "audio/wav")}, timeout=30)
    assert response.status_code == 400 and "prompt_text" in response.json()["error"]["message"]
    assert httpx.delete(f"{http_url}/v1/audio/voices/{'a' * 129}", timeout=30).status_code == 400


def test_http_body_beyond_the_bound_is_413_before_it_is_read(http_url):
    """Only the headers are sent: the declared length alone gets the answer (the body it would read never comes)."""
    host, port = http_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/audio/speech HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {PROMPT_MAX_BYTES + (2 << 20)}\r\n\r\n{{".encode())
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert b" 413 " in status_line


def test_http_streamed_body_beyond_the_bound_is_413(http_url):
    def chunks():            # a well-formed multipart file field that never ends (no Content-Length)
        yield b'--b\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
        for _ in range(40):
            yield b"x" * (1 << 20)
    response = httpx.post(f"{http_url}/v1/audio/voices", content=chunks(),
                          headers={"content-type": "multipart/form-data; boundary=b"}, timeout=60)
    assert response.status_code == 413
