"""llm (decoupled) served by a real tritonserver on the tiny model: TensorRT-LLM tensors, streaming, cancel."""
import queue
import re
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from cosyvoice_common.constants import FLAT_SOS_ID, FLAT_TASK_ID, FLAT_EOS1_ID, SPEECH_ID_OFFSET
from cosyvoice_common.contracts import LLM_MODEL
from cosyvoice_common.stage_params import LLMParams
from cosyvoice_llm.engine import LLMEngine
from cosyvoice_llm.model import load_llm
from cosyvoice_llm.sampling import SamplingParams
from cosyvoice_llm.sequence import LLMRequest

pytestmark = [pytest.mark.stack, pytest.mark.slow]
TEXT_IDS = [11, 12, 13, 14, 15, 16, 17, 18]
INPUT_IDS = [FLAT_SOS_ID, *TEXT_IDS, FLAT_TASK_ID]


def _input(name: str, array: np.ndarray, datatype: str):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _inputs(max_new: int, min_new: int = 0, streaming: bool = True, top_k: int = 1,
            boundaries: list[int] | None = None) -> list:
    ids = np.array([INPUT_IDS], np.int32)
    extra = [] if boundaries is None else [_input("stream_boundaries", np.array([boundaries], np.int32), "INT32")]
    return extra + [_input("input_ids", ids, "INT32"),
            _input("input_lengths", np.array([[ids.shape[1]]], np.int32), "INT32"),
            _input("request_output_len", np.array([[max_new]], np.int32), "INT32"),
            _input("end_id", np.array([[FLAT_EOS1_ID]], np.int32), "INT32"),
            _input("streaming", np.array([[streaming]]), "BOOL"),
            _input("min_length", np.array([[min_new]], np.int32), "INT32"),
            _input("runtime_top_k", np.array([[top_k]], np.int32), "INT32"),
            _input("runtime_top_p", np.array([[0.8]], np.float32), "FP32"),
            _input("temperature", np.array([[1.0]], np.float32), "FP32"),
            _input("random_seed", np.array([[7]], np.uint64), "UINT64")]


def _stream(url: str, inputs: list, timeout_s: float = 60.0) -> tuple[list[np.ndarray], list]:
    """Every response's output_ids until the final flag."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(LLM_MODEL, inputs, enable_empty_final_response=True)
        chunks, errors = [], []
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                errors.append(error)
                return chunks, errors
            response = result.get_response()
            if response.outputs:
                chunks.append(result.as_numpy("output_ids"))
            if response.parameters["triton_final_response"].bool_param:
                return chunks, errors
    finally:
        client.stop_stream()


def _in_process_greedy(model_dir, max_new: int, min_new: int = 0) -> list[int]:
    engine = LLMEngine(load_llm(model_dir, "cpu"), LLMParams(max_seq_len=256), batch_slots=1)
    engine.start()
    try:
        handle = engine.submit(LLMRequest("ref", tuple(INPUT_IDS), max_new, min_new, SamplingParams.greedy(), 7))
        return handle.result(timeout_s=60)
    finally:
        engine.stop()


def test_llm_stream_yields_the_in_process_engine_tokens(stage_servers, tiny_model_dir):
    chunks, errors = _stream(stage_servers.grpc_url("llm"), _inputs(max_new=40))
    assert not errors
    assert all(c.dtype == np.int32 and c.ndim == 3 and c.shape[:2] == (1, 1) for c in chunks)
    streamed = [int(t) - SPEECH_ID_OFFSET for c in chunks for t in c.reshape(-1)]
    assert streamed == _in_process_greedy(tiny_model_dir, 40)
    # Offline (streaming false): one response holding every token.
    offline, errors = _stream(stage_servers.grpc_url("llm"), _inputs(max_new=40, streaming=False))
    assert not errors and len(offline) == 1
    assert [int(t) - SPEECH_ID_OFFSET for t in offline[0].reshape(-1)] == streamed


def test_stream_boundaries_group_responses_and_keep_the_tokens(stage_servers, tiny_model_dir):
    boundaries = [3, 10, 20]
    chunks, errors = _stream(stage_servers.grpc_url("llm"), _inputs(max_new=30, min_new=30, boundaries=boundaries))
    assert not errors
    sizes = [c.size for c in chunks]
    streamed = [int(t) - SPEECH_ID_OFFSET for c in chunks for t in c.reshape(-1)]
    assert streamed == _in_process_greedy(tiny_model_dir, 30, 30)
    # Every response before the last boundary ends at or past a boundary it crossed (none is sent short of one),
    # and the first one carries the first boundary's tokens, not fewer.
    counts = np.cumsum(sizes).tolist()
    assert counts[0] >= boundaries[0]
    previous = 0
    for count in counts:
        if previous < boundaries[-1]:
            assert any(previous < b <= count for b in boundaries), (sizes, boundaries)
        previous = count
    assert len([c for c in counts if c <= boundaries[-1]]) <= len(boundaries)
    # Offline requests ignore boundaries; a bad list answers with an error naming the input.
    offline, errors = _stream(stage_servers.grpc_url("llm"), _inputs(max_new=30, min_new=30, streaming=False,
                                                                     boundaries=boundaries))
    assert not errors and len(offline) == 1 and offline[0].size == 30
    _, errors = _stream(stage_servers.grpc_url("llm"), _inputs(max_new=30, boundaries=[5, 5]))
    assert errors and "stream_boundaries" in str(errors[0])


def test_capacity_is_on_the_metrics_port(stage_servers):
    text = urllib.request.urlopen(stage_servers.metrics_url("llm"), timeout=5).read().decode()
    values = {name: float(v) for name, v in re.findall(r"^(llm_capacity_\w+|llm_kv_cache_bytes)\{[^}]*\} (\S+)$",
                                                         text, re.MULTILINE)}
    assert values["llm_capacity_batch_slots"] == 8          # max_batch_slots: auto on CPU
    assert values["llm_capacity_max_seq_len"] > 0 and values["llm_kv_cache_bytes"] > 0


def test_llm_bad_request_ends_with_an_error(stage_servers):
    inputs = _inputs(max_new=0)
    _, errors = _stream(stage_servers.grpc_url("llm"), inputs)
    assert errors and "max_new_tokens" in str(errors[0])


def _active_requests(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    match = re.search(r"^llm_active_requests\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert match, "llm_active_requests gauge missing from the metrics port"
    return float(match.group(1))


@pytest.mark.parametrize("boundaries", [None, [5, 400]], ids=["per-token", "held-at-a-boundary"])
def test_cancelled_llm_stream_frees_its_slot(stage_servers, boundaries):
    url = stage_servers.grpc_url("llm")
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    # Forced long generation (min = max) so it is still running when cancelled.
    client.async_stream_infer(LLM_MODEL, _inputs(max_new=200, min_new=200, top_k=25, boundaries=boundaries),
                              enable_empty_final_response=True)
    result, error = responses.get(timeout=60)
    assert error is None
    # The gauge is refreshed by the responder's cancellation poll (every 20 ms), so it may trail the first token.
    deadline = time.monotonic() + 5
    while _active_requests(stage_servers.metrics_url("llm")) != 1:
        assert time.monotonic() < deadline, "running request never counted as active"
        time.sleep(0.02)
    client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 20
    while _active_requests(stage_servers.metrics_url("llm")) != 0:
        assert time.monotonic() < deadline, "cancelled request still active"
        time.sleep(0.1)
    # The slot is usable again.
    chunks, errors = _stream(url, _inputs(max_new=5, min_new=5))
    assert not errors and sum(c.size for c in chunks) == 5
