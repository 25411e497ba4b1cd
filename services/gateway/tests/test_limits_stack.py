"""Limits agree end to end: the gateway learns the llm stage's max_seq_len from the served model config, caps
implicit bounds to it, splits long texts so every segment fits, and refuses explicit bounds beyond it, against a
real llm tritonserver started with a small capacity (the other stages are the session's)."""
import asyncio
from dataclasses import replace

import grpc
import numpy as np
import pytest

from cosyvoice_common.constants import FLAT_EOS1_ID, SPEECH_ID_OFFSET
from cosyvoice_common.stages import LLM
from cosyvoice_gateway.model_dir import load_text_encoder
from cosyvoice_gateway.pipeline import Pipeline, PipelineConfig, RequestError, StageTimings, SynthesisRequest
from cosyvoice_gateway.spk2info import Spk2InfoCache, Spk2InfoConfig
from cosyvoice_gateway.stage_client import StageError, Stages
from cosyvoice_gateway.testing import prompt_wav_bytes
from cosyvoice_launcher.stack import Stack
from cosyvoice_tools.testing import make_stack_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]
CAPACITY = 320
PROMPT = prompt_wav_bytes(2.0)
MEDIUM_TEXT = "The quick brown fox jumps over the lazy dog. It reads numbers aloud without a pause."
LONG_TEXT = ("The quick brown fox jumps over the lazy dog while the speaker takes a short breath. " * 4
             + "It reads numbers like one two three and twenty twenty five aloud without a pause anywhere")


@pytest.fixture(scope="module")
def small_llm(tiny_model_dir, tmp_path_factory):
    """One llm tritonserver serving max_seq_len = CAPACITY."""
    config = make_stack_config(tiny_model_dir, tmp_path_factory.mktemp("small-llm"), stages=("llm",))
    stages = tuple(replace(s, params=replace(s.params, max_seq_len=CAPACITY)) if s.name == "llm" else s
                   for s in config.stages)
    stack = Stack(replace(config, stages=stages))
    stack.start()
    yield stack.stage_grpc_urls("llm")[0]
    stack.stop()


@pytest.fixture
def make_pipeline(stage_servers, small_llm, tiny_model_dir):
    """Builds the pipeline inside the test's event loop (grpc.aio channels belong to one loop)."""
    urls = {name: stage_servers.grpc_url(name) for name in ("tokenizer", "speaker", "token2wav")}
    urls["llm"] = small_llm
    encode = load_text_encoder(tiny_model_dir)

    def make() -> Pipeline:
        stages = Stages.connect(urls, stage_timeout_s=60.0, llm_timeout_s=60.0)
        cache = Spk2InfoCache(Spk2InfoConfig(url="", model_revision="limits-test"))
        return Pipeline(PipelineConfig(), stages, cache, encode)
    return make


def run(coro):
    return asyncio.run(coro)


def test_gateway_reads_the_llm_capacity_from_the_served_model_config(make_pipeline):
    async def go():
        pipeline = make_pipeline()
        assert await pipeline.stages.check_ready()
        capacity = pipeline.llm_capacity()
        await pipeline.stages.close()
        return capacity
    assert run(go()) == CAPACITY


def test_the_capacity_is_real_the_llm_stage_refuses_more(make_pipeline):
    async def go():
        pipeline = make_pipeline()
        await pipeline.stages.check_ready()
        ids = np.array([SPEECH_ID_OFFSET + 6564, 10, 11, SPEECH_ID_OFFSET + 6565], np.int32)
        tensors = {"input_ids": ids, "input_lengths": np.array([4], np.int32),
                   "request_output_len": np.array([CAPACITY], np.int32), "end_id": np.array([FLAT_EOS1_ID], np.int32),
                   "streaming": np.array([False])}
        try:
            with pytest.raises(StageError) as info:
                async for _ in pipeline.stages[LLM].stream(tensors, ["output_ids"], "too-long"):
                    pass
            return info.value
        finally:
            await pipeline.stages.close()
    assert "max_seq_len" in str(run(go()))


def test_long_text_without_bounds_is_split_so_every_segment_fits(make_pipeline):
    async def go():
        pipeline = make_pipeline()
        await pipeline.stages.check_ready()
        try:
            return await pipeline.prepare(SynthesisRequest(text=LONG_TEXT, prompt_audio=PROMPT, prompt_text="hello"),
                                          StageTimings())
        finally:
            await pipeline.stages.close()
    prepared = run(go())
    assert len(prepared.segments) > 2
    for segment in prepared.segments:
        assert segment.input_ids.shape[0] + segment.max_tokens <= CAPACITY


def test_text_beyond_one_segments_room_is_synthesized_in_fitting_segments(make_pipeline):
    async def go():
        pipeline = make_pipeline()
        await pipeline.stages.check_ready()
        try:
            timings = StageTimings()
            prepared = await pipeline.prepare(SynthesisRequest(text=MEDIUM_TEXT, prompt_audio=PROMPT,
                                                               prompt_text="hello", seed=5), timings)
            wav = await pipeline.synthesize(prepared, timings)   # the llm stage accepts every segment
            return prepared, wav, timings
        finally:
            await pipeline.stages.close()
    prepared, wav, timings = run(go())
    assert len(prepared.segments) == 2
    assert timings.speech_tokens > 0 and wav.size > 0


@pytest.mark.parametrize("bounds", [dict(max_speech_tokens=CAPACITY), dict(min_speech_tokens=CAPACITY - 10),
                                    dict(min_speech_tokens=CAPACITY - 40, max_speech_tokens=CAPACITY - 40)])
def test_explicit_bound_beyond_capacity_is_invalid_argument_naming_the_limit(make_pipeline, bounds):
    async def go():
        pipeline = make_pipeline()
        await pipeline.stages.check_ready()
        try:
            with pytest.raises(RequestError) as info:
                await pipeline.prepare(SynthesisRequest(text="Hello there.", prompt_audio=PROMPT, prompt_text="hello",
                                                        **bounds), StageTimings())
            return info.value
        finally:
            await pipeline.stages.close()
    error = run(go())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"max_seq_len {CAPACITY}" in error.message
