"""Lengths that fit the llm stage (cosyvoice_gateway.limits), without stage servers."""
import asyncio

import grpc
import pytest

from cosyvoice_common.constants import LLM_MAX_SEQ_LEN, MAX_SPEECH_TOKENS, MAX_TOKEN_TEXT_RATIO, PROMPT_MAX_SPEECH_TOKENS
from cosyvoice_common.stages import LLM, STAGE_NAMES
from cosyvoice_gateway import limits
from cosyvoice_gateway.pipeline import Pipeline, PipelineConfig, RequestError, StageTimings, SynthesisRequest
from cosyvoice_gateway.spk2info import Spk2InfoCache, Spk2InfoConfig
from cosyvoice_gateway.stage_client import Stages
from cosyvoice_gateway.testing import char_encoder, prompt_wav_bytes


def words(text: str) -> int:
    return len(text.split())


def test_default_capacity_holds_the_api_maximum_after_the_longest_prompt():
    assert LLM_MAX_SEQ_LEN >= MAX_SPEECH_TOKENS + PROMPT_MAX_SPEECH_TOKENS + limits.LLM_FRAME_POSITIONS + 256


def test_implicit_bound_is_capped_to_the_room_left():
    lo, hi = limits.speech_token_bounds(0, 0, 133, 3000, room=2048 - 389)
    assert hi == 2048 - 389 and lo == 266


def test_explicit_bound_beyond_room_names_the_room():
    with pytest.raises(limits.LimitError, match="room for 100"):
        limits.speech_token_bounds(0, 150, 10, 3000, room=100)
    with pytest.raises(limits.LimitError):
        limits.speech_token_bounds(150, 0, 1, 3000, room=100)
    assert limits.speech_token_bounds(50, 100, 10, 3000, room=100) == (50, 100)


def test_long_text_is_split_so_every_segment_fits():
    sentence = "one two three four five six seven eight nine ten. "
    text = sentence * 30 + " ".join(["word"] * 200)          # 300 words in sentences, then one 200-word run
    fixed, capacity = 100, 100 + 21 * 40                      # room for 40 text tokens per segment
    pieces = limits.fit_segments([text], words, fixed, capacity)
    assert len(pieces) > 1
    assert all(limits.fits(fixed, words(p), capacity) for p in pieces)
    assert sum(words(p) for p in pieces) == words(text)      # nothing lost


def test_zh_text_without_terminators_is_cut_by_characters():
    text = "你" * 500
    pieces = limits.split_to_fit(text, len, 64)
    assert all(len(p) <= 64 for p in pieces) and "".join(pieces).rstrip("。") == text   # split_paragraph ends it


def _pipeline(capacity: int | None) -> Pipeline:
    stages = Stages.connect({name: "127.0.0.1:1" for name in STAGE_NAMES}, stage_timeout_s=1.0, llm_timeout_s=1.0)
    if capacity is not None:
        stages[LLM]._replicas[0].parameters = {"max_seq_len": str(capacity)}
    return Pipeline(PipelineConfig(), stages, Spk2InfoCache(Spk2InfoConfig(url="", model_revision="t")), char_encoder)


def test_capacity_comes_from_the_llm_model_config_else_the_default():
    async def capacities():                   # grpc.aio clients are made inside a running loop
        return _pipeline(None).llm_capacity(), _pipeline(300).llm_capacity()
    assert asyncio.run(capacities()) == (LLM_MAX_SEQ_LEN, 300)


def test_explicit_bound_beyond_the_served_capacity_is_invalid_argument_naming_it():
    async def run():
        with pytest.raises(RequestError) as info:
            await _pipeline(300).prepare(SynthesisRequest(text="hi", prompt_audio=prompt_wav_bytes(),
                                                          max_speech_tokens=400), StageTimings())
        return info.value
    error = asyncio.run(run())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "max_seq_len 300" in error.message
