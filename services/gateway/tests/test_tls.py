"""TLS at the gateway (TLS_CERT_FILE / TLS_KEY_FILE), against a real gateway process over the session's real stage
servers and Redis, with a self-signed certificate made here by the openssl CLI: gRPC and HTTP serve real requests over
TLS (the CLI client with --tls-ca too), plaintext on either port is refused, and half a TLS setting stops the gateway
at start-up with a message naming both variables."""
import base64
import os
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import pytest

from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.constants import SAMPLES_PER_TOKEN
from cosyvoice_gateway.server import GatewayConfig
from cosyvoice_gateway.testing import TEST_STAGE_TIMEOUT_S, free_port, prompt_wav_bytes

pytestmark = [pytest.mark.stack, pytest.mark.slow]
N_TOKENS = 10


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """cert.pem / key.pem for localhost and 127.0.0.1 (the name gRPC and httpx check), valid one day."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return make_self_signed(tmp_path_factory.mktemp("tls"))


def _trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def _gateway_env(stage_servers, redis_server, tiny_model_dir, **extra) -> dict[str, str]:
    return dict(os.environ, **stage_servers.urls_env(), REDIS_URL=redis_server.url, MODEL_DIR=str(tiny_model_dir),
                MODEL_REVISION=f"tls-{uuid.uuid4().hex[:8]}", METRICS_PORT="0", READINESS_INTERVAL_S="0.5",
                STAGE_TIMEOUT_S=TEST_STAGE_TIMEOUT_S, **extra)


@pytest.fixture(scope="module")
def gateway(stage_servers, redis_server, tiny_model_dir, certificate, tmp_path_factory):
    cert, key = certificate
    grpc_port, http_port = free_port(), free_port()
    env = _gateway_env(stage_servers, redis_server, tiny_model_dir, GRPC_PORT=str(grpc_port),
                       HTTP_PORT=str(http_port), TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key))
    log = tmp_path_factory.mktemp("tls-gateway") / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cosyvoice_gateway.server"], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"https://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/healthz", verify=_trusting(cert), timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    yield f"127.0.0.1:{grpc_port}", url, http_port
    proc.terminate()
    proc.wait(15)


def _request() -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text="Hello.", prompt_audio=prompt_wav_bytes(), prompt_text="hi",
                                     min_speech_tokens=N_TOKENS, max_speech_tokens=N_TOKENS)


def test_grpc_over_tls_serves_and_the_cli_trusts_a_given_ca(gateway, certificate):
    addr, _, _ = gateway
    cert, _ = certificate
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(addr, credentials) as channel:
        response = tts_pb2_grpc.TextToSpeechStub(channel).Synthesize(_request(), timeout=120)
    assert len(response.audio) == N_TOKENS * SAMPLES_PER_TOKEN * 2          # 16-bit PCM at 24 kHz
    cli = [sys.executable, "-m", "cosyvoice_gateway.cli", "voices", "list", "--server", addr]
    clean_env = {k: v for k, v in os.environ.items() if k != "TLS_CERT_FILE"}
    listed = subprocess.run([*cli, "--tls-ca", str(cert)], capture_output=True, text=True, timeout=60, env=clean_env)
    assert listed.returncode == 0, listed.stderr
    # the variable the gateway reads its certificate from: the client trusts it too
    from_env = subprocess.run(cli, capture_output=True, text=True, timeout=60,
                              env={**clean_env, "TLS_CERT_FILE": str(cert)})
    assert from_env.returncode == 0, from_env.stderr
    untrusted = subprocess.run([*cli, "--tls"], capture_output=True, text=True, timeout=60,
                               env=clean_env)   # system roots: a self-signed cert fails
    assert untrusted.returncode != 0 and "cannot reach the gateway" in untrusted.stderr


def test_http_over_tls_serves_openai_speech(gateway, certificate):
    _, url, _ = gateway
    cert, _ = certificate
    body = {"model": "cosyvoice2", "input": "Hello.", "response_format": "pcm",
            "ref_audio": base64.b64encode(prompt_wav_bytes()).decode(), "ref_text": "hi",
            "min_speech_tokens": N_TOKENS, "max_speech_tokens": N_TOKENS}
    response = httpx.post(f"{url}/v1/audio/speech", json=body, verify=_trusting(cert), timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.content) == N_TOKENS * SAMPLES_PER_TOKEN * 2


def test_plaintext_is_refused_on_both_tls_ports(gateway):
    addr, _, http_port = gateway
    with grpc.insecure_channel(addr) as channel:
        with pytest.raises(grpc.RpcError) as info:
            tts_pb2_grpc.TextToSpeechStub(channel).ListSpeakers(tts_pb2.ListSpeakersRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=10)


def test_half_a_tls_setting_is_a_clear_start_up_error(certificate, tmp_path):
    cert, key = certificate
    with pytest.raises(ValueError, match="both TLS_CERT_FILE and TLS_KEY_FILE"):
        GatewayConfig(model_dir=tmp_path, tokenizer_urls="x", speaker_urls="x", llm_urls="x", token2wav_urls="x",
                      redis_url="redis://127.0.0.1:1/0", model_revision="r", tls_cert_file=cert)
    with pytest.raises(ValueError, match="TLS_KEY_FILE .* is not a readable file"):
        GatewayConfig(model_dir=tmp_path, tokenizer_urls="x", speaker_urls="x", llm_urls="x", token2wav_urls="x",
                      redis_url="redis://127.0.0.1:1/0", model_revision="r", tls_cert_file=cert,
                      tls_key_file=tmp_path / "missing.pem")
    env = dict(os.environ, TOKENIZER_URLS="127.0.0.1:1", SPEAKER_URLS="127.0.0.1:1", LLM_URLS="127.0.0.1:1",
               TOKEN2WAV_URLS="127.0.0.1:1", MODEL_DIR=str(tmp_path), MODEL_REVISION="r", TLS_CERT_FILE=str(cert))
    env.pop("TLS_KEY_FILE", None)
    started = subprocess.run([sys.executable, "-m", "cosyvoice_gateway.server"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert started.returncode != 0 and "TLS_KEY_FILE" in started.stderr
