"""The llm stage's one request parser: the TensorRT-LLM backend's tensors (plus our optional `stream_boundaries`)
in, a typed `StageRequest` out, or `InvalidRequestError` naming the input. Pure (numpy arrays in, no Triton): the
Triton model (model_repository/llm/1/model.py) and the in-process line (cosyvoice_tools.local) both call it.

Tensors come in the contract's shapes (`cosyvoice_common.contracts.LLM_INPUTS`: no batch dimension), values as
TensorRT-LLM reads them: `runtime_top_k` / `runtime_top_p` 0 mean "not set" (the model's RAS defaults apply),
`runtime_top_k` 1 is greedy (no repetition fallback either), `temperature` <= 0 means 1.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cosyvoice_common.contracts import LLM_STREAM_BOUNDARIES
from cosyvoice_common.errors import InvalidRequestError
from cosyvoice_common.inputs import one_value

from .delivery import validate_boundaries
from .sampling import SamplingParams
from .sequence import LLMRequest


@dataclass(frozen=True, slots=True)
class StageRequest:
    request: LLMRequest
    streaming: bool
    stream_boundaries: tuple[int, ...] | None   # streaming with boundaries: hold tokens to each (delivery.py)


def _sampling(tensors: Mapping[str, np.ndarray]) -> SamplingParams:
    top_k = int(one_value(tensors, "runtime_top_k", 0))
    top_p = float(one_value(tensors, "runtime_top_p", 0.0))
    temperature = float(one_value(tensors, "temperature", 1.0))
    if top_k == 1:
        return SamplingParams.greedy()
    defaults = SamplingParams()
    try:
        return SamplingParams(top_p=top_p if top_p > 0 else defaults.top_p,
                              top_k=top_k if top_k > 0 else defaults.top_k,
                              win_size=defaults.win_size, tau_r=defaults.tau_r,
                              temperature=temperature if temperature > 0 else 1.0)
    except ValueError as exc:
        raise InvalidRequestError(f"runtime_top_k/runtime_top_p: {exc}") from None


def parse_request(tensors: Mapping[str, np.ndarray], request_id: str) -> StageRequest:
    """One llm request from its input tensors (contract shapes, no batch dimension)."""
    if tensors.get("input_ids") is None:
        raise InvalidRequestError("input_ids is required")
    ids = np.asarray(tensors["input_ids"])
    if ids.ndim != 1:
        raise InvalidRequestError(f"input_ids must be one sequence [L], got shape {list(ids.shape)}")
    length = int(one_value(tensors, "input_lengths"))
    if not 0 < length <= ids.shape[0]:
        raise InvalidRequestError(f"input_lengths={length} outside [1, {ids.shape[0]}]")
    request = LLMRequest(
        request_id=request_id,
        input_ids=tuple(ids[:length].tolist()),
        max_new_tokens=int(one_value(tensors, "request_output_len")),
        min_new_tokens=int(one_value(tensors, "min_length", 0)),
        sampling=_sampling(tensors),
        seed=int(one_value(tensors, "random_seed", 0)))
    streaming = bool(one_value(tensors, "streaming", False))
    boundaries = tensors.get(LLM_STREAM_BOUNDARIES.name)
    if not streaming or boundaries is None:
        return StageRequest(request, streaming, None)
    return StageRequest(request, streaming, validate_boundaries(np.asarray(boundaries).reshape(-1).tolist()))
