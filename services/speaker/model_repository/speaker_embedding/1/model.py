"""Triton model `speaker_embedding`: 16 kHz prompt -> 192-d x-vector; 24 kHz prompt -> prompt mel frames.

Thin adapter over cosyvoice_speaker: the whole request list of one execute() call goes through ONE
SpeakerEncoder.embed() call (the encoder decides how to run it; CAM++ pools over time, so it never pads).
The 24 kHz input is optional: without it `prompt_speech_feat` is [1, 0, 80]. A bad request answers only itself.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from cosyvoice_common.constants import MEL_BINS
from cosyvoice_common.contracts import SPEAKER_INPUTS, SpeakerOut
from cosyvoice_common.runtime import install_stack_dumps
from cosyvoice_common.stage_params import SpeakerParams
from cosyvoice_common.triton_io import batch_or_each, error_response, get_parameter, to_triton, unbatched_inputs
from cosyvoice_speaker import SpeakerEncoder
from cosyvoice_speaker.features import prompt_mel
from cosyvoice_speaker.request import parse_speaker_request

INPUT_NAMES = tuple(spec.name for spec in SPEAKER_INPUTS)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        install_stack_dumps()
        model_config = json.loads(args["model_config"])
        self.settings = SpeakerParams.from_model_config(model_config)
        self.device = get_parameter(model_config, "device")
        model_dir = get_parameter(model_config, "model_dir")
        self.encoder = SpeakerEncoder(model_dir, self.settings.backend, self.device)

    def execute(self, requests):
        responses: list = [None] * len(requests)
        prompts: dict[int, np.ndarray] = {}
        mels: dict[int, np.ndarray] = {}
        for i, request in enumerate(requests):
            try:
                parsed = parse_speaker_request(unbatched_inputs(request, INPUT_NAMES))
                prompts[i] = parsed.wav_16k
                mels[i] = (np.zeros((0, MEL_BINS), np.float32) if parsed.wav_24k is None else prompt_mel(
                    torch.from_numpy(parsed.wav_24k.copy()).to(self.device)).float().cpu().numpy())
            except Exception as exc:  # noqa: BLE001 - a bad request answers only itself
                responses[i] = error_response(exc)
                prompts.pop(i, None)
        # One call for the list; if it fails, each prompt alone, so one bad prompt fails only its request.
        for i, embedding in batch_or_each(self._embed, prompts).items():
            responses[i] = error_response(embedding) if isinstance(embedding, Exception) else \
                pb_utils.InferenceResponse([
                    to_triton(SpeakerOut.PROMPT_SPK_EMBEDDING, np.asarray(embedding, np.float32).reshape(1, -1)),
                    to_triton(SpeakerOut.PROMPT_SPEECH_FEAT, mels[i][None].astype(np.float32))])
        return responses

    def _embed(self, prompts: list[np.ndarray]) -> np.ndarray:
        return np.asarray(self.encoder.embed(prompts))   # one row per prompt
