"""token2wav served by a real tritonserver on the tiny model: the same audio as the in-process runner on the same
inputs (offline, and streamed with the cache sent out and back), 960 samples per token."""
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from cosyvoice_common.constants import (HIFT_MEL_CACHE_FRAMES, HIFT_SOURCE_CACHE_SAMPLES, MEL_BINS,
                                        SAMPLES_PER_TOKEN, SPEAKER_EMBEDDING_DIM, SPEECH_ID_OFFSET, TOKEN_MEL_RATIO)
from cosyvoice_common.contracts import TOKEN2WAV_MODEL

pytestmark = [pytest.mark.stack, pytest.mark.slow]
PROMPT_TOKENS = 10


def _input(name: str, array: np.ndarray, datatype: str):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _prompt(rng):
    tokens = rng.integers(0, 6561, (1, PROMPT_TOKENS)).astype(np.int32) + SPEECH_ID_OFFSET
    feat = rng.standard_normal((1, PROMPT_TOKENS * TOKEN_MEL_RATIO, MEL_BINS)).astype(np.float32)
    embedding = rng.standard_normal((1, SPEAKER_EMBEDDING_DIM)).astype(np.float32)
    return [_input("prompt_speech_tokens", tokens, "INT32"), _input("prompt_speech_feat", feat, "FP32"),
            _input("prompt_spk_embedding", embedding, "FP32")]


@pytest.fixture(scope="module")
def in_process(tiny_model_dir):
    """The engine the served model wraps, loaded in this process from the same model dir (float32, cpu)."""
    from cosyvoice_token2wav.engine import Token2WavEngine
    return Token2WavEngine(tiny_model_dir, "cpu", torch.float32)


def _local_chunk(runner, target, prompt_arrays, seed, offset=None, finalize=True, cache=None):
    from cosyvoice_token2wav.sequence import ChunkRequest, chunk_seed
    tokens, feat, embedding = prompt_arrays
    request = ChunkRequest(
        tokens=torch.from_numpy(target.astype(np.int64) - SPEECH_ID_OFFSET),
        prompt_tokens=torch.from_numpy(tokens.astype(np.int64) - SPEECH_ID_OFFSET),
        prompt_feat=torch.from_numpy(feat), embedding=torch.from_numpy(embedding),
        token_offset=offset or 0, finalize=finalize, streaming=offset is not None and not finalize,
        cache=cache, seed=chunk_seed(seed, offset or 0))
    result = runner.run_chunks([request])[0]
    assert result.error is None, result.error
    return result


def _prompt_arrays(rng):
    return (rng.integers(0, 6561, (1, PROMPT_TOKENS)).astype(np.int32) + SPEECH_ID_OFFSET,
            rng.standard_normal((1, PROMPT_TOKENS * TOKEN_MEL_RATIO, MEL_BINS)).astype(np.float32),
            rng.standard_normal((1, SPEAKER_EMBEDDING_DIM)).astype(np.float32))


def _prompt_inputs(arrays):
    tokens, feat, embedding = arrays
    return [_input("prompt_speech_tokens", tokens, "INT32"), _input("prompt_speech_feat", feat, "FP32"),
            _input("prompt_spk_embedding", embedding, "FP32")]


SEED = 11
TOL = dict(rtol=1e-4, atol=1e-4)   # the served call may run padded in a batch bucket


def test_served_offline_call_matches_the_in_process_runner(stage_servers, in_process):
    rng = np.random.default_rng(21)
    target = rng.integers(0, 6561, (1, 30)).astype(np.int32) + SPEECH_ID_OFFSET
    prompt = _prompt_arrays(rng)
    client = grpcclient.InferenceServerClient(stage_servers.grpc_url("token2wav"))
    served = client.infer(TOKEN2WAV_MODEL, [_input("target_speech_tokens", target, "INT32"), *_prompt_inputs(prompt),
                                            _input("seed", np.array([[SEED]], np.uint64), "UINT64")])
    local = _local_chunk(in_process, target, prompt, SEED)
    np.testing.assert_allclose(served.as_numpy("waveform"), local.waveform.numpy(), **TOL)


