"""The seed-compatible `cosyvoice2` front over real tritonserver stage processes, Redis and two front servers.

Streaming (decoupled) and offline variants, with a prompt and with only target_text (spk2info default
speaker "001"), exact lengths through the extras, the seed's manifest CLI (cosyvoice_tools.seed_client speaks the
seed's tensor contract with tritonclient) and Triton's perf_analyzer.
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


def _perf_analyzer_env(tmp_path: Path) -> dict[str, str]:
    """perf_analyzer (tritonclient wheel) links libb64 (Debian libb64-0d, installed by .ci/run) and libcudart.so.12,
    which the nvidia-pytriton wheel carries under a hashed name: a link by the soname in a private dir."""
    libs = list(Path(sys.executable).parent.parent.glob("lib/python3*/site-packages/nvidia_pytriton.libs/libcudart-*.so.12*"))
    assert libs, "nvidia-pytriton's bundled libcudart not found"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libcudart.so.12").symlink_to(libs[0])
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(filter(None, [str(tmp_path / "lib"),
                                                                    os.environ.get("LD_LIBRARY_PATH")]))}


def test_perf_analyzer_drives_the_offline_model(urls, tmp_path):
    binary = Path(sys.executable).parent / "perf_analyzer"
    assert binary.exists(), "perf_analyzer comes with the tritonclient wheel (requirements.txt)"
    data = tmp_path / "input.json"
    data.write_text('{"data": [{"target_text": {"content": ["hi."], "shape": [1]},'
                    f' "min_speech_tokens": [{N_TOKENS}], "max_speech_tokens": [{N_TOKENS}]}}]}}')
    # counted windows, and any spread is "stable": a loaded 2-core machine measures, it does not benchmark
    run = subprocess.run([str(binary), "-m", "cosyvoice2", "-u", urls["offline_grpc"], "-i", "grpc", "--input-data",
                          str(data), "--concurrency-range", "1", "-b", "1", "--measurement-mode", "count_windows",
                          "--measurement-request-count", "3", "--stability-percentage", "1000", "--max-trials", "3"],
                         capture_output=True, text=True, timeout=300, env=_perf_analyzer_env(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Throughput" in run.stdout
