"""The llm stage's one request parser (cosyvoice_llm.request): TensorRT-LLM's tensor semantics, and the refusals
that name the input. The Triton model and the in-process line both call it."""
import numpy as np
import pytest

from cosyvoice_common.constants import FLAT_SOS_ID, FLAT_TASK_ID
from cosyvoice_common.errors import InvalidRequestError
from cosyvoice_llm.request import parse_request
from cosyvoice_llm.sampling import SamplingParams

IDS = [FLAT_SOS_ID, 11, 12, 13, FLAT_TASK_ID]


def _tensors(**overrides) -> dict[str, np.ndarray]:
    """What the gateway's pipeline sends (contract shapes: no batch dimension)."""
    tensors = {
        "input_ids": np.array(IDS + [0, 0], np.int32),        # padded past input_lengths
        "input_lengths": np.array([len(IDS)], np.int32),
        "request_output_len": np.array([40], np.int32),
        "min_length": np.array([5], np.int32),
        "runtime_top_k": np.array([0], np.int32),
        "runtime_top_p": np.array([0.0], np.float32),
        "temperature": np.array([0.0], np.float32),
        "random_seed": np.array([2**63 - 1], np.uint64),
        "streaming": np.array([True]),
        "stream_boundaries": np.array([18, 43], np.int32),
    }
    tensors.update(overrides)
    return {name: value for name, value in tensors.items() if value is not None}


def test_tensors_become_a_typed_request_with_tensorrt_llm_defaults():
    parsed = parse_request(_tensors(), "r1")
    request = parsed.request
    assert (request.request_id, request.input_ids, request.max_new_tokens, request.min_new_tokens, request.seed) == (
        "r1", tuple(IDS), 40, 5, 2**63 - 1)
    assert request.sampling == SamplingParams()     # top_k / top_p 0 = unset, temperature 0 = 1: the RAS defaults
    assert parsed.streaming and parsed.stream_boundaries == (18, 43)


def test_top_k_one_is_greedy_and_offline_requests_ignore_boundaries():
    parsed = parse_request(_tensors(runtime_top_k=np.array([1], np.int32), streaming=np.array([False])), "r")
    assert parsed.request.sampling == SamplingParams.greedy()
    assert not parsed.streaming and parsed.stream_boundaries is None
    sampled = parse_request(_tensors(runtime_top_k=np.array([7], np.int32), runtime_top_p=np.array([0.5], np.float32),
                                     temperature=np.array([0.8], np.float32), streaming=None), "r").request.sampling
    assert (sampled.top_k, sampled.top_p, sampled.temperature) == (7, 0.5, pytest.approx(0.8))


@pytest.mark.parametrize("overrides, message", [
    (dict(request_output_len=None), "request_output_len is required"),
    (dict(input_ids=None), "input_ids is required"),
    (dict(input_ids=np.zeros((2, 3), np.int32)), "input_ids must be one sequence"),
    (dict(input_lengths=np.array([9], np.int32)), "input_lengths=9 outside"),
    (dict(min_length=np.array([1, 2], np.int32)), "min_length must hold one value"),
    (dict(runtime_top_p=np.array([1.5], np.float32)), "top_p must be in"),
    (dict(request_output_len=np.array([0], np.int32)), "max_new_tokens must be > 0"),
    (dict(stream_boundaries=np.array([18, 18], np.int32)), "stream_boundaries must be strictly increasing"),
])
def test_a_bad_input_is_refused_naming_it(overrides, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_request(_tensors(**overrides), "bad")
