"""The speaker stage's one request parser (Triton model and in-process line)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cosyvoice_common.contracts import SpeakerIn
from cosyvoice_common.errors import InvalidRequestError
from cosyvoice_common.inputs import trimmed_wav


@dataclass(frozen=True, slots=True)
class SpeakerRequest:
    wav_16k: np.ndarray              # for the x-vector
    wav_24k: np.ndarray | None       # for the prompt mel (absent: an empty mel)


def parse_speaker_request(tensors: Mapping[str, np.ndarray]) -> SpeakerRequest:
    """InvalidRequestError names what is wrong."""
    wav = trimmed_wav(tensors, SpeakerIn.REFERENCE_WAV, SpeakerIn.REFERENCE_WAV_LEN)
    if wav is None:
        raise InvalidRequestError(f"{SpeakerIn.REFERENCE_WAV} is required")
    return SpeakerRequest(wav, trimmed_wav(tensors, SpeakerIn.REFERENCE_WAV_24K, SpeakerIn.REFERENCE_WAV_24K_LEN))
