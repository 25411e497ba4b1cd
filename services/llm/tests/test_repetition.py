"""Repetition-loop detection: the detector alone (exact firing point, no false alarms, config) and in the engine
(a decoder biased so greedy decoding loops ends with FinishReason.REPETITION; forced lengths are never cut)."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cosyvoice_common.stage_params import LLMParams
from cosyvoice_llm.engine import LLMEngine
from cosyvoice_llm.model import Qwen2LM, build_prompt_flat_ids
from cosyvoice_llm.repetition import RepetitionConfig, RepetitionDetector, find_loop
from cosyvoice_llm.sampling import SamplingParams
from cosyvoice_llm.sequence import FinishReason, LLMRequest

SMALL_SPEC = "max_period=8,min_repeats=3,min_span=12"
SMALL = RepetitionConfig.parse(SMALL_SPEC)


def _naive_period(tokens: list[int], cfg: RepetitionConfig) -> int:
    """Smallest p whose required tail (max(p * repeats, span) tokens) is p-periodic, else 0."""
    for p in range(1, cfg.max_period_tokens + 1):
        need = max(p * cfg.min_repeats, cfg.min_span_tokens)
        if len(tokens) >= need and all(tokens[i] == tokens[i - p] for i in range(len(tokens) - need + p, len(tokens))):
            return p
    return 0


@pytest.mark.parametrize("period", [1, 2, 3, 5, 8])
def test_detector_fires_exactly_when_a_period_p_pattern_fills_the_required_span(period):
    cfg = SMALL
    pattern = [100 + i for i in range(period)]
    need = max(period * cfg.min_repeats, cfg.min_span_tokens)
    prefix = [7, 8, 9, 10, 11, 12, 13]
    stream = prefix + (pattern * 50)[:need]
    detector = RepetitionDetector(cfg)
    fired = [detector.push(t) for t in stream]
    assert fired[-1] and not any(fired[:-1]), "fires on the last token of the required span, not before"
    assert detector.period == period


def test_detector_ignores_natural_short_repeats_and_long_periods():
    cfg = RepetitionConfig()   # defaults: 100 looping tokens = 4 s
    rng = random.Random(0)
    speech_like = []
    for _ in range(200):         # random tokens with short silences (runs of one id) and short echoes
        speech_like += [rng.randrange(6561) for _ in range(rng.randrange(3, 12))]
        speech_like += [0] * rng.randrange(0, 30)
    assert find_loop(speech_like, cfg) == 0
    assert find_loop(list(range(40)) * 10, cfg) == 0        # period 40 > max_period 20: not looked for
    assert find_loop([5] * 99, cfg) == 0 and find_loop([5] * 100, cfg) == 1


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=60))
def test_detector_matches_a_naive_scan_at_every_prefix(tokens):
    detector = RepetitionDetector(SMALL)
    for i, token in enumerate(tokens):
        fired = detector.push(token)
        expected = _naive_period(tokens[: i + 1], SMALL)
        assert fired == bool(expected)
        if fired:
            assert detector.period == expected
            return


def test_config_parses_off_defaults_and_overrides_and_rejects_nonsense():
    assert RepetitionConfig.parse(None) == RepetitionConfig.parse("") == RepetitionConfig()
    assert not RepetitionConfig.parse("off").enabled and RepetitionConfig.parse("off").detector() is None
    cfg = RepetitionConfig.parse("max_period=5, min_repeats=6, min_span=40")
    assert (cfg.max_period_tokens, cfg.min_repeats, cfg.min_span_tokens, cfg.enabled) == (5, 6, 40, True)
    assert RepetitionConfig.parse(cfg.describe()) == cfg
    for bad in ("max_period=x", "bogus=1", "min_repeats=1", "max_period=0", "min_span"):
        with pytest.raises(ValueError):
            RepetitionConfig.parse(bad)


# --- engine -----------------------------------------------------------------------------------------------
LOOP_CODE = 1234


@pytest.fixture()
def looping_model(tiny_model: Qwen2LM) -> Qwen2LM:
    """Greedy decoding emits LOOP_CODE forever: the decoder's bias makes it the argmax whatever the input."""
    with torch.no_grad():
        tiny_model.llm_decoder.bias.zero_()
        tiny_model.llm_decoder.bias[LOOP_CODE] = 1e4
    return tiny_model


def _request(rid: str, max_new: int, min_new: int = 0) -> LLMRequest:
    return LLMRequest(rid, tuple(build_prompt_flat_ids([3, 4, 5], [], [])), max_new_tokens=max_new,
                      min_new_tokens=min_new, sampling=SamplingParams.greedy(), seed=1)


def _drain(engine: LLMEngine, handles, max_steps: int = 400):
    for _ in range(max_steps):
        if not engine.has_work():
            break
        engine.step()
    return [(h.result(timeout_s=1), h.finish_reason) for h in handles]


def test_engine_ends_a_looping_request_with_repetition_and_keeps_forced_lengths(looping_model):
    engine = LLMEngine(looping_model, LLMParams(max_seq_len=256, repetition=SMALL_SPEC), batch_slots=4)
    free = engine.submit(_request("free", 200))
    forced = engine.submit(_request("forced", 40, min_new=40))    # benchmark style: min = max
    (free_tokens, free_reason), (forced_tokens, forced_reason) = _drain(engine, [free, forced])
    assert free_reason is FinishReason.REPETITION and free_tokens == [LOOP_CODE] * SMALL.min_span_tokens
    assert forced_reason is FinishReason.LENGTH and len(forced_tokens) == 40
    assert engine.num_free_slots == 4


def test_engine_with_detection_off_generates_to_max_length(looping_model):
    engine = LLMEngine(looping_model, LLMParams(max_seq_len=256, repetition="off"), batch_slots=2)
    [(tokens, reason)] = _drain(engine, [engine.submit(_request("off", 60))])
    assert reason is FinishReason.LENGTH and tokens == [LOOP_CODE] * 60
