"""Request validation and the pure pieces of the pipeline (no stage servers needed: errors come first)."""
import asyncio

import grpc
import numpy as np
import pytest

from cosyvoice_common.constants import FLAT_EOS1_ID, SPEECH_ID_OFFSET
from cosyvoice_common.stages import STAGE_NAMES
from cosyvoice_gateway.pipeline import (
    Pipeline,
    PipelineConfig,
    RequestError,
    StageTimings,
    SynthesisRequest,
    align_prompt,
    speech_ids_from_llm,
    speech_token_bounds,
    target_segments,
)
from cosyvoice_gateway.spk2info import Spk2InfoCache, Spk2InfoConfig
from cosyvoice_gateway.stage_client import Stages

from cosyvoice_gateway.testing import char_encoder, prompt_wav_bytes

UNREACHABLE = "127.0.0.1:1"


def _pipeline(redis_url: str = "") -> Pipeline:
    stages = Stages.connect({name: UNREACHABLE for name in STAGE_NAMES}, stage_timeout_s=1.0, llm_timeout_s=1.0)
    cache = Spk2InfoCache(Spk2InfoConfig(url=redis_url, model_revision="test"))
    return Pipeline(PipelineConfig(), stages, cache, char_encoder)


def _error(request: SynthesisRequest, redis_url: str = "") -> RequestError:
    async def run():
        with pytest.raises(RequestError) as info:
            await _pipeline(redis_url).prepare(request, StageTimings())
        return info.value
    return asyncio.run(run())


GOOD_AUDIO = prompt_wav_bytes()


@pytest.mark.parametrize("request_, fragment", [
    (SynthesisRequest(text="  ", prompt_audio=GOOD_AUDIO), "text is empty"),
    (SynthesisRequest(text="x" * 10_001, prompt_audio=GOOD_AUDIO), "characters"),
    (SynthesisRequest(text="hi"), "no voice"),
    (SynthesisRequest(text="hi", speaker_id="a", prompt_audio=GOOD_AUDIO), "not both"),
    (SynthesisRequest(text="hi", prompt_audio=GOOD_AUDIO, sample_rate_hz=12345), "sample_rate"),
    (SynthesisRequest(text="hi", prompt_audio=GOOD_AUDIO, min_speech_tokens=50, max_speech_tokens=10), "min_speech_tokens"),
    (SynthesisRequest(text="hi", prompt_audio=GOOD_AUDIO, max_speech_tokens=100_000), "limit"),
    (SynthesisRequest(text="hi", prompt_audio=GOOD_AUDIO, min_speech_tokens=-1), ">= 0"),
    (SynthesisRequest(text="hi", prompt_audio=GOOD_AUDIO, top_p=1.5), "top_p"),
    (SynthesisRequest(text="hi", prompt_audio=b"definitely not audio"), "cannot decode"),
    (SynthesisRequest(text="hi", prompt_audio=prompt_wav_bytes(seconds=0.1)), "too short"),
])
def test_bad_requests_are_invalid_argument_with_a_message(request_, fragment):
    error = _error(request_)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.message


def test_unknown_speaker_is_not_found(gateway_redis):
    error = _error(SynthesisRequest(text="hi", speaker_id="nobody"), gateway_redis.url)
    assert error.code == grpc.StatusCode.NOT_FOUND and "nobody" in error.message


def test_speaker_lookup_without_redis_is_unavailable():
    error = _error(SynthesisRequest(text="hi", speaker_id="nobody"), "redis://127.0.0.1:1/0")
    assert error.code == grpc.StatusCode.UNAVAILABLE


def test_bounds_follow_the_model_rule_or_the_request():
    def bounds(text_tokens, **kw):
        return speech_token_bounds(SynthesisRequest(text="x", **kw), text_tokens, 3000)
    assert bounds(10) == (20, 200)
    assert bounds(10, min_speech_tokens=75, max_speech_tokens=75) == (75, 75)
    assert bounds(10, max_speech_tokens=5) == (5, 5)
    assert bounds(10, min_speech_tokens=500) == (500, 500)
    assert bounds(1000) == (2000, 3000)     # capped at the absurd-length limit


def _segments(text: str, text_frontend: bool = False, split: bool = True) -> list[str]:
    return target_segments(text, len, text_frontend, split)


def test_short_text_without_frontend_is_one_unchanged_segment():
    assert _segments("  Hello there. How are you 42 ") == ["Hello there. How are you 42"]


def test_long_text_without_frontend_splits_after_terminators_unnormalised():
    text = " ".join(f"Sentence number {i} is here." for i in range(12)) + " End."
    segments = _segments(text)
    assert len(segments) > 1
    assert all(len(s) <= 80 + 30 for s in segments)
    assert "".join(segments).replace(" ", "") == text.replace(" ", "")     # digits stay digits
    assert segments[-1].endswith("End.") and len(segments[-1]) >= 20


def test_zh_splits_on_chinese_terminators():
    text = "。".join(["今天天气很好我们去公园散步吧"] * 10) + "。"
    for frontend in (False, True):
        segments = _segments(text, frontend)
        assert len(segments) > 1 and all(s.endswith("。") for s in segments)


def test_frontend_normalises_and_splits_with_the_textnorm_rules():
    pytest.importorskip("inflect")
    assert _segments("I have 42 apples", text_frontend=True) == ["I have forty-two apples."]
    long = " ".join(f"Item {i} is ready." for i in range(12))
    segments = _segments(long, text_frontend=True)
    assert len(segments) > 1 and not any(ch.isdigit() for s in segments for ch in s)


def test_explicit_bounds_keep_one_segment_normalised_or_not():
    long = " ".join(f"Sentence number {i} is here." for i in range(12))
    assert _segments(long, split=False) == [long]
    (one,) = target_segments(long, len, True, split=False)
    assert "number 11" not in one and one.startswith("Sentence number zero")


def test_markup_and_punctuation_only_text():
    marked = "<|en|>I have 3 cats"
    assert _segments(marked, text_frontend=True) == [marked]
    assert _segments("... !!!", text_frontend=True) == []


def test_alignment_keeps_min_of_half_frames_and_tokens():
    ids = np.arange(10, dtype=np.int32) + SPEECH_ID_OFFSET
    assert align_prompt(ids, 17).tolist() == list(range(8))
    assert align_prompt(ids[:5], 17).shape == (5,)


def test_llm_output_stops_at_eos_and_drops_non_speech_ids():
    ids, stopped = speech_ids_from_llm(np.array([[SPEECH_ID_OFFSET + 1, 5, SPEECH_ID_OFFSET + 7, FLAT_EOS1_ID, SPEECH_ID_OFFSET]]))
    assert ids == [SPEECH_ID_OFFSET + 1, SPEECH_ID_OFFSET + 7] and stopped
