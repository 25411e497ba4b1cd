"""What the stage client sends a replica, by what the replica's model config declares: hints (llm
`stream_boundaries`) are left out for a model without them; token2wav's `speed`, which changes the answer, is refused
to an older token2wav replica rather than silently dropped. The token2wav model config declares every contract input."""
import asyncio
import re
from pathlib import Path

import numpy as np
import pytest

from cosyvoice_common.contracts import TOKEN2WAV_INPUTS, TOKEN2WAV_SPEED
from cosyvoice_gateway import stage_client

TOKEN2WAV_CONFIG = Path(__file__).resolve().parents[2] / "token2wav/model_repository/token2wav/config.pbtxt"


def _declared_inputs(config_text: str) -> dict[str, str]:
    inputs = config_text.split("input [", 1)[1].split("]\noutput", 1)[0]
    return dict(re.findall(r'name: "(\w+)" data_type: TYPE_(\w+)', inputs))


def test_token2wav_model_config_declares_every_contract_input():
    declared = _declared_inputs(TOKEN2WAV_CONFIG.read_text())
    assert declared == {spec.name: spec.datatype for spec in TOKEN2WAV_INPUTS}


def _token2wav_inputs(replica_inputs: frozenset[str], tensors: dict[str, np.ndarray]) -> list[str]:
    async def run():
        client = stage_client.StageClient(stage_client.stage_config("token2wav", "127.0.0.1:1", 1.0), resolver=None)
        replica = client._replicas[0]
        replica.inputs = replica_inputs
        try:
            return [i.name() for i in client._inputs(tensors, True, replica)]
        finally:
            await client.close()
    return asyncio.run(run())


def test_speed_goes_to_a_replica_that_declares_it_and_is_refused_by_an_older_one():
    current = frozenset(spec.name for spec in TOKEN2WAV_INPUTS)
    older = current - {TOKEN2WAV_SPEED.name}
    tensors = {"target_speech_tokens": np.array([151700], np.int32), "seed": np.array([3], np.uint64)}
    assert _token2wav_inputs(older, tensors) == ["target_speech_tokens", "seed"]     # speed 1: nothing to refuse
    with_speed = {**tensors, TOKEN2WAV_SPEED.name: np.array([2.0], np.float32)}
    assert _token2wav_inputs(current, with_speed) == ["target_speech_tokens", "seed", "speed"]
    with pytest.raises(stage_client.StageError, match="does not support 'speed'") as info:
        _token2wav_inputs(older, with_speed)
    assert info.value.invalid
    without_seed = older - {"seed"}                  # a plain hint of an older model is still left out
    assert _token2wav_inputs(without_seed, tensors) == ["target_speech_tokens"]
