"""The tokenizer stage's one request parser (Triton model and in-process line): a trimmed 16 kHz prompt."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cosyvoice_common.contracts import TokenizerIn
from cosyvoice_common.errors import InvalidRequestError
from cosyvoice_common.inputs import trimmed_wav


def parse_prompt(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The 16 kHz prompt to tokenize; InvalidRequestError names what is wrong."""
    wav = trimmed_wav(tensors, TokenizerIn.REFERENCE_WAV, TokenizerIn.REFERENCE_WAV_LEN)
    if wav is None:
        raise InvalidRequestError(f"{TokenizerIn.REFERENCE_WAV} is required")
    return wav
