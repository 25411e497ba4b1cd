"""Isolation: many requests at once, each checked against the same request run alone.

- llm stage (direct, over its gRPC endpoint): concurrent seeded, sampled streams give exactly the tokens of
  their solo runs (the engine's counter-based sampler is batch-invariant by design) and their own lengths.
- whole gateway: concurrent streams with different voices, seeds and forced lengths each get exactly their
  own length and the audio of their solo run: the request's seed drives the LLM sampler and the vocoder's
  source noise (token2wav `seed`, mixed per chunk with its token_offset), so a solo rerun is bit-identical.
  Among other requests the tokens and noise are the same, but token2wav's padded batch rounds differently
  from a batch of one (float summation order on CPU): measured max |diff| up to ~9e-5 (correlation 1.0 to
  6 digits) on the tiny model, so that comparison has a tolerance, not equality.
- a seeded request through the session's gateway repeats bit for bit (offline and streaming); another seed
  gives other audio.
"""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.constants import (
    FLAT_EOS1_ID,
    FLAT_SOS_ID,
    FLAT_TASK_ID,
    SAMPLES_PER_TOKEN,
    SPEECH_ID_OFFSET,
)
from cosyvoice_gateway.pipeline import speech_ids_from_llm
from cosyvoice_gateway.server import Gateway, GatewayConfig
from cosyvoice_gateway.stage_client import StageClient, stage_config
from cosyvoice_gateway.testing import free_port, prompt_wav_bytes

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _llm_tensors(text_ids, prompt_codes, n_tokens: int, seed: int) -> dict[str, np.ndarray]:
    one = lambda v, t: np.array([v], t)  # noqa: E731
    ids = np.array([FLAT_SOS_ID, *text_ids, FLAT_TASK_ID, *(c + SPEECH_ID_OFFSET for c in prompt_codes)], np.int32)
    return {"input_ids": ids, "input_lengths": one(ids.shape[0], np.int32), "request_output_len": one(n_tokens, np.int32),
            "end_id": one(FLAT_EOS1_ID, np.int32), "pad_id": one(FLAT_EOS1_ID, np.int32),
            "streaming": one(True, np.bool_), "min_length": one(n_tokens, np.int32),
            "runtime_top_k": one(25, np.int32), "runtime_top_p": one(0.8, np.float32),
            "temperature": one(1.0, np.float32), "random_seed": one(seed, np.uint64)}


async def _llm_tokens(client: StageClient, tensors, request_id: str) -> list[int]:
    tokens = []
    async for out in client.stream(tensors, ["output_ids"], request_id):
        ids, stopped = speech_ids_from_llm(out["output_ids"])
        tokens += ids
        if stopped:
            break
    return tokens


def test_concurrent_llm_streams_get_their_solo_tokens_and_lengths(stack):
    rng = np.random.default_rng(5)
    cases = [(rng.integers(0, 1000, 4 + i).tolist(), rng.integers(0, 6561, 3 * (i % 3)).tolist(), 12 + 7 * i, 100 + i % 3)
             for i in range(8)]          # seeds repeat across different inputs on purpose

    async def run():
        client = StageClient(stage_config("llm", ",".join(stack.stage_grpc_urls("llm")), 120.0))
        try:
            assert await client.check_ready()
            solo = [await _llm_tokens(client, _llm_tensors(*c), f"solo-{i}") for i, c in enumerate(cases)]
            together = await asyncio.gather(*(_llm_tokens(client, _llm_tensors(*c), "same-id") for c in cases))
        finally:
            await client.close()
        return solo, together

    solo, together = asyncio.run(run())
    for (_, _, n, _), alone, shared in zip(cases, solo, together):
        assert len(alone) == len(shared) == n
        assert shared == alone
    assert len({tuple(t) for t in solo}) == len(cases)     # different inputs really differ


# Largest |sample difference| allowed between a seeded stream run among others and alone (token2wav batch
# rounding; audio is in [-1, 1]; measured <= 9e-5).
BATCH_ROUNDING_TOLERANCE = 1e-3
VOICES = [prompt_wav_bytes(seconds=1.5 + 0.3 * i, seed=40 + i) for i in range(3)]


