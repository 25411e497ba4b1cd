"""Triton model `audio_tokenizer`: 16 kHz prompts -> flat speech ids (code + SPEECH_ID_OFFSET).

Thin adapter over cosyvoice_tokenizer.SpeechTokenizer: the whole request list of one execute() call
(dynamic batching, ragged lengths) goes through ONE tokenize() call. A request whose input is bad gets
its own error; the rest of the batch proceeds.
"""
from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from cosyvoice_common.constants import SPEECH_ID_OFFSET
from cosyvoice_common.contracts import TOKENIZER_INPUTS, TokenizerOut
from cosyvoice_common.runtime import install_stack_dumps
from cosyvoice_common.stage_params import TokenizerParams
from cosyvoice_common.triton_io import batch_or_each, error_response, get_parameter, to_triton, unbatched_inputs
from cosyvoice_tokenizer import SpeechTokenizer
from cosyvoice_tokenizer.request import parse_prompt

INPUT_NAMES = tuple(spec.name for spec in TOKENIZER_INPUTS)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        install_stack_dumps()
        model_config = json.loads(args["model_config"])
        self.settings = TokenizerParams.from_model_config(model_config)
        self.device = get_parameter(model_config, "device")
        model_dir = get_parameter(model_config, "model_dir")
        self.tokenizer = SpeechTokenizer(model_dir, self.settings.backend, self.device)

    def execute(self, requests):
        responses: list = [None] * len(requests)
        prompts: dict[int, np.ndarray] = {}
        for i, request in enumerate(requests):
            try:
                prompts[i] = parse_prompt(unbatched_inputs(request, INPUT_NAMES))
            except Exception as exc:  # noqa: BLE001 - a bad request answers only itself
                responses[i] = error_response(exc)
        # One batched call; if it fails, each prompt alone, so one bad prompt fails only its request.
        for i, codes in batch_or_each(self.tokenizer.tokenize, prompts).items():
            responses[i] = error_response(codes) if isinstance(codes, Exception) else \
                pb_utils.InferenceResponse([to_triton(TokenizerOut.PROMPT_SPEECH_TOKENS, (codes.astype(np.int32) + SPEECH_ID_OFFSET)[None])])
        return responses
