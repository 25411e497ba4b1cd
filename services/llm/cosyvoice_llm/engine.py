"""`LLMEngine`: in-flight batched speech-token decoding over Qwen2LM's static KV cache - the loop.

Requests join and leave at every step. One step (`step()`): apply cancellations, admit at most one prefill group
(`scheduler.Scheduler`) and sample its first ids (`model_runner.ModelRunner`), then one batched decode step over
every running request. The next decode step is launched before this one's ids are read, whenever no cancel or
admission is due: the device already holds its inputs (the sampled ids), so the host's bookkeeping runs while it
computes. A row that finishes in the step being read advances once more in the launched one; that step touches
only its own, then free, slot (a prefill resets all of a slot's state before the slot is read again) and its id
is never read.

    engine = build_engine(model_dir, "cuda", LLMParams())      # or LLMEngine(model, settings, batch_slots=8)
    engine.start()
    handle = engine.submit(LLMRequest("r1", input_ids, max_new_tokens=500))
    codes = handle.result()
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from cosyvoice_common.errors import InvalidRequestError
from cosyvoice_common.stage_params import LLMParams

from .capacity import Capacity, plan_batch_slots
from .model import Qwen2LM, load_llm
from .model_runner import HISTORY_WIDTH_TOKENS, DecodeLaunch, ModelRunner, prefill_lengths
from .repetition import RepetitionConfig
from .scheduler import Scheduler
from .sequence import FinishReason, LLMOutput, LLMRequest, OutputCallback, RequestHandle, RequestStatus, Sequence
from .slots import SlotTable

IDLE_WAIT_S = 0.05            # the loop's wake-up period when idle (also bounds stop() latency)
CPU_AUTO_BATCH_SLOTS = 8      # `max_batch_slots: auto` on CPU (no memory to measure; tests, parity)


class LLMEngine:
    def __init__(self, model: Qwen2LM, settings: LLMParams, batch_slots: int) -> None:
        if batch_slots <= 0:
            raise ValueError(f"batch_slots must be positive, got {batch_slots}")
        self.settings = settings
        self.runner = ModelRunner(model, settings, batch_slots)
        self.slots = SlotTable(batch_slots, self.runner.deactivate)
        self.scheduler = Scheduler(self.slots, self.runner.prefill_shape, self.runner.prefill_rows[-1],
                                   settings.max_prefill_tokens)
        self._repetition = RepetitionConfig.parse(settings.repetition)
        self._inflight: DecodeLaunch | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- public API ---------------------------------------------------------------------------------------------
    def submit(self, request: LLMRequest, callback: OutputCallback | None = None) -> RequestHandle:
        """Queues a request; outputs go to `callback` (called on the engine thread) and to the returned handle."""
        max_seq_len = self.settings.max_seq_len
        if len(request.input_ids) + request.max_new_tokens > max_seq_len:
            raise InvalidRequestError(
                f"request {request.request_id}: {len(request.input_ids)} input ids + {request.max_new_tokens} new "
                f"tokens exceed max_seq_len {max_seq_len}")
        if request.sampling.win_size > HISTORY_WIDTH_TOKENS:
            raise InvalidRequestError(f"request {request.request_id}: win_size {request.sampling.win_size} exceeds "
                                      f"the engine's history of {HISTORY_WIDTH_TOKENS} tokens")
        self.runner.model.validate_flat_ids(request.input_ids)
        handle = RequestHandle(request.request_id)

        def deliver(out: LLMOutput) -> None:
            handle.queue.put(out)
            if callback is not None:
                callback(out)

        self.scheduler.add(Sequence(request, deliver, self.runner.needs_full_sort(request.sampling.top_k),
                                    self._repetition.detector()))
        return handle

    def cancel(self, request_id: str) -> None:
        """Frees the request's slot at the next step; its stream ends with FinishReason.CANCELLED."""
        self.scheduler.cancel(request_id)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return len(self.slots.running)

    @property
    def num_free_slots(self) -> int:
        return self.slots.num_free

    @property
    def capacity(self) -> Capacity:
        return self.runner.capacity

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.runner.use_graphs:
            if self.slots.running:
                raise RuntimeError("CUDA graphs must be captured before requests are admitted")
            self.runner.capture_graphs()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the loop; requests still in flight end with an error output."""
        with self.scheduler.wake:
            self._stopping = True
            self.scheduler.wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._inflight = None   # a step launched ahead: its ids are never read
        for seq in self.scheduler.drain():
            self.scheduler.finish(seq, FinishReason.ERROR, "engine stopped")

    # --- the loop -----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.scheduler.wake:
                while not self._stopping and not self.has_work():
                    self.scheduler.wake.wait(IDLE_WAIT_S)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a failed batched step fails the requests in it, not the engine
                self._inflight = None
                for seq in self.scheduler.running():
                    self.scheduler.finish(seq, FinishReason.ERROR, f"decode step failed: {e!r}")

    @torch.inference_mode()
    def step(self) -> None:
        """One engine iteration (also callable directly, without the loop thread, e.g. in tests)."""
        self.scheduler.apply_cancellations()
        self._admit()
        self._decode()

    def _admit(self) -> None:
        group = self.scheduler.schedule_prefill()
        if not group:
            return
        try:
            first = self.runner.prefill(group)
        except Exception as e:
            for seq in group:
                self.scheduler.finish(seq, FinishReason.ERROR, f"prefill failed: {e!r}")
            return
        for seq, token in zip(group, first):
            seq.next_position = len(seq.request.input_ids)
            self.scheduler.postprocess(seq, token)

    def _decode(self) -> None:
        """Reads one decode step's ids (launching it first unless it was launched ahead) and hands them to the
        running requests; launches the next step before reading when nothing is due (module doc)."""
        current, self._inflight = self._inflight, None
        if current is None:
            running = self.scheduler.running()
            if not running:
                return
            current = self._launch(running, ahead=0)
        scheduler = self.scheduler
        if self.slots.running and not scheduler.cancel_due and not scheduler.admission_due:
            self._inflight = self._launch(scheduler.running(), ahead=1)
        sampled = self.runner.read(current)
        for seq in current.sequences:
            if seq.status is not RequestStatus.RUNNING:
                continue   # finished or cancelled after this step was launched
            seq.next_position += 1
            scheduler.postprocess(seq, sampled[seq.slot])

    def _launch(self, running: list[Sequence], ahead: int) -> DecodeLaunch:
        return self.runner.launch_decode(running, ahead, full_sort=self.slots.num_full_sort > 0)


def build_engine(model_dir: str | Path, device: str, settings: LLMParams) -> LLMEngine:
    """The engine the llm stage runs: loads the model in the settings' dtype and sizes the slots (`auto`: from the
    GPU memory after a warm-up forward of the largest prefill shape; CPU_AUTO_BATCH_SLOTS on CPU)."""
    model = load_llm(model_dir, device, getattr(torch, settings.torch_dtype_name(device)))
    slots = settings.batch_slots
    if slots is None and not device.startswith("cuda"):
        slots = CPU_AUTO_BATCH_SLOTS
    elif slots is None:
        slots = plan_batch_slots(model, settings.max_seq_len, settings.kv_cache_memory_fraction,
                                 settings.max_auto_batch_slots, max(settings.prefill_batch_buckets),
                                 prefill_lengths(settings.max_seq_len, settings.prefill_len_buckets)[-1])
    return LLMEngine(model, settings, slots)
