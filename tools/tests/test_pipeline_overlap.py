"""The critical path of a stream with an uncached prompt: the LLM starts once the tokenizer answers, and the
speaker stage (x-vector + prompt mel, needed only by token2wav) finishes beside it.

Real in-process stages on the tiny model (`LocalPipeline`); the speaker stage is held at a gate that opens
only when the LLM has produced tokens, so a pipeline that waited for the speaker before starting the LLM
would never finish.
"""
import asyncio

import numpy as np
import pytest
from cosyvoice_common.constants import (
    MEL_HOP_SAMPLES,
    OUTPUT_SAMPLE_RATE_HZ,
    TOKEN_MEL_RATIO,
)
from cosyvoice_common.stages import LLM, SPEAKER
from cosyvoice_gateway.pipeline import StageTimings, SynthesisRequest
from cosyvoice_gateway.stage_client import Stages
from cosyvoice_gateway.testing import prompt_wav_bytes
from cosyvoice_tools.local import LocalPipeline


class _GatedSpeaker:
    """The real speaker stage, answering only after `gate` is set."""

    def __init__(self, stage, gate: asyncio.Event) -> None:
        self._stage = stage
        self._gate = gate
        self.calls = 0

    async def infer(self, *args, **kwargs):
        self.calls += 1
        out = await self._stage.infer(*args, **kwargs)
        await self._gate.wait()
        return out

    def __getattr__(self, name):
        return getattr(self._stage, name)


class _TokenWatch:
    """The real llm stage; sets `gate` when its first tokens arrive."""

    def __init__(self, stage, gate: asyncio.Event) -> None:
        self._stage = stage
        self._gate = gate

    async def stream(self, *args, **kwargs):
        async for out in self._stage.stream(*args, **kwargs):
            self._gate.set()
            yield out

    def __getattr__(self, name):
        return getattr(self._stage, name)


@pytest.fixture
def local(tiny_model_dir):
    pipeline = LocalPipeline.create(tiny_model_dir, "cpu")
    yield pipeline
    asyncio.run(pipeline.close())


def test_llm_starts_before_the_speaker_stage_answers(local):
    async def run():
        gate = asyncio.Event()
        stages = local.pipeline.stages
        speaker = _GatedSpeaker(stages[SPEAKER], gate)
        local.pipeline.stages = Stages({**stages, SPEAKER: speaker, LLM: _TokenWatch(stages[LLM], gate)})
        request = SynthesisRequest(text="Hello there.", prompt_audio=prompt_wav_bytes(seconds=2.0, seed=3),
                                   prompt_text="a prompt", min_speech_tokens=40, max_speech_tokens=40, seed=7,
                                   skip_cache=True)
        timings = StageTimings()
        prepared = await asyncio.wait_for(local.pipeline.prepare(request, timings), 60)
        assert not prepared.voice.done(), "prepare() waited for the speaker stage"
        chunks = await asyncio.wait_for(_collect(local.pipeline.stream(prepared, timings)), 120)
        assert speaker.calls == 1 and timings.per_stage[SPEAKER].calls == 1 and timings.per_stage[LLM].calls == 1
        assert sum(c.shape[0] for c in chunks) == 40 * TOKEN_MEL_RATIO * MEL_HOP_SAMPLES
        return prepared
    prepared = asyncio.run(run())
    # The LLM's prompt tokens follow from the audio length alone: half the 24 kHz mel frames at most.
    mel_frames = int(2.0 * OUTPUT_SAMPLE_RATE_HZ) // MEL_HOP_SAMPLES
    assert 0 < prepared.prompt_tokens_flat.shape[0] <= mel_frames // TOKEN_MEL_RATIO


def test_early_start_gives_the_same_audio_as_cached_features(local):
    """Features computed beside the LLM, then read back from the cache, drive the same seeded audio."""
    async def run():
        request = SynthesisRequest(text="Same words.", prompt_audio=prompt_wav_bytes(seconds=2.0, seed=4),
                                   prompt_text="p", min_speech_tokens=30, max_speech_tokens=30, seed=11)
        first, t1 = await local.synthesize(request)
        await local.pipeline.close()                  # the background cache write has landed
        again, t2 = await local.synthesize(request)
        return np.concatenate(first), t1, np.concatenate(again), t2
    first, t1, again, t2 = asyncio.run(run())
    assert not t1.cache_hit and t2.cache_hit
    np.testing.assert_allclose(first, again, atol=1e-5)


async def _collect(chunks):
    return [c async for c in chunks]
