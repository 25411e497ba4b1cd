"""Reading request tensors (pure numpy, no Triton): what the stages' request parsers share.

A stage's parser (`cosyvoice_<stage>.request`) takes its inputs as named arrays without Triton's batch dimension
(`triton_io.named_inputs` in a Triton model, the gateway's tensors in the in-process line) and refuses a bad one
with InvalidRequestError, which the gateway maps to INVALID_ARGUMENT.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cosyvoice_common.errors import InvalidRequestError


_REQUIRED = object()


def one_value(tensors: Mapping[str, np.ndarray], name: str, default: object = _REQUIRED):
    """The one value of a scalar input (any shape of one element) as a Python number; `default` when absent
    (without a default the input is required)."""
    value = tensors.get(name)
    if value is None:
        if default is _REQUIRED:
            raise InvalidRequestError(f"{name} is required")
        return default
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise InvalidRequestError(f"{name} must hold one value, got {flat.size}")
    return flat[0].item()


def trimmed_wav(tensors: Mapping[str, np.ndarray], wav_name: str, len_name: str) -> np.ndarray | None:
    """A mono prompt cut to its length input (the client may zero-pad); None when `wav_name` is absent. Without
    the length input the whole array is the prompt."""
    wav = tensors.get(wav_name)
    if wav is None:
        return None
    samples = np.asarray(wav, np.float32).reshape(-1)
    n = int(one_value(tensors, len_name, samples.shape[0]))
    if not 0 < n <= samples.shape[0]:
        raise InvalidRequestError(f"{len_name}={n} outside [1, {samples.shape[0]}]")
    return samples[:n]