def test_served_stream_chunks_match_the_in_process_runner(stage_servers, in_process):
    rng = np.random.default_rng(22)
    target = rng.integers(0, 6561, (1, 40)).astype(np.int32) + SPEECH_ID_OFFSET
    prompt = _prompt_arrays(rng)
    client = grpcclient.InferenceServerClient(stage_servers.grpc_url("token2wav"))
    seed = [_input("seed", np.array([[SEED]], np.uint64), "UINT64")]
    first = client.infer(TOKEN2WAV_MODEL, [
        _input("target_speech_tokens", target[:, :28], "INT32"), *_prompt_inputs(prompt), *seed,
        _input("token_offset", np.array([[0]], np.int32), "INT32"), _input("finalize", np.array([[False]]), "BOOL")])
    local_first = _local_chunk(in_process, target[:, :28], prompt, SEED, offset=0, finalize=False)
    np.testing.assert_allclose(first.as_numpy("waveform"), local_first.waveform.numpy(), **TOL)
    for name, value in (("cache_mel", local_first.cache.mel), ("cache_source", local_first.cache.source),
                        ("cache_speech", local_first.cache.speech)):
        np.testing.assert_allclose(first.as_numpy(name), value.reshape(first.as_numpy(name).shape).numpy(), **TOL)
    last = client.infer(TOKEN2WAV_MODEL, [
        _input("target_speech_tokens", target, "INT32"), *_prompt_inputs(prompt), *seed,
        _input("token_offset", np.array([[25]], np.int32), "INT32"), _input("finalize", np.array([[True]]), "BOOL"),
        *(_input(n, first.as_numpy(n), "FP32") for n in ("cache_mel", "cache_source", "cache_speech"))])
    local_last = _local_chunk(in_process, target, prompt, SEED, offset=25, finalize=True, cache=local_first.cache)
    np.testing.assert_allclose(last.as_numpy("waveform"), local_last.waveform.numpy(), **TOL)


def test_token2wav_offline_call_returns_960_samples_per_token(stage_servers):
    rng = np.random.default_rng(2)
    target = rng.integers(0, 6561, (1, 30)).astype(np.int32) + SPEECH_ID_OFFSET
    client = grpcclient.InferenceServerClient(stage_servers.grpc_url("token2wav"))
    result = client.infer(TOKEN2WAV_MODEL, [_input("target_speech_tokens", target, "INT32"), *_prompt(rng)])
    wav = result.as_numpy("waveform")
    assert wav.dtype == np.float32 and wav.shape == (1, 30 * SAMPLES_PER_TOKEN)
    assert np.isfinite(wav).all()


def test_token2wav_stream_chunks_carry_the_vocoder_cache(stage_servers):
    rng = np.random.default_rng(3)
    target = rng.integers(0, 6561, (1, 40)).astype(np.int32) + SPEECH_ID_OFFSET
    prompt = _prompt(rng)
    client = grpcclient.InferenceServerClient(stage_servers.grpc_url("token2wav"))
    first_len = 28   # 25 tokens + 3 lookahead
    first = client.infer(TOKEN2WAV_MODEL, [
        _input("target_speech_tokens", target[:, :first_len], "INT32"), *prompt,
        _input("token_offset", np.array([[0]], np.int32), "INT32"),
        _input("finalize", np.array([[False]]), "BOOL")])
    cache = {name: first.as_numpy(name) for name in ("cache_mel", "cache_source", "cache_speech")}
    assert cache["cache_mel"].shape == (1, MEL_BINS, HIFT_MEL_CACHE_FRAMES)
    assert cache["cache_source"].shape == (1, HIFT_SOURCE_CACHE_SAMPLES)
    assert cache["cache_speech"].shape == (1, HIFT_SOURCE_CACHE_SAMPLES)
    wav0 = first.as_numpy("waveform")
    assert wav0.shape == (1, 25 * SAMPLES_PER_TOKEN - HIFT_SOURCE_CACHE_SAMPLES)   # the tail is withheld
    last = client.infer(TOKEN2WAV_MODEL, [
        _input("target_speech_tokens", target, "INT32"), *prompt,
        _input("token_offset", np.array([[25]], np.int32), "INT32"),
        _input("finalize", np.array([[True]]), "BOOL"),
        *(_input(name, value, "FP32") for name, value in cache.items())])
    wav1 = last.as_numpy("waveform")
    assert wav0.shape[1] + wav1.shape[1] == 40 * SAMPLES_PER_TOKEN
    assert last.as_numpy("cache_mel").shape == (1, MEL_BINS, 0)


