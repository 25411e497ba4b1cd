"""`speed` through the pipeline over real in-process stages (tiny model, `LocalPipeline`): an offline request at
speed 2 / 0.5 gives int(2 T / speed) x 480 samples for T forced tokens; a stream with a speed, or a speed out of
range, is INVALID_ARGUMENT before any audio is made (the HTTP front checks before the pipeline sees it)."""
import asyncio

import grpc
import pytest

from cosyvoice_common.constants import MEL_HOP_SAMPLES, TOKEN_MEL_RATIO
from cosyvoice_tools.local import LocalPipeline
from cosyvoice_gateway.pipeline import RequestError, SynthesisRequest
from cosyvoice_gateway.testing import prompt_wav_bytes

TOKENS = 12


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    pipeline = LocalPipeline.create(tiny_model_dir, "cpu")
    yield pipeline
    asyncio.run(pipeline.close())


def _request(speed: float) -> SynthesisRequest:
    return SynthesisRequest(text="Hello there.", prompt_audio=prompt_wav_bytes(), prompt_text="hi", seed=5,
                            min_speech_tokens=TOKENS, max_speech_tokens=TOKENS, speed=speed)


@pytest.mark.parametrize("speed", [1.0, 2.0, 0.5])
def test_offline_speed_stretches_the_whole_utterance(local, speed):
    chunks, timings = asyncio.run(local.synthesize(_request(speed), streaming=False))
    assert timings.speech_tokens == TOKENS
    assert sum(c.shape[0] for c in chunks) == int(TOKEN_MEL_RATIO * TOKENS / speed) * MEL_HOP_SAMPLES


@pytest.mark.parametrize("speed, streaming, fragment", [(1.5, True, "streaming supports only speed 1.0"),
                                                        (2.5, False, "[0.5, 2.0]"), (0.0, False, "[0.5, 2.0]"),
                                                        (float("nan"), False, "[0.5, 2.0]")])
def test_bad_speed_is_invalid_argument(local, speed, streaming, fragment):
    with pytest.raises(RequestError) as info:
        asyncio.run(local.synthesize(_request(speed), streaming=streaming))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.message
