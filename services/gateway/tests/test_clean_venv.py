"""The gateway runs from its own dependency list: a clean venv built from services/gateway/requirements.txt
(what the image installs; no torch) starts the gateway against real stage servers and serves a request.

The venv is built once per content of the requirements file and interpreter (kept under build/test-venvs,
set CLEAN_VENV_DIR to move it); pip reads the local wheel cache/mirror or PyPI. Stage servers and Redis
come from the main venv (the session fixtures)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_gateway.testing import TEST_STAGE_TIMEOUT_S, free_port, prompt_wav_bytes

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[3]
REQUIREMENTS = REPO / "services/gateway/requirements.txt"
# The image's PYTHONPATH: our packages come from the source tree, never from the test venv's .pth.
PYTHONPATH = [REPO / "common", REPO / "services/gateway", REPO / "protos/gen"]
INSTALL_TIMEOUT_S = 900


def _venv_dir() -> Path:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()[:12]
    base = Path(os.environ.get("CLEAN_VENV_DIR", REPO / "build/test-venvs"))
    return base / f"gateway-{digest}"


@pytest.fixture(scope="module")
def clean_python() -> Path:
    """python of a venv holding only the gateway's requirements (built on first use, reused after)."""
    venv = _venv_dir()
    python = venv / "bin/python"
    done = venv / ".installed"
    if not done.exists():
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        result = subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
                                capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if result.returncode:
            pytest.fail(f"pip install -r {REQUIREMENTS.name} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        done.write_text(REQUIREMENTS.read_text())
    return python


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in PYTHONPATH)
    env.update(extra)
    return env


def test_requirements_venv_has_no_torch(clean_python):
    probe = subprocess.run([str(clean_python), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, env=_clean_env(), check=True)
    assert probe.stdout.strip() == "None"


def test_gateway_modules_import_from_requirements_alone(clean_python):
    modules = ["cosyvoice_gateway.server", "cosyvoice_gateway.http_api", "cosyvoice_gateway.seed",
               "cosyvoice_gateway.cli", "cosyvoice_common.audio", "cosyvoice_common.runtime"]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
           "assert 'torch' not in sys.modules, 'torch imported'\n"
    result = subprocess.run([str(clean_python), "-c", code], capture_output=True, text=True, env=_clean_env())
    assert result.returncode == 0, result.stderr[-3000:]


def test_gateway_from_clean_venv_serves_a_request(clean_python, stage_servers, redis_server, tiny_model_dir,
                                                  tmp_path):
    port = free_port()
    env = _clean_env(**stage_servers.urls_env(), REDIS_URL=redis_server.url, MODEL_DIR=str(tiny_model_dir),
                     GRPC_PORT=str(port), HTTP_PORT="0", METRICS_PORT="0", READINESS_INTERVAL_S="0.5",
                     STAGE_TIMEOUT_S=TEST_STAGE_TIMEOUT_S, PYTHONUNBUFFERED="1")
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(clean_python), "-m", "cosyvoice_gateway.server"], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path), start_new_session=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, f"gateway exited:\n{log.read_text()[-3000:]}"
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, f"gateway never SERVING:\n{log.read_text()[-3000:]}"
                time.sleep(0.3)
            stub = tts_pb2_grpc.TextToSpeechStub(channel)
            response = stub.Synthesize(tts_pb2.SynthesizeRequest(
                text="Hello from a clean venv.", prompt_audio=prompt_wav_bytes(2.0, 22050), prompt_text="hi",
                min_speech_tokens=10, max_speech_tokens=10, sampling=tts_pb2.SamplingParams(seed=3)), timeout=120)
            # Seed drop-in, torch-free: the model dir's spk2info.pt (modelgen writes speaker 001) was imported
            # into the registry at start, so the seed's default speaker speaks.
            speakers = {s.speaker_id: s for s in stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), timeout=30).speakers}
            assert "001" in speakers and speakers["001"].prompt_speech_tokens > 0
            seed_voice = stub.Synthesize(tts_pb2.SynthesizeRequest(
                text="Hello from the seed speaker.", speaker_id="001", min_speech_tokens=10, max_speech_tokens=10),
                timeout=120)
            assert seed_voice.timings.speech_tokens == 10 and len(seed_voice.audio) > 0
        assert response.timings.speech_tokens == 10
        assert len(response.audio) > 0
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
