"""The tokenizer stage's one request parser (Triton model and in-process line): a trimmed 16 kHz prompt."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cosyvoice_common.contracts import TOKENIZER_INPUTS
from cosyvoice_common.errors import InvalidRequestError
from cosyvoice_common.inputs import trimmed_wav

WAV, WAV_LEN = (spec.name for spec in TOKENIZER_INPUTS)


def parse_prompt(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The 16 kHz prompt to tokenize; InvalidRequestError names what is wrong."""
    wav = trimmed_wav(tensors, WAV, WAV_LEN)
    if wav is None:
        raise InvalidRequestError(f"{WAV} is required")
    return wav
