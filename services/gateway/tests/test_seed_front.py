"""The seed-compatible `cosyvoice2` front over real tritonserver stage processes, Redis and two front servers.

Streaming (decoupled) and offline variants, with a prompt and with only target_text (spk2info default
speaker "001"), exact lengths through the extras, the seed's manifest CLI, the upstream clients unchanged
(SEED_REPO_DIR) and perf_analyzer (when installed).
"""
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cosyvoice_common.constants import OUTPUT_SAMPLE_RATE_HZ, SAMPLES_PER_TOKEN
from cosyvoice_gateway.testing import prompt_wav_bytes
from cosyvoice_tools.seed_client import SeedError, SeedSession, main as seed_client_main, seed_inputs

pytestmark = [pytest.mark.stack, pytest.mark.slow]
N_TOKENS = 20       # first chunk (15 + 3 lookahead) then the final chunk: two token2wav calls
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def urls(seed_front):
    stream, offline = seed_front.seed_ports("seed-stream"), seed_front.seed_ports("seed-offline")
    return {"stream_grpc": f"127.0.0.1:{stream['grpc']}", "stream_http": f"127.0.0.1:{stream['http']}",
            "offline_grpc": f"127.0.0.1:{offline['grpc']}", "offline_http": f"127.0.0.1:{offline['http']}"}


@pytest.fixture(scope="module")
def prompt(tmp_path_factory):
    path = tmp_path_factory.mktemp("seed-prompt") / "prompt_22k.wav"
    wav, rate = sf.read(__import__("io").BytesIO(prompt_wav_bytes(seconds=2.0, sample_rate_hz=22050, seed=3)))
    sf.write(path, wav, rate)
    from cosyvoice_tools.seed_client import load_wav_16k
    return path, load_wav_16k(path)


def test_streaming_sends_chunks_then_an_empty_final_response(urls, prompt):
    session = SeedSession(urls["stream_grpc"], mode="streaming")
    try:
        result = session.request(prompt[1], "a prompt.", "hello world.", min_speech_tokens=N_TOKENS,
                                 max_speech_tokens=N_TOKENS)
    finally:
        session.close()
    assert result.chunks == 2 and result.second_chunk_s is not None
    assert result.audio.shape[0] == N_TOKENS * SAMPLES_PER_TOKEN and np.isfinite(result.audio).all()
    assert 0 < result.first_chunk_s <= result.total_s


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_offline_returns_the_whole_waveform_in_one_response(urls, prompt, protocol):
    session = SeedSession(urls[f"offline_{protocol}"], mode="offline", protocol=protocol)
    try:
        first, total, audio_s = session.run_one(prompt[1], "a prompt.", "hello world.", min_speech_tokens=N_TOKENS,
                                                max_speech_tokens=N_TOKENS)
    finally:
        session.close()
    assert audio_s == pytest.approx(N_TOKENS * SAMPLES_PER_TOKEN / OUTPUT_SAMPLE_RATE_HZ) and first == total


@pytest.mark.parametrize("variant", ["stream_grpc", "offline_grpc"])
def test_target_text_only_uses_the_default_speaker_from_the_spk2info_cache(urls, variant):
    session = SeedSession(urls[variant], mode="streaming" if variant.startswith("stream") else "offline")
    try:
        result = session.request(None, "", "only target text.", min_speech_tokens=N_TOKENS, max_speech_tokens=N_TOKENS)
    finally:
        session.close()
    assert result.audio.shape[0] == N_TOKENS * SAMPLES_PER_TOKEN


def test_bad_request_gets_an_error_on_both_variants(urls, prompt):
    for variant, mode in (("stream_grpc", "streaming"), ("offline_grpc", "offline")):
        session = SeedSession(urls[variant], mode=mode)
        try:
            with pytest.raises(SeedError, match="min_speech_tokens"):
                session.request(prompt[1], "p", "text", min_speech_tokens=9, max_speech_tokens=3)
        finally:
            session.close()


def test_cancelled_stream_ends_and_the_front_keeps_serving(urls):
    import tritonclient.grpc as grpcclient

    done = threading.Event()
    client = grpcclient.InferenceServerClient(urls["stream_grpc"])
    client.start_stream(callback=lambda result, error: done.set())
    client.async_stream_infer("cosyvoice2", seed_inputs(grpcclient, None, "", "a long text to cancel.",
                                                        min_speech_tokens=400, max_speech_tokens=400),
                              request_id="cancel-me", enable_empty_final_response=True)
    done.wait(30)
    client.stop_stream(cancel_requests=True)
    client.close()
    session = SeedSession(urls["stream_grpc"], mode="streaming")
    try:
        result = session.request(None, "", "still serving.", min_speech_tokens=N_TOKENS, max_speech_tokens=N_TOKENS)
    finally:
        session.close()
    assert result.audio.shape[0] == N_TOKENS * SAMPLES_PER_TOKEN


