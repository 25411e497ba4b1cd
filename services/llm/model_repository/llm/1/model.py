"""Triton model `llm` (decoupled): the TensorRT-LLM backend's tensor contract over cosyvoice_llm.LLMEngine.

execute() only validates and enqueues into the in-flight batching engine, then returns. The engine calls
back on its own thread; a responder thread turns those outputs into responses (when streaming: one per batch
of new tokens, or grouped at the request's optional `stream_boundaries`; one with every token otherwise).
Every path ends in COMPLETE_FINAL: finished, failed, cancelled (the responder thread also polls is_cancelled()
and calls engine.cancel, which frees the slot). Output ids are flat (speech code + SPEECH_ID_OFFSET), as the
TensorRT-LLM export produces them.
"""
from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from cosyvoice_common.constants import SPEECH_ID_OFFSET
from cosyvoice_common.contracts import LLM_STREAM_BOUNDARIES
from cosyvoice_common.runtime import install_stack_dumps
from cosyvoice_common.settings import parse_flag
from cosyvoice_common.triton_io import error_response, from_triton, get_dtype, get_parameter, send_outputs
from cosyvoice_llm.capacity import plan_batch_slots
from cosyvoice_llm.delivery import TokenGrouper
from cosyvoice_llm.engine import EngineConfig, FinishReason, LLMEngine, LLMOutput, LLMRequest, coalesce_outputs
from cosyvoice_llm.model import load_llm
from cosyvoice_llm.repetition import RepetitionConfig
from cosyvoice_llm.sampling import SamplingParams

CANCEL_POLL_S = 0.02          # how soon a client's cancel frees its slot
MAX_COALESCED_OUTPUTS = 4096  # engine outputs merged into one round of responses at most
AUTO = "auto"
CPU_AUTO_BATCH_SLOTS = 8      # `max_batch_slots: auto` on CPU (no memory to measure; tests, parity)
BOUNDARIES_INPUT = LLM_STREAM_BOUNDARIES.name