def _request(i: int) -> tts_pb2.SynthesizeRequest:
    n = 6 + 3 * (i % 4)           # 6..15 tokens: one token2wav call each (the first chunk needs 18), quick on CPU
    return tts_pb2.SynthesizeRequest(
        text=f"Sentence number {i} for the isolation test.", prompt_audio=VOICES[i % len(VOICES)], prompt_text="voice",
        encoding=tts_pb2.FLOAT32, min_speech_tokens=n, max_speech_tokens=n, sampling=tts_pb2.SamplingParams(seed=1000 + i))


async def _stream(stub, request) -> tuple[np.ndarray, tts_pb2.StageTimings]:
    chunks = [c async for c in stub.SynthesizeStream(request, timeout=300)]
    return np.frombuffer(b"".join(c.audio for c in chunks), "<f4"), chunks[-1].timings


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def test_concurrent_gateway_streams_keep_their_own_length_and_audio(stack, tiny_model_dir):
    count = 5

    async def run():
        # An in-process gateway over the session's stages, with stage timeouts for a shared 2-core machine
        # (token2wav serves one chunk at a time: 5 concurrent chunks queue there).
        gateway = Gateway(GatewayConfig(
            model_dir=tiny_model_dir, redis_url=stack.redis_url, model_revision="isolation", grpc_port=free_port(),
            http_port=0, stage_timeout_s=300.0, readiness_interval_s=0.5,
            **{f"{n}_urls": ",".join(stack.stage_grpc_urls(n)) for n in ("tokenizer", "speaker", "llm", "token2wav")}))
        await gateway.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = tts_pb2_grpc.TextToSpeechStub(channel)
                solo = [await _stream(stub, _request(i)) for i in range(count)]
                solo_again = [await _stream(stub, _request(i)) for i in range(2)]
                together = await asyncio.gather(*(_stream(stub, _request(i)) for i in range(count)))
        finally:
            await gateway.stop()
        return solo, solo_again, together

    solo, solo_again, together = asyncio.run(run())
    again_diff = [float(np.max(np.abs(solo[i][0] - solo_again[i][0]))) for i in range(2)]
    shared_diff = []
    for i, ((alone, t_alone), (mixed, t_mixed)) in enumerate(zip(solo, together)):
        n = _request(i).max_speech_tokens
        assert t_alone.speech_tokens == t_mixed.speech_tokens == n
        assert alone.shape == mixed.shape == (n * SAMPLES_PER_TOKEN,)
        shared_diff.append(float(np.max(np.abs(alone - mixed))))
    print(f"max |diff| solo-vs-solo {again_diff}, concurrent-vs-solo {shared_diff}, correlation "
          f"{[round(_corr(a[0], b[0]), 6) for a, b in zip(solo, together)]}")
    # Seeded: a solo rerun is the same audio bit for bit; among others only batch rounding differs.
    assert again_diff == [0.0, 0.0]
    assert max(shared_diff) < BATCH_ROUNDING_TOLERANCE


def test_seeded_request_repeats_bit_for_bit_through_the_gateway(stack):
    def request(seed: int) -> tts_pb2.SynthesizeRequest:
        return tts_pb2.SynthesizeRequest(
            text="A seeded sentence.", prompt_audio=VOICES[0], prompt_text="voice", encoding=tts_pb2.FLOAT32,
            min_speech_tokens=30, max_speech_tokens=30, sampling=tts_pb2.SamplingParams(seed=seed))

    async def run():
        async with grpc.aio.insecure_channel(stack.gateway_grpc_url) as channel:
            stub = tts_pb2_grpc.TextToSpeechStub(channel)
            offline = [np.frombuffer((await stub.Synthesize(request(seed), timeout=300)).audio, "<f4")
                       for seed in (11, 11, 12)]
            streamed = [(await _stream(stub, request(11)))[0] for _ in range(2)]
        return offline, streamed

    offline, streamed = asyncio.run(run())
    assert offline[0].shape == (30 * SAMPLES_PER_TOKEN,)
    assert np.array_equal(offline[0], offline[1])
    assert not np.array_equal(offline[0], offline[2])
    assert streamed[0].shape == (30 * SAMPLES_PER_TOKEN,) and np.array_equal(streamed[0], streamed[1])