def test_token2wav_chunk_without_cache_fails_only_itself(stage_servers):
    rng = np.random.default_rng(4)
    target = rng.integers(0, 6561, (1, 30)).astype(np.int32) + SPEECH_ID_OFFSET
    client = grpcclient.InferenceServerClient(stage_servers.grpc_url("token2wav"))
    with pytest.raises(Exception, match="cache"):
        client.infer(TOKEN2WAV_MODEL, [_input("target_speech_tokens", target, "INT32"), *_prompt(rng),
                                       _input("token_offset", np.array([[5]], np.int32), "INT32")])


def test_served_offline_speed_halves_the_audio_as_the_in_process_runner(stage_servers, in_process):
    """`speed` 2 on an offline call: half the samples, the runner's audio; on a streaming chunk it is refused."""
    from cosyvoice_token2wav.sequence import ChunkRequest, chunk_seed
    rng = np.random.default_rng(23)
    target = rng.integers(0, 6561, (1, 30)).astype(np.int32) + SPEECH_ID_OFFSET
    prompt = _prompt_arrays(rng)
    client = grpcclient.InferenceServerClient(stage_servers.grpc_url("token2wav"))
    common = [_input("target_speech_tokens", target, "INT32"), *_prompt_inputs(prompt),
              _input("seed", np.array([[SEED]], np.uint64), "UINT64")]
    served = client.infer(TOKEN2WAV_MODEL, [*common, _input("speed", np.array([[2.0]], np.float32), "FP32")])
    wav = served.as_numpy("waveform")
    assert wav.shape == (1, 30 * SAMPLES_PER_TOKEN // 2)
    tokens, feat, embedding = prompt
    local = in_process.run_chunks([ChunkRequest(
        tokens=torch.from_numpy(target.astype(np.int64) - SPEECH_ID_OFFSET),
        prompt_tokens=torch.from_numpy(tokens.astype(np.int64) - SPEECH_ID_OFFSET),
        prompt_feat=torch.from_numpy(feat), embedding=torch.from_numpy(embedding), seed=chunk_seed(SEED, 0),
        speed=2.0)])[0]
    np.testing.assert_allclose(wav, local.waveform.numpy(), **TOL)
    with pytest.raises(Exception, match="offline"):
        client.infer(TOKEN2WAV_MODEL, [*common, _input("speed", np.array([[2.0]], np.float32), "FP32"),
                                       _input("token_offset", np.array([[0]], np.int32), "INT32"),
                                       _input("finalize", np.array([[False]]), "BOOL")])


def _seeded_stream(client, target, prompt, seed: int | None) -> np.ndarray:
    """Two chunks (offset 0, then 25 final), optionally seeded; the concatenated waveform."""
    seeded = [] if seed is None else [_input("seed", np.array([[seed]], np.uint64), "UINT64")]
    first = client.infer(TOKEN2WAV_MODEL, [
        _input("target_speech_tokens", target[:, :28], "INT32"), *prompt, *seeded,
        _input("token_offset", np.array([[0]], np.int32), "INT32"), _input("finalize", np.array([[False]]), "BOOL")])
    cache = [_input(n, first.as_numpy(n), "FP32") for n in ("cache_mel", "cache_source", "cache_speech")]
    last = client.infer(TOKEN2WAV_MODEL, [
        _input("target_speech_tokens", target, "INT32"), *prompt, *seeded, *cache,
        _input("token_offset", np.array([[25]], np.int32), "INT32"), _input("finalize", np.array([[True]]), "BOOL")])
    return np.concatenate([first.as_numpy("waveform")[0], last.as_numpy("waveform")[0]])


def test_seeded_calls_repeat_bit_for_bit_and_seeds_differ(stage_servers):
    rng = np.random.default_rng(5)
    target = rng.integers(0, 6561, (1, 40)).astype(np.int32) + SPEECH_ID_OFFSET
    prompt = _prompt(rng)
    client = grpcclient.InferenceServerClient(stage_servers.grpc_url("token2wav"))

    def offline(seed: int) -> np.ndarray:
        return client.infer(TOKEN2WAV_MODEL, [_input("target_speech_tokens", target, "INT32"), *prompt,
                                              _input("seed", np.array([[seed]], np.uint64), "UINT64")]
                            ).as_numpy("waveform")

    assert np.array_equal(offline(7), offline(7))
    assert not np.array_equal(offline(7), offline(8))
    assert np.array_equal(_seeded_stream(client, target, prompt, 7), _seeded_stream(client, target, prompt, 7))
    unseeded = _seeded_stream(client, target, prompt, None)          # absent seed: the process RNG, as before
    assert unseeded.shape == (40 * SAMPLES_PER_TOKEN,) and not np.array_equal(unseeded, _seeded_stream(
        client, target, prompt, None))


def test_chunk_seeds_differ_per_chunk_and_repeat_per_request():
    from cosyvoice_token2wav.sequence import chunk_seed

    seeds = [chunk_seed(7, offset) for offset in (0, 15, 40, 90)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 1 << 63 for s in seeds)
    assert seeds == [chunk_seed(7, offset) for offset in (0, 15, 40, 90)]
    assert chunk_seed(8, 0) != seeds[0] and chunk_seed((1 << 64) - 1, 0) < 1 << 63


def _kind_count(metrics_url: str, name: str, kind: str) -> float:
    import re
    import urllib.request
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    match = re.search(rf'^{name}{{[^}}]*kind="{kind}"[^}}]*}} ([0-9.e+]+)$', text, re.M)
    assert match, f"{name}{{kind={kind}}} missing from the metrics port: " + "; ".join(
        line for line in text.splitlines() if "token2wav" in line and not line.startswith("#"))[:3000]
    return float(match.group(1))


def _wait_kind_count(metrics_url: str, name: str, kind: str, expected: float, timeout_s: float = 30.0) -> None:
    import time
    deadline = time.monotonic() + timeout_s
    while (got := _kind_count(metrics_url, name, kind)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == expected, f"{name}{{kind={kind}}} is {got}, expected {expected}"


def test_concurrent_first_chunk_and_offline_call_are_each_answered_and_counted_by_kind(stage_servers):
    """A first chunk (priority 1, as the gateway sends it) and a long offline call in flight together: each
    gets its own answer (through the response sender of its group); chunks and ms are counted per kind."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(6)
    url = stage_servers.grpc_url("token2wav")
    metrics = stage_servers.metrics_url("token2wav")
    before = {k: _kind_count(metrics, "token2wav_chunks", k) for k in ("first", "offline")}
    long_target = rng.integers(0, 6561, (1, 200)).astype(np.int32) + SPEECH_ID_OFFSET
    first_target = rng.integers(0, 6561, (1, 18)).astype(np.int32) + SPEECH_ID_OFFSET
    prompts = [_prompt(rng) for _ in range(3)]

    def offline():
        client = grpcclient.InferenceServerClient(url)
        return client.infer(TOKEN2WAV_MODEL, [_input("target_speech_tokens", long_target, "INT32"), *prompts[0]])

    def first(n: int):
        client = grpcclient.InferenceServerClient(url)
        return client.infer(TOKEN2WAV_MODEL, [
            _input("target_speech_tokens", first_target, "INT32"), *prompts[n],
            _input("token_offset", np.array([[0]], np.int32), "INT32"),
            _input("finalize", np.array([[False]]), "BOOL")], priority=1)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(offline), pool.submit(first, 1), pool.submit(first, 2)]
        long_wav, *firsts = [f.result(timeout=120).as_numpy("waveform") for f in futures]
    assert long_wav.shape == (1, 200 * SAMPLES_PER_TOKEN)
    assert all(w.shape == (1, 15 * SAMPLES_PER_TOKEN - HIFT_SOURCE_CACHE_SAMPLES) for w in firsts)
    # the stage counts a chunk just after sending it: wait for the counts rather than read them once
    _wait_kind_count(metrics, "token2wav_chunks", "first", before["first"] + 2)
    _wait_kind_count(metrics, "token2wav_chunks", "offline", before["offline"] + 1)
    assert _kind_count(metrics, "token2wav_chunk_compute_ms", "offline") > 0