@pytest.mark.parametrize("mode, cache", [("streaming", "False"), ("offline", "True")])
def test_client_cli_runs_a_manifest_in_the_seed_format(urls, prompt, tmp_path, capsys, mode, cache):
    manifest = tmp_path / "manifest.txt"
    shutil.copy(prompt[0], tmp_path / "p.wav")
    manifest.write_text("u1|a prompt.|p.wav|first target.\nu2.wav|a prompt.|p.wav|second one.\n", encoding="utf-8")
    port = urls["stream_grpc" if mode == "streaming" else "offline_grpc"].rsplit(":", 1)[1]
    code = seed_client_main(["--server-port", port, "--mode", mode, "--manifest-path", str(manifest),
                             "--num-tasks", "2", "--use-spk2info-cache", cache, "--log-dir", str(tmp_path / "out"),
                             "--min-speech-tokens", str(N_TOKENS), "--max-speech-tokens", str(N_TOKENS)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "RTF:" in out and ("first_chunk_latency_50_percentile_ms" in out if mode == "streaming"
                              else "latency_50_percentile_ms" in out)
    for utt in ("u1", "u2"):
        wav, rate = sf.read(tmp_path / "out" / f"{utt}.wav")
        assert rate == OUTPUT_SAMPLE_RATE_HZ and wav.shape[0] == N_TOKENS * SAMPLES_PER_TOKEN
    assert (tmp_path / "out" / "rtf-manifest.txt").exists()


def _seed_runtime_dir() -> Path | None:
    root = os.environ.get("SEED_REPO_DIR")
    if not root:
        return None
    path = Path(root) / "runtime" / "triton_trtllm"
    return path if (path / "client_grpc.py").exists() else None


def test_upstream_seed_clients_work_unchanged(urls, prompt, tmp_path):
    runtime = _seed_runtime_dir()
    if runtime is None:
        print("skip reason: SEED_REPO_DIR does not name a checkout of FunAudioLLM/CosyVoice")
        pytest.skip("SEED_REPO_DIR does not name a checkout of FunAudioLLM/CosyVoice (runtime/triton_trtllm)")
    import importlib.util
    if importlib.util.find_spec("requests") is None:   # client_http.py's one extra import (16 kHz: no scipy)
        print("skip reason: the seed's client_http.py imports requests, not installed")
        pytest.skip("the seed's client_http.py imports requests, not installed")
    wav16 = tmp_path / "prompt16k.wav"
    sf.write(wav16, prompt[1], 16000)
    http = subprocess.run([sys.executable, str(runtime / "client_http.py"), "--server-url", urls["offline_http"],
                           "--reference-audio", str(wav16), "--reference-text", "a prompt.", "--target-text", "hi.",
                           "--model-name", "cosyvoice2", "--output-audio", str(tmp_path / "http.wav")],
                          capture_output=True, text=True, timeout=300)
    assert http.returncode == 0, http.stdout + http.stderr
    assert sf.read(tmp_path / "http.wav")[0].size > 0
    for mode, port in (("streaming", urls["stream_grpc"]), ("offline", urls["offline_grpc"])):
        grpc = subprocess.run([sys.executable, str(runtime / "client_grpc.py"), "--server-addr", "127.0.0.1",
                               "--server-port", port.rsplit(":", 1)[1], "--model-name", "cosyvoice2", "--mode", mode,
                               "--reference-audio", str(wav16), "--reference-text", "a prompt.", "--target-text",
                               "hi.", "--log-dir", str(tmp_path / mode)], capture_output=True, text=True, timeout=300)
        assert grpc.returncode == 0 and "RTF:" in grpc.stdout, grpc.stdout + grpc.stderr
        assert sf.read(tmp_path / mode / "test.wav")[0].size > 0


def test_perf_analyzer_against_the_offline_model(urls, tmp_path):
    binary = shutil.which("perf_analyzer") or (str(Path(sys.executable).parent / "perf_analyzer")
                                               if (Path(sys.executable).parent / "perf_analyzer").exists() else None)
    if binary is None:
        print("skip reason: perf_analyzer is not installed (PyPI perf-analyzer)")
        pytest.skip("perf_analyzer is not installed (PyPI perf-analyzer)")
    data = tmp_path / "input.json"
    data.write_text('{"data": [{"target_text": {"content": ["hi."], "shape": [1]},'
                    f' "min_speech_tokens": [{N_TOKENS}], "max_speech_tokens": [{N_TOKENS}]}}]}}')
    run = subprocess.run([binary, "-m", "cosyvoice2", "-u", urls["offline_grpc"], "-i", "grpc", "--input-data",
                          str(data), "--concurrency-range", "1", "--measurement-interval", "3000", "-b", "1"],
                         capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and ("error while loading shared libraries" in run.stderr or "GLIBC" in run.stderr):
        print(f"skip reason: perf_analyzer cannot run here: {run.stderr.strip()[:200]}")
        pytest.skip(f"perf_analyzer cannot run here: {run.stderr.strip()[:200]}")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Throughput" in run.stdout
