"""Each stage's tensor names (`TokenizerIn`, `Token2WavOut`, ...) are exactly the tensors of its typed contract, and
the registry hands every stage its own contract."""
import pytest

from cosyvoice_common import contracts
from cosyvoice_common.stages import STAGES, stage


def _names(namespace: type) -> set[str]:
    return {value for key, value in vars(namespace).items() if key.isupper()}


@pytest.mark.parametrize("names, specs", [
    (contracts.TokenizerIn, contracts.TOKENIZER_INPUTS), (contracts.TokenizerOut, contracts.TOKENIZER_OUTPUTS),
    (contracts.SpeakerIn, contracts.SPEAKER_INPUTS), (contracts.SpeakerOut, contracts.SPEAKER_OUTPUTS),
    (contracts.LLMIn, contracts.LLM_INPUTS), (contracts.LLMOut, contracts.LLM_OUTPUTS),
    (contracts.Token2WavIn, contracts.TOKEN2WAV_INPUTS), (contracts.Token2WavOut, contracts.TOKEN2WAV_OUTPUTS),
], ids=lambda v: getattr(v, "__name__", ""))
def test_a_stage_namespace_names_exactly_its_contract_tensors(names, specs):
    assert _names(names) == {spec.name for spec in specs}
    assert len(specs) == len({spec.name for spec in specs})          # no tensor declared twice


def test_the_token2wav_cache_goes_back_under_the_names_it_came_out_with():
    inputs = {spec.name for spec in contracts.TOKEN2WAV_INPUTS if spec.optional}
    outputs = {spec.name for spec in contracts.TOKEN2WAV_OUTPUTS}
    assert set(contracts.TOKEN2WAV_CACHE) <= inputs & outputs


def test_the_registry_gives_each_stage_its_own_contract():
    by_model = {contracts.TOKENIZER_MODEL: contracts.TOKENIZER_INPUTS,
                contracts.SPEAKER_MODEL: contracts.SPEAKER_INPUTS,
                contracts.LLM_MODEL: contracts.LLM_INPUTS,
                contracts.TOKEN2WAV_MODEL: contracts.TOKEN2WAV_INPUTS}
    assert {s.triton_model: s.inputs for s in STAGES} == by_model
    assert stage("token2wav").outputs == contracts.TOKEN2WAV_OUTPUTS


def test_the_seed_model_inputs_are_its_namespace():
    assert _names(contracts.SeedIn) == set(contracts.SEED_INPUTS)
    assert set(contracts.SEED_TEXT_INPUTS) <= set(contracts.SEED_INPUTS)