@dataclass(frozen=True, slots=True)
class LLMStageConfig:
    """config.pbtxt parameters (filled from cosyvoice_common.stage_params.LLMParams: LLM_* variables)."""
    model_dir: Path
    device: str
    dtype: torch.dtype
    max_batch_slots: int | None       # None = auto: sized from GPU memory after warm-up (CUDA), 8 on CPU
    max_seq_len: int
    kv_cache_memory_fraction: float   # auto: share of the GPU's total memory the KV cache may take
    max_auto_batch_slots: int         # auto: at most this many slots
    cuda_graphs: bool
    prefill_graphs: bool
    overlap_host: bool
    compile_decode: bool
    repetition: RepetitionConfig

    def __post_init__(self) -> None:
        if self.max_batch_slots is not None and self.max_batch_slots <= 0:
            raise ValueError(f"max_batch_slots must be positive or auto, got {self.max_batch_slots}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.max_auto_batch_slots <= 0:
            raise ValueError(f"max_auto_batch_slots must be positive, got {self.max_auto_batch_slots}")

    @classmethod
    def from_model_config(cls, model_config: dict) -> "LLMStageConfig":
        device = get_parameter(model_config, "device")
        on_cuda = device.startswith("cuda")
        # auto: bf16 where the hardware has it, fp32 on CPU (tests, parity)
        dtype = get_dtype(model_config, "dtype", auto="bfloat16" if on_cuda else "float32")
        slots = get_parameter(model_config, "max_batch_slots")

        def flag(name: str) -> bool:
            return get_parameter(model_config, name, lambda text: parse_flag(text, name))

        graphs = on_cuda and flag("cuda_graphs")
        return cls(Path(get_parameter(model_config, "model_dir")), device, dtype,
                   None if slots == AUTO else int(slots),
                   get_parameter(model_config, "max_seq_len", int),
                   get_parameter(model_config, "kv_cache_memory_fraction", float),
                   get_parameter(model_config, "max_auto_batch_slots", int),
                   cuda_graphs=graphs, prefill_graphs=graphs and flag("prefill_graphs"),
                   overlap_host=flag("overlap_host"), compile_decode=flag("compile_decode"),
                   repetition=RepetitionConfig.parse(get_parameter(model_config, "repetition")))

    def engine_config(self, batch_slots: int) -> EngineConfig:
        return EngineConfig(max_batch_slots=batch_slots, max_seq_len=self.max_seq_len,
                            use_cuda_graphs=self.cuda_graphs, prefill_graphs=self.prefill_graphs,
                            overlap_host=self.overlap_host, compile_decode=self.compile_decode,
                            repetition=self.repetition)


def build_engine(config: LLMStageConfig) -> LLMEngine:
    """Loads the model, sizes the slots (auto: from the GPU memory after a warm-up forward) and builds the engine."""
    model = load_llm(config.model_dir, config.device, config.dtype)
    slots = config.max_batch_slots
    if slots is None and not config.device.startswith("cuda"):
        slots = CPU_AUTO_BATCH_SLOTS
    elif slots is None:
        probe = EngineConfig(max_seq_len=config.max_seq_len)
        slots = plan_batch_slots(model, config.max_seq_len, config.kv_cache_memory_fraction,
                                 config.max_auto_batch_slots, max(probe.prefill_rows), max(probe.prefill_lens))
    return LLMEngine(model, config.engine_config(slots))


def _scalar(request, name: str, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = from_triton(tensor).reshape(-1)
    if values.size != 1:
        raise ValueError(f"{name} must hold one value, got {values.size}")
    return values[0].item()


def parse_request(request, request_id: str) -> tuple[LLMRequest, bool, TokenGrouper | None]:
    """TensorRT-LLM tensors (+ our optional `stream_boundaries`) -> (LLMRequest, streaming, the streaming
    response grouper or None = one response per batch of new tokens). Raises ValueError naming the field."""
    ids = from_triton(pb_utils.get_input_tensor_by_name(request, "input_ids"))
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, L] (one sequence per request), got {list(ids.shape)}")
    length = int(_scalar(request, "input_lengths"))
    if not 0 < length <= ids.shape[1]:
        raise ValueError(f"input_lengths={length} outside [1, {ids.shape[1]}]")
    top_k = int(_scalar(request, "runtime_top_k", 0))
    top_p = float(_scalar(request, "runtime_top_p", 0.0))
    temperature = float(_scalar(request, "temperature", 1.0))
    defaults = SamplingParams()
    # TensorRT-LLM semantics: top_k 0 / top_p 0 mean "not set"; then the model's RAS defaults apply.
    sampling = SamplingParams(top_p=top_p if top_p > 0 else defaults.top_p,
                              top_k=top_k if top_k > 0 else defaults.top_k,
                              win_size=defaults.win_size, tau_r=defaults.tau_r,
                              temperature=temperature if temperature > 0 else 1.0)
    if top_k == 1:   # greedy, as TensorRT-LLM: no repetition fallback either
        sampling = SamplingParams.greedy()
    llm_request = LLMRequest(
        request_id=request_id,
        input_ids=tuple(int(t) for t in ids[0, :length]),
        max_new_tokens=int(_scalar(request, "request_output_len")),
        min_new_tokens=int(_scalar(request, "min_length", 0)),
        sampling=sampling,
        seed=int(_scalar(request, "random_seed", 0)))
    streaming = bool(_scalar(request, "streaming", False))
    grouper = None
    boundaries = pb_utils.get_input_tensor_by_name(request, BOUNDARIES_INPUT)
    if streaming and boundaries is not None:
        grouper = TokenGrouper(from_triton(boundaries).reshape(-1).tolist())
    return llm_request, streaming, grouper


def send_tokens(data: "RequestData", tokens: list[int], flags: int = 0) -> None:
    flat = np.asarray(tokens, dtype=np.int32).reshape(1, 1, -1) + np.int32(SPEECH_ID_OFFSET)   # [batch, beam, n]
    # Only the outputs the client asked for (the gateway asks for output_ids alone): see send_outputs.
    send_outputs(data.sender, {"output_ids": flat, "sequence_length": np.array([[flat.shape[-1]]], np.int32)},
                 data.requested_outputs, flags)


@dataclass(slots=True)
class RequestData:
    """Per-request state, alive from enqueue to the final response; then dropped from the registry."""
    request: object            # pb_utils.InferenceRequest (kept for is_cancelled())
    sender: object
    streaming: bool
    requested_outputs: frozenset[str]
    tokens: list[int]
    grouper: TokenGrouper | None = None   # streaming with stream_boundaries: holds tokens to the next boundary
    cancel_sent: bool = False


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        install_stack_dumps()
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise ValueError("model `llm` must be decoupled (model_transaction_policy { decoupled: true })")
        self.config = LLMStageConfig.from_model_config(model_config)
        self.engine = build_engine(self.config)
        started = time.monotonic()
        self.engine.start()   # captures the CUDA graphs (decode and prefill)
        capacity = self.engine.capacity
        pb_utils.Logger.log_info(f"llm: {capacity.describe()}; engine started in {time.monotonic() - started:.1f} s "
                                 f"({self.engine.config})")
        labels = {"model": args["model_name"], "version": args["model_version"]}
        # Capacity, for the gateway and dashboards (set once, here, before any request).
        self.capacity_families = []
        for name, description, value in (
                ("llm_capacity_batch_slots", "LLM requests decoding at once (engine slots)", capacity.batch_slots),
                ("llm_capacity_max_seq_len", "LLM prompt + generated tokens per request", capacity.max_seq_len),
                ("llm_kv_cache_bytes", "LLM static KV cache size", capacity.kv_cache_bytes)):
            family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.GAUGE)
            metric = family.Metric(labels=labels)
            metric.set(value)
            self.capacity_families.append((family, metric))
        self.active_family = pb_utils.MetricFamily(
            name="llm_active_requests", description="LLM requests enqueued or decoding (not yet final)",
            kind=pb_utils.MetricFamily.GAUGE)
        self.tokens_family = pb_utils.MetricFamily(
            name="llm_generated_tokens", description="Speech tokens generated by the LLM stage",
            kind=pb_utils.MetricFamily.COUNTER)
        self.repetition_family = pb_utils.MetricFamily(
            name="llm_repetition_stops", description="LLM requests ended because their tokens fell into a loop",
            kind=pb_utils.MetricFamily.COUNTER)
        self.repetition_metric = self.repetition_family.Metric(labels=labels)
        self.active_metric = self.active_family.Metric(labels=labels)
        self.tokens_metric = self.tokens_family.Metric(labels=labels)
        self.lock = threading.Lock()
        self.requests: dict[str, RequestData] = {}
        self.outputs: queue.SimpleQueue[LLMOutput | None] = queue.SimpleQueue()
        self.ids = itertools.count()
        self.reported_active = 0
        self.responder = threading.Thread(target=self.responder_loop, name="llm-responder", daemon=True)
        self.responder.start()

    # --- enqueue ----------------------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            request_id = f"{request.request_id() or 'llm'}#{next(self.ids)}"   # unique even if clients reuse ids
            try:
                llm_request, streaming, grouper = parse_request(request, request_id)
                with self.lock:
                    self.requests[request_id] = RequestData(request, sender, streaming,
                                                              frozenset(request.requested_output_names()), [],
                                                              grouper)
                self.engine.submit(llm_request, self.outputs.put)
            except Exception as exc:  # noqa: BLE001 - a bad request answers only itself
                with self.lock:
                    self.requests.pop(request_id, None)
                sender.send(error_response(exc), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    # --- respond: one thread makes every call into Triton after execute() (responses, cancellation polls,
    # metrics), so the stub never sees two of our threads in its IPC at once, and the engine loop never
    # waits on IPC. ---------------------------------------------------------------------------------------
    def responder_loop(self) -> None:
        next_poll = time.monotonic() + CANCEL_POLL_S
        pending: list[LLMOutput] = []
        while True:
            try:
                pending.append(self.outputs.get(timeout=CANCEL_POLL_S))
            except queue.Empty:
                pass
            # Whatever else the engine queued meanwhile goes out with it: one response per request.
            while pending and pending[-1] is not None and len(pending) < MAX_COALESCED_OUTPUTS:
                try:
                    pending.append(self.outputs.get_nowait())
                except queue.Empty:
                    break
            stop = bool(pending) and pending[-1] is None
            for out in coalesce_outputs([o for o in pending if o is not None]):
                self.deliver(out)
            pending.clear()
            if stop:
                return
            if time.monotonic() >= next_poll:
                self.poll_cancellations()
                next_poll = time.monotonic() + CANCEL_POLL_S

    def deliver(self, out: LLMOutput) -> None:
        with self.lock:
            # A finishing request leaves the registry *before* its final response is sent: the final response
            # releases Triton's response factory, and is_cancelled() must never run on a released factory
            # (tritonserver segfaults in ResponseFactoryIsCancelled).
            data = self.requests.pop(out.request_id, None) if out.finished else self.requests.get(out.request_id)
        if data is None:
            return
        try:
            self.respond(data, out)
        except Exception as exc:  # noqa: BLE001 - the client may be gone; never kill the loop
            pb_utils.Logger.log_warn(f"llm: response for {out.request_id} failed: {exc}")
            if not out.finished:
                self.engine.cancel(out.request_id)

    def respond(self, data: RequestData, out: LLMOutput) -> None:
        if out.tokens:
            self.tokens_metric.increment(len(out.tokens))
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not out.finished:
            if data.streaming:
                tokens = list(out.tokens) if data.grouper is None else data.grouper.push(out.tokens)
                if tokens:
                    send_tokens(data, tokens)
            else:
                data.tokens.extend(out.tokens)
            return
        if out.finish_reason is FinishReason.REPETITION:
            self.repetition_metric.increment(1)
            pb_utils.Logger.log_warn(f"llm: {out.request_id} ended by repetition detection")
        if out.finish_reason is FinishReason.ERROR:
            data.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(out.error or "llm failed")),
                             flags=final)
        elif out.finish_reason is FinishReason.CANCELLED:
            data.sender.send(flags=final)
        elif data.streaming:
            tokens = list(out.tokens)
            if data.grouper is not None:
                tokens = data.grouper.push(tokens) + data.grouper.flush()
            if tokens:
                send_tokens(data, tokens, final)
            else:
                data.sender.send(flags=final)
        else:
            data.tokens.extend(out.tokens)
            send_tokens(data, data.tokens, final)

    # --- cancellation (polled from the responder thread) --------------------------------------------------
    def poll_cancellations(self) -> None:
        with self.lock:
            pending = [(request_id, data) for request_id, data in self.requests.items() if not data.cancel_sent]
            active = len(self.requests)
        if active != self.reported_active:   # the gauge follows within one poll interval, one IPC per change
            self.active_metric.set(active)
            self.reported_active = active
        for request_id, data in pending:
            # Only this thread finalises requests, so none of these can be released while it is polled.
            try:
                cancelled = data.request.is_cancelled()
            except Exception as exc:  # noqa: BLE001 - a request torn down under us counts as cancelled
                pb_utils.Logger.log_warn(f"llm: is_cancelled() failed for {request_id}: {exc}")
                cancelled = True
            if cancelled:
                data.cancel_sent = True
                self.engine.cancel(request_id)

    def finalize(self) -> None:
        self.engine.stop()        # in-flight requests end with an error output -> final responses
        self.outputs.put(None)
        self.responder.join()
        self.active_metric = self.tokens_metric = self.repetition_metric = None
        self.capacity_families = []
        self.active_family = self.tokens_family = self.repetition_family = None
