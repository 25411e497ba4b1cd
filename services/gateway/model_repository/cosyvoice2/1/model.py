"""Triton model `cosyvoice2`: the seed's front tensors over cosyvoice_gateway.seed.SeedFront.

Thin: parse config, start the front, convert tensors. execute() only reads each request's tensors and
schedules it on the front's asyncio loop, then returns None; audio goes out through the request's
response sender (decoupled: one response per chunk then an empty COMPLETE_FINAL; offline: one response
with COMPLETE_FINAL). Every path ends in COMPLETE_FINAL: done, failed (error response) or cancelled.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from cosyvoice_common.contracts import SEED_INPUTS, SEED_TEXT_INPUTS, SeedOut
from cosyvoice_common.runtime import install_stack_dumps
from cosyvoice_common.triton_io import from_triton, send_outputs
from cosyvoice_gateway.seed import (
    SeedFront,
    SeedFrontConfig,
    SeedRequestError,
    parse_seed_inputs,
)

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def read_input(name: str, tensor) -> np.ndarray:
    """One request input as numpy. Numeric tensors go through cosyvoice_common.triton_io (DLPack where torch
    is installed, the numpy path in the torch-free gateway image)."""
    if name in SEED_TEXT_INPUTS:
        # BYTES (TYPE_STRING) have no DLPack form, so triton_io cannot carry them: as_numpy() is the only
        # way, and it is exact only because the stub runs with numpy<2 (`make up`:
        # cosyvoice_launcher.seed_repo.ensure_stub_python; the gateway image pins numpy<2). Object array of bytes.
        return tensor.as_numpy()
    return from_triton(tensor)


class TritonResponder:
    """One request's response sender; guarantees a single COMPLETE_FINAL."""

    def __init__(self, request, sender) -> None:
        self.request = request
        self.sender = sender
        self.requested_outputs = frozenset(request.requested_output_names())
        self.lock = threading.Lock()
        self.closed = False

    def _send(self, final: bool, audio: np.ndarray | None = None, error: str | None = None) -> None:
        with self.lock:
            if self.closed:
                return
            if final:
                self.closed = True
            flags = _FINAL if final else 0
            if audio is not None:
                send_outputs(self.sender, {SeedOut.WAVEFORM: audio}, self.requested_outputs, flags)
            elif error is not None:
                self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)), flags=flags)
            else:
                self.sender.send(flags=flags)

    def send_audio(self, wav_24k: np.ndarray, final: bool) -> None:
        # [1, n]: the model batches (max_batch_size > 0), so outputs carry the batch dim like the seed's.
        self._send(final, audio=np.asarray(wav_24k, dtype=np.float32).reshape(1, -1))

    def finish(self) -> None:
        self._send(final=True)

    def fail(self, message: str) -> None:
        self._send(final=True, error=message)

    def is_cancelled(self) -> bool:
        # Under the send lock: after the final response Triton releases the request's response factory,
        # and is_cancelled() on a released factory crashes tritonserver (ResponseFactoryIsCancelled).
        with self.lock:
            return False if self.closed else self.request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        install_stack_dumps()
        model_config = json.loads(args["model_config"])
        self.streaming = pb_utils.using_decoupled_model_transaction_policy(model_config)
        params = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
        self.front = SeedFront(SeedFrontConfig.from_parameters(params)).start()

    def execute(self, requests):
        for request in requests:
            responder = TritonResponder(request, request.get_response_sender())
            try:
                tensors = {}
                for name in SEED_INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        tensors[name] = read_input(name, tensor)
                inputs = parse_seed_inputs(tensors)
            except (SeedRequestError, ValueError) as exc:
                responder.fail(f"INVALID_ARGUMENT: {exc}")
                continue
            self.front.submit(inputs, request.request_id(), responder, self.streaming)
        return None

    def finalize(self) -> None:
        self.front.stop()
