"""`LLMEngine`: in-flight batched speech-token decoding over Qwen2LM's static KV cache.

A fixed number of cache slots; requests wait in a FIFO queue. Each engine step (1) applies cancellations, (2)
prefills newly admitted requests into free slots - all of them in one right-padded forward under a token budget
(`batched_prefill`), or one at a time - and samples their first token, (3) runs one batched decode step over the slot
prefix [0, bucket) that holds every running request, attending over cache positions [0, kv bucket) only, the
smallest `kv_buckets` length that covers every running request's position. Slots are handed out lowest-first so
that prefix stays short. Rows of the prefix that are free still compute (static shapes), but their `active` flag is
0 so their positions and counters do not move, and whatever they write lands in their own, unused cache slot.

All per-slot decoding state (last token, position, generated count, repetition window, sampling parameters) lives in
preallocated device tensors updated inside the step; the host copies back only the sampled ids once per step. On
CUDA the step can be captured as one CUDA graph per (batch bucket, kv bucket) (`EngineConfig.use_cuda_graphs`),
optionally after `torch.compile` of the step (`compile_decode`, gpt-fast style: fused norms, RoPE and sampling).

Randomness: `sampling.sample_batched` (counter-based, per-request seed), so a request's tokens do not depend on the
batch it shares. It is not torch.multinomial's stream; use `Qwen2LM.inference` for reference-identical draws.
"""
from __future__ import annotations

import enum
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from cosyvoice_common.constants import FLAT_SOS_ID, SPEECH_STOP_IDS
from cosyvoice_common.errors import InvalidRequestError

from .capacity import Capacity
from .model import Qwen2LM
from .repetition import RepetitionConfig, RepetitionDetector
from .sampling import (
    BatchSamplingParams, SamplingParams, mask_eos, precompute_noise_tables, push_history, sample_batched, seed_keys,
)

_DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MIN_KV_BUCKET = 128    # smallest default attended cache length; then doubling up to max_seq_len
_DEFAULT_PREFILL_ROWS = (1, 2, 4, 8)
# Default prefill length buckets: every 32 tokens up to 256, then every 64 up to 512 (capped at max_seq_len).
_PREFILL_LEN_FINE_STEP, _PREFILL_LEN_FINE_END = 32, 256
_PREFILL_LEN_COARSE_STEP, _PREFILL_LEN_COARSE_END = 64, 512


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_batch_slots: int = 8
    max_seq_len: int = 2048            # prompt + generated tokens per slot (positions)
    history_width_tokens: int = 32     # largest repetition window (win_size) a request may ask for
    use_cuda_graphs: bool = False      # capture the decode step per batch bucket (CUDA only)
    batch_buckets: tuple[int, ...] = ()  # decode batch sizes; empty = powers of two up to max_batch_slots
    idle_wait_s: float = 0.05          # loop thread wake-up period when idle (also bounds stop() latency)
    repetition: RepetitionConfig = RepetitionConfig()   # loop detection (repetition.py); enabled=False = off
    kv_buckets: tuple[int, ...] = ()   # attended cache lengths; empty = 128, 256, ... and max_seq_len
    fuse_projections: bool = True      # one q/k/v and one gate/up matrix product per layer (same weights, views)
    batched_prefill: bool = True       # admit all waiting requests (that fit) in one padded prefill forward
    max_prefill_tokens: int = 8192     # padded tokens (requests x longest prompt) per prefill forward; >= 1 request
    compile_decode: bool = False       # torch.compile the decode step (CUDA graphs are then captured around it)
    compile_mode: str = "default"      # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    prefill_batch_buckets: tuple[int, ...] = _DEFAULT_PREFILL_ROWS   # rows per prefill group (the largest = cap)
    prefill_len_buckets: tuple[int, ...] = ()   # padded prompt lengths; empty = 32, 64, ... 256, 320, ... 512
    pad_prefill_to_buckets: bool = False   # eager prefill padded to the buckets as the graphs are (tests on CPU)
    prefill_graphs: bool = True        # with use_cuda_graphs: capture prefill per (rows bucket, length bucket)
    prefill_groups_per_step: int = 1   # prefill forwards per engine step (0 = all that wait): running streams
                                       # wait at most this many prefills between two of their tokens
    overlap_host: bool = False         # launch step N+1 before step N's host bookkeeping (same tokens)
    sampling_top_k_cap: int = 64       # sample among the 64 likeliest ids (one top-k, no full sort; same draws)
                                       # while every running request's top_k fits; 0 = always the full sort

    def __post_init__(self) -> None:
        if self.max_batch_slots <= 0:
            raise ValueError(f"max_batch_slots must be positive, got {self.max_batch_slots}")
        if self.max_seq_len <= 1:
            raise ValueError(f"max_seq_len must be > 1, got {self.max_seq_len}")
        if self.history_width_tokens <= 0:
            raise ValueError(f"history_width_tokens must be positive, got {self.history_width_tokens}")
        if any(b <= 0 or b > self.max_batch_slots for b in self.batch_buckets):
            raise ValueError(f"batch_buckets {self.batch_buckets} must lie in [1, {self.max_batch_slots}]")
        if self.idle_wait_s <= 0:
            raise ValueError(f"idle_wait_s must be positive, got {self.idle_wait_s}")
        if any(b <= 0 or b > self.max_seq_len for b in self.kv_buckets):
            raise ValueError(f"kv_buckets {self.kv_buckets} must lie in [1, max_seq_len={self.max_seq_len}]")
        if self.max_prefill_tokens <= 0:
            raise ValueError(f"max_prefill_tokens must be positive, got {self.max_prefill_tokens}")
        if not self.prefill_batch_buckets or any(b <= 0 for b in self.prefill_batch_buckets):
            raise ValueError(f"prefill_batch_buckets {self.prefill_batch_buckets} must be positive (and not empty)")
        if any(b <= 0 or b > self.max_seq_len for b in self.prefill_len_buckets):
            raise ValueError(f"prefill_len_buckets {self.prefill_len_buckets} must lie in "
                             f"[1, max_seq_len={self.max_seq_len}]")
        if self.sampling_top_k_cap < 0:
            raise ValueError(f"sampling_top_k_cap must be >= 0, got {self.sampling_top_k_cap}")
        if self.prefill_groups_per_step < 0:
            raise ValueError(f"prefill_groups_per_step must be >= 0, got {self.prefill_groups_per_step}")
        if self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile_mode {self.compile_mode!r} records its own CUDA graphs; the engine captures "
                             f"them itself: use 'default' or 'max-autotune-no-cudagraphs'")

    @property
    def buckets(self) -> tuple[int, ...]:
        base = self.batch_buckets or tuple(b for b in _DEFAULT_BUCKETS if b < self.max_batch_slots)
        return tuple(sorted(set(base) | {self.max_batch_slots}))

    @property
    def kv_lens(self) -> tuple[int, ...]:
        base = self.kv_buckets
        if not base:
            base = tuple(_MIN_KV_BUCKET << i for i in range(32) if _MIN_KV_BUCKET << i < self.max_seq_len)
        return tuple(sorted(set(base) | {self.max_seq_len}))


    @property
    def prefill_rows(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.prefill_batch_buckets)))

    @property
    def prefill_lens(self) -> tuple[int, ...]:
        base = self.prefill_len_buckets
        if not base:
            base = (tuple(range(_PREFILL_LEN_FINE_STEP, _PREFILL_LEN_FINE_END + 1, _PREFILL_LEN_FINE_STEP))
                    + tuple(range(_PREFILL_LEN_FINE_END + _PREFILL_LEN_COARSE_STEP, _PREFILL_LEN_COARSE_END + 1,
                                  _PREFILL_LEN_COARSE_STEP)))
            base = tuple(b for b in base if b < self.max_seq_len) + (min(self.max_seq_len, base[-1]),)
        return tuple(sorted(set(base)))


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"            # a stop id was sampled (not emitted)
    LENGTH = "length"        # max_new_tokens emitted
    CANCELLED = "cancelled"
    REPETITION = "repetition"  # the tokens fell into a loop (repetition.py), after min_new_tokens
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class LLMRequest:
    """One generation: `input_ids` are flat ids (see model.build_prompt_flat_ids); outputs are speech-head ids."""

    request_id: str
    input_ids: tuple[int, ...]
    max_new_tokens: int
    min_new_tokens: int = 0
    sampling: SamplingParams = SamplingParams()
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.input_ids) == 0:
            raise InvalidRequestError(f"request {self.request_id}: input_ids is empty")
        if self.max_new_tokens <= 0:
            raise InvalidRequestError(f"request {self.request_id}: max_new_tokens must be > 0, "
                                      f"got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise InvalidRequestError(f"request {self.request_id}: min_new_tokens must be >= 0, "
                                      f"got {self.min_new_tokens}")
        if not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"request {self.request_id}: seed must be in [0, 2^63), got {self.seed}")


@dataclass(frozen=True, slots=True)
class LLMOutput:
    request_id: str
    tokens: tuple[int, ...]               # speech codes new in this response
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None


OutputCallback = Callable[[LLMOutput], None]


def coalesce_outputs(outputs: Sequence[LLMOutput]) -> list[LLMOutput]:
    """One output per request from several taken in queue order: tokens concatenated, the last one's finish
    state kept. A responder that fell behind the engine answers with one response per request, not one per
    token, so its per-response cost (an IPC round trip into Triton) stops growing with the batch."""
    merged: dict[str, tuple[list[int], LLMOutput]] = {}
    for out in outputs:
        entry = merged.get(out.request_id)
        if entry is None:
            merged[out.request_id] = (list(out.tokens), out)
        else:
            entry[0].extend(out.tokens)
            merged[out.request_id] = (entry[0], out)
    return [out if len(tokens) == len(out.tokens) else
            LLMOutput(out.request_id, tuple(tokens), out.finished, out.finish_reason, out.error)
            for tokens, out in merged.values()]


@dataclass(slots=True)
class _Sequence:
    request: LLMRequest
    callback: OutputCallback
    status: RequestStatus = RequestStatus.WAITING
    slot: int = -1
    num_generated: int = 0
    next_position: int = 0      # cache position of the token fed at the next decode step (host mirror)
    tokens: list[int] = field(default_factory=list)
    repetition: RepetitionDetector | None = None


@dataclass(slots=True)
class _Launched:
    """A decode step on the device whose sampled ids the host has not read yet."""
    n: int                                   # batch bucket (slots [0, n))
    rows: list[tuple[int, _Sequence]]        # the running sequences it advanced, by slot
    host: torch.Tensor                       # where its sampled ids land (pinned on CUDA)
    event: "torch.cuda.Event | None"         # recorded after the copy (CUDA)


# Columns of the per-row prefill parameter tensors.
_PF_TOP_K, _PF_WIN, _PF_MIN_REP, _PF_SEED, _PF_MIN_NEW, _PF_LEN, _PF_SLOT = range(7)
_PF_INT_COLS = 7
_PF_TOP_P, _PF_TEMP = range(2)
_PF_FLOAT_COLS = 2


class RequestHandle:
    """Iterates the speech codes of one request as they arrive; `result()` waits for all of them."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.queue: queue.SimpleQueue[LLMOutput] = queue.SimpleQueue()
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None

    def outputs(self, timeout_s: float | None = None) -> Iterator[LLMOutput]:
        while True:
            out = self.queue.get(timeout=timeout_s)
            yield out
            if out.finished:
                self.finish_reason, self.error = out.finish_reason, out.error
                return

    def __iter__(self) -> Iterator[int]:
        for out in self.outputs():
            yield from out.tokens

    def result(self, timeout_s: float | None = None) -> list[int]:
        return [t for out in self.outputs(timeout_s) for t in out.tokens]


class LLMEngine:
    def __init__(self, model: Qwen2LM, config: EngineConfig = EngineConfig()) -> None:
        self.model = model.eval()
        self.config = config
        dev = model.llm_decoder.weight.device
        self.device = dev
        slots = config.max_batch_slots
        # One cache row and state row past the slots: the scratch slot that padded prefill rows write into.
        self._scratch_slot = slots
        model.setup_caches(slots + 1, config.max_seq_len)
        self._max_seq_len = model.llm.backbone.max_seq_len   # may exceed ours if the model's cache was bigger
        if config.fuse_projections:
            model.llm.backbone.fuse_projections()
        precompute_noise_tables(model.llm_config.speech_head_size, dev)
        i64 = dict(dtype=torch.int64, device=dev)
        rows = slots + 1
        # Per-slot decoding state, updated in place by the step (so a captured graph sees the same storage).
        self._tokens = torch.zeros(rows, **i64)           # last sampled id, fed at the next step
        self._positions = torch.zeros(rows, **i64)        # where that id goes in the cache
        self._generated = torch.zeros(rows, **i64)        # ids sampled so far (the noise counter)
        self._min_new = torch.zeros(rows, **i64)
        self._active = torch.zeros(rows, **i64)           # 1 = running; 0 rows compute but do not advance
        self._history = torch.full((rows, config.history_width_tokens), -1, **i64)
        self._sampled = torch.zeros(rows, **i64)          # this step's draws (what the host copies back)
        self._slot_ids = torch.arange(rows, **i64)
        self._params = BatchSamplingParams(
            top_p=torch.ones(rows, dtype=torch.float32, device=dev), top_k=torch.ones(rows, **i64),
            temperature=torch.ones(rows, dtype=torch.float32, device=dev), win_size=torch.ones(rows, **i64),
            min_repeats=torch.ones(rows, **i64), seeds=torch.zeros(rows, **i64),
            seed_keys=seed_keys(torch.zeros(rows, **i64)))
        self._graphs: dict[int, dict[int, torch.cuda.CUDAGraph]] = {}   # batch bucket -> kv bucket -> graph
        self._step_fn = self._decode_rows
        if config.compile_decode:
            self._step_fn = torch.compile(self._decode_rows, dynamic=True, mode=config.compile_mode)
        cuda = dev.type == "cuda"
        # The one device-to-host copy per step lands in pinned memory (CUDA); two buffers, so a step launched
        # ahead (overlap_host) never overwrites the copy the host is still reading.
        self._host_sampled = [torch.zeros(rows, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self._host_events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._host_flip = 0
        self._inflight: _Launched | None = None
        # Static prefill inputs (graph path): ids [rows x len] flat, so every (rows, len) view is contiguous;
        # per-row ints (top_k, win_size, min_repeats, seed, min_new, length, slot) and floats (top_p, temperature).
        max_rows, max_len = max(config.prefill_rows), max(config.prefill_lens)
        self._pf_ids = torch.zeros(max_rows * max_len, **i64)
        self._pf_ints = torch.zeros(max_rows, _PF_INT_COLS, **i64)
        self._pf_floats = torch.ones(max_rows, _PF_FLOAT_COLS, dtype=torch.float32, device=dev)
        self._pf_tokens = torch.zeros(max_rows, **i64)
        # Their host staging twins (pinned on CUDA): one upload per tensor per admission group.
        self._pf_host = (torch.zeros(max_rows * max_len, dtype=torch.int64, pin_memory=cuda),
                         torch.zeros(max_rows, _PF_INT_COLS, dtype=torch.int64, pin_memory=cuda),
                         torch.ones(max_rows, _PF_FLOAT_COLS, dtype=torch.float32, pin_memory=cuda))
        self._arange = torch.arange(max(self._max_seq_len, max_rows), **i64)
        self._prefill_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}   # (rows, len) -> graph

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[int, _Sequence] = {}          # slot -> sequence
        self._by_id: dict[str, _Sequence] = {}
        self._cancel_ids: set[str] = set()
        self._free_slots = list(range(slots))
        self._wide_top_k = 0   # running requests whose top_k exceeds sampling_top_k_cap (they need the full sort)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- public API ---------------------------------------------------------------------------------------------

    def submit(self, request: LLMRequest, callback: OutputCallback | None = None) -> RequestHandle:
        """Queues a request; outputs go to `callback` (called on the engine thread) and to the returned handle."""
        cfg = self.config
        if len(request.input_ids) + request.max_new_tokens > cfg.max_seq_len:
            raise InvalidRequestError(
                f"request {request.request_id}: {len(request.input_ids)} input ids + {request.max_new_tokens} new "
                f"tokens exceed max_seq_len {cfg.max_seq_len}")
        if request.sampling.win_size > cfg.history_width_tokens:
            raise InvalidRequestError(f"request {request.request_id}: win_size {request.sampling.win_size} exceeds "
                                      f"the engine's history_width_tokens {cfg.history_width_tokens}")
        self.model.validate_flat_ids(request.input_ids)
        handle = RequestHandle(request.request_id)

        def deliver(out: LLMOutput) -> None:
            handle.queue.put(out)
            if callback is not None:
                callback(out)

        with self._wake:
            if request.request_id in self._by_id:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in flight")
            seq = _Sequence(request, deliver, repetition=cfg.repetition.detector())
            self._by_id[request.request_id] = seq
            self._waiting.append(seq)
            self._wake.notify()
        return handle

    def cancel(self, request_id: str) -> None:
        """Frees the request's slot at the next step; its stream ends with FinishReason.CANCELLED."""
        with self._wake:
            if request_id in self._by_id:
                self._cancel_ids.add(request_id)
                self._wake.notify()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def capacity(self) -> Capacity:
        """Slots, positions per slot and the KV cache's bytes (all cache rows, the scratch one included)."""
        cache = self.model.llm.backbone.layers[0].self_attn.kv_cache
        layers = len(self.model.llm.backbone.layers)
        kv_bytes = 2 * layers * cache.k_cache.numel() * cache.k_cache.element_size()
        return Capacity(self.config.max_batch_slots, self.config.max_seq_len, kv_bytes)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._cancel_ids or self._inflight is not None)

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.config.use_cuda_graphs and self.device.type == "cuda":
            self.capture_graphs()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the loop; requests still in flight end with an error output."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._inflight = None   # a step launched ahead: its ids are never read
        with self._lock:
            pending = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
        for seq in pending:
            self._finish(seq, FinishReason.ERROR, "engine stopped")

    # --- the loop -----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.has_work():
                    self._wake.wait(self.config.idle_wait_s)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a failed batched step fails the requests in it, not the engine
                self._inflight = None
                with self._lock:
                    running = list(self._running.values())
                for seq in running:
                    self._finish(seq, FinishReason.ERROR, f"decode step failed: {e!r}")

    @torch.inference_mode()
    def step(self) -> None:
        """One engine iteration (also callable directly, without the loop thread, e.g. in tests)."""
        self._apply_cancellations()
        self._admit()
        self._decode()

    def _apply_cancellations(self) -> None:
        with self._lock:
            ids, self._cancel_ids = self._cancel_ids, set()
            cancelled = [self._by_id[i] for i in ids if i in self._by_id]
            for seq in cancelled:
                if seq.status is RequestStatus.WAITING:
                    self._waiting.remove(seq)
        for seq in cancelled:
            self._finish(seq, FinishReason.CANCELLED)

    def _admit(self) -> None:
        if self.config.batched_prefill:
            groups = self.config.prefill_groups_per_step
            done = 0
            while (groups == 0 or done < groups) and self._admit_batch():
                done += 1
            return
        while True:
            with self._lock:
                if not self._waiting or not self._free_slots:
                    return
                seq = self._take_waiting()
            try:
                first = self._prefill(seq)
            except Exception as e:
                self._finish(seq, FinishReason.ERROR, f"prefill failed: {e!r}")
                continue
            seq.next_position = len(seq.request.input_ids)
            self._accept(seq, first)

    def _take_waiting(self) -> _Sequence:
        """Pops the next waiting request into the lowest free slot (caller holds the lock)."""
        seq = self._waiting.popleft()
        seq.slot = min(self._free_slots)   # lowest first keeps the decoded slot prefix short
        self._free_slots.remove(seq.slot)
        seq.status = RequestStatus.RUNNING
        self._running[seq.slot] = seq
        self._wide_top_k += self._needs_full_sort(seq)
        return seq

    def _needs_full_sort(self, seq: _Sequence) -> bool:
        cap = self.config.sampling_top_k_cap
        return cap == 0 or seq.request.sampling.top_k > cap

    @property
    def _pad_prefill(self) -> bool:
        return self.config.pad_prefill_to_buckets or bool(self._prefill_graphs)

    def _prefill_shape(self, rows: int, length: int) -> tuple[int, int]:
        """The (rows, length) a prefill of `rows` prompts of at most `length` ids runs as: the buckets when padding
        (a length beyond the last bucket runs unpadded, eagerly), else exactly."""
        if not self._pad_prefill:
            return rows, length
        cfg = self.config
        return (next(b for b in cfg.prefill_rows if b >= rows),
                next((b for b in cfg.prefill_lens if b >= length), length))

    def _admit_batch(self) -> bool:
        """Admits waiting requests into free slots, as many as fit `max_prefill_tokens` padded tokens (at least
        one) and the largest prefill rows bucket, prefills them in one forward and samples their first tokens.
        Returns whether any was admitted."""
        budget = self.config.max_prefill_tokens
        max_rows = self.config.prefill_rows[-1]
        with self._lock:
            batch: list[_Sequence] = []
            longest = 0
            while self._waiting and self._free_slots and len(batch) < max_rows:
                need = max(longest, len(self._waiting[0].request.input_ids))
                rows, length = self._prefill_shape(len(batch) + 1, need)
                if batch and rows * length > budget:
                    break
                longest = need
                batch.append(self._take_waiting())
        if not batch:
            return False
        try:
            first = self._prefill_batch(batch)
        except Exception as e:
            for seq in batch:
                self._finish(seq, FinishReason.ERROR, f"prefill failed: {e!r}")
            return True
        for seq, tok in zip(batch, first):
            seq.next_position = len(seq.request.input_ids)
            self._accept(seq, tok)
        return True

    def _prefill_batch(self, batch: Sequence[_Sequence]) -> list[int]:
        """One right-padded prefill forward over `batch` (positions 0..T-1, causal over the new keys only; padding
        writes land beyond each request's length, where decode overwrites them before they become visible). Runs
        as a captured graph when one exists for its (rows, length) bucket, else eagerly: the same function."""
        dev = self.device
        lens = [len(seq.request.input_ids) for seq in batch]
        rows, length = self._prefill_shape(len(batch), max(lens))
        # Host staging, once per admission group (not per token): ids right-padded with sos; padding rows are
        # one-id prompts in the scratch slot.
        full_sort = any(self._needs_full_sort(seq) for seq in batch)
        graph = None if full_sort else self._prefill_graphs.get((rows, length))
        if graph is not None:   # the static staging buffers (the graph's shapes always fit them)
            ids_host = self._pf_host[0][:rows * length].view(rows, length)
            ints_host, floats_host = self._pf_host[1][:rows], self._pf_host[2][:rows]
        else:
            ids_host = torch.empty((rows, length), dtype=torch.int64)
            ints_host = torch.empty(rows, _PF_INT_COLS, dtype=torch.int64)
            floats_host = torch.empty(rows, _PF_FLOAT_COLS, dtype=torch.float32)
        ids_host.fill_(FLAT_SOS_ID)
        floats_host.fill_(1.0)
        ints_host.fill_(1)
        ints_host[:, _PF_SEED] = 0
        ints_host[:, _PF_MIN_NEW] = 0
        ints_host[:, _PF_SLOT] = self._scratch_slot
        for i, seq in enumerate(batch):
            req, sp = seq.request, seq.request.sampling
            ids_host[i, :lens[i]] = torch.tensor(req.input_ids, dtype=torch.int64)
            ints_host[i] = torch.tensor([sp.top_k, sp.win_size, sp.min_repeats, req.seed, req.min_new_tokens,
                                         lens[i], seq.slot], dtype=torch.int64)
            floats_host[i, _PF_TOP_P], floats_host[i, _PF_TEMP] = sp.top_p, sp.temperature
        if graph is not None:
            ids, ints, floats = self._prefill_inputs(rows, length)
            ids.copy_(ids_host, non_blocking=True)
            ints.copy_(ints_host, non_blocking=True)
            floats.copy_(floats_host, non_blocking=True)
            graph.replay()
            tok = self._pf_tokens[:len(batch)]
        else:
            tok = self._prefill_rows(ids_host.to(dev, non_blocking=True), ints_host.to(dev, non_blocking=True),
                                     floats_host.to(dev, non_blocking=True), full_sort)[:len(batch)]
        return tok.tolist()   # the one device-to-host copy of this prefill

    def _prefill_inputs(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Contiguous views of the static prefill inputs for one (rows, length) shape."""
        return (self._pf_ids[:rows * length].view(rows, length), self._pf_ints[:rows], self._pf_floats[:rows])

    def _top_k_cap(self, full_sort: bool) -> int | None:
        return None if full_sort or self.config.sampling_top_k_cap == 0 else self.config.sampling_top_k_cap

    def _prefill_rows(self, ids: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor,
                      full_sort: bool = False) -> torch.Tensor:
        """The static-shape prefill: ids [R, L] (right-padded), per-row ints/floats (the _PF_* columns) -> writes
        the rows' caches and decoding state, samples their first ids into `_pf_tokens[:R]` and returns that view.
        Device work only (no sync, no allocation visible outside), so it can be captured."""
        n_rows, length = ids.shape
        model, p = self.model, self._params
        slots = ints[:, _PF_SLOT]
        lens = ints[:, _PF_LEN]
        row_params = BatchSamplingParams(top_p=floats[:, _PF_TOP_P], top_k=ints[:, _PF_TOP_K],
                                         temperature=floats[:, _PF_TEMP], win_size=ints[:, _PF_WIN],
                                         min_repeats=ints[:, _PF_MIN_REP], seeds=ints[:, _PF_SEED],
                                         seed_keys=seed_keys(ints[:, _PF_SEED]))
        p.top_p[slots], p.temperature[slots] = row_params.top_p, row_params.temperature
        p.top_k[slots], p.win_size[slots], p.min_repeats[slots] = (row_params.top_k, row_params.win_size,
                                                                   row_params.min_repeats)
        p.seeds[slots], p.seed_keys[slots] = row_params.seeds, row_params.seed_keys
        self._min_new[slots] = ints[:, _PF_MIN_NEW]
        positions = self._arange[:length].expand(n_rows, length)
        hidden = model.llm.backbone(model.embed_flat(ids), positions, slots, fresh=True)
        logp = model.speech_logp(hidden[self._arange[:n_rows], lens - 1])
        generated = torch.zeros_like(lens)
        logp = mask_eos(logp, generated < ints[:, _PF_MIN_NEW])
        history = torch.full((n_rows, self.config.history_width_tokens), -1, dtype=torch.int64, device=ids.device)
        tok = sample_batched(logp, history, generated, row_params, self._top_k_cap(full_sort))
        self._tokens[slots] = tok
        self._positions[slots] = lens
        self._history[slots] = push_history(history, tok)
        self._generated[slots] = generated + 1
        self._active[slots] = torch.ones_like(lens)
        out = self._pf_tokens[:n_rows]
        out.copy_(tok)
        return out

    def _prefill(self, seq: _Sequence) -> int:
        req, s = seq.request, seq.slot
        row = slice(s, s + 1)
        p = self._params
        sp = req.sampling
        # Per-request state upload: once per request, not per token.
        p.top_p[s], p.top_k[s], p.temperature[s] = sp.top_p, sp.top_k, sp.temperature
        p.win_size[s], p.min_repeats[s], p.seeds[s] = sp.win_size, sp.min_repeats, req.seed
        p.seed_keys[row] = seed_keys(p.seeds[row])
        self._min_new[s] = req.min_new_tokens
        self._generated[s] = 0
        self._history[s] = -1
        ids = torch.tensor(req.input_ids, dtype=torch.int64, device=self.device)
        logp = self.model.prefill(ids, self._slot_ids[row])[None]
        logp = mask_eos(logp, self._generated[row] < self._min_new[row])
        tok = sample_batched(logp, self._history[row], self._generated[row], self._row_params(row),
                             self._top_k_cap(self._needs_full_sort(seq)))
        self._tokens[s] = tok[0]
        self._positions[s] = len(req.input_ids)
        self._history[row] = push_history(self._history[row], tok)
        self._generated[s] = 1
        self._active[s] = 1
        return int(tok[0].item())

    def _row_params(self, rows: slice) -> BatchSamplingParams:
        p = self._params
        return BatchSamplingParams(top_p=p.top_p[rows], top_k=p.top_k[rows], temperature=p.temperature[rows],
                                   win_size=p.win_size[rows], min_repeats=p.min_repeats[rows], seeds=p.seeds[rows],
                                   seed_keys=p.seed_keys[rows])

    def _bucket(self) -> int:
        need = max(self._running) + 1
        return next(b for b in self.config.buckets if b >= need)

    def _kv_bucket(self, running: Sequence[_Sequence], ahead: int = 0) -> int:
        """Smallest kv bucket covering every running request's next position (rows not running are masked junk);
        `ahead`: steps launched whose ids the host has not read yet (their positions are not in the mirror)."""
        need = max(seq.next_position for seq in running) + 1 + ahead
        return next((b for b in self.config.kv_lens if b >= need), self._max_seq_len)

    def _decode_rows(self, n: int, kv_len: int | None = None, full_sort: bool = False) -> None:
        """The static decode step over slots [0, n), attending over cache positions [0, kv_len): reads and writes
        only preallocated state. `full_sort`: a running request's top_k exceeds sampling_top_k_cap."""
        rows = slice(0, n)
        model = self.model
        embeds = model.speech_embedding(self._tokens[rows])[:, None]
        hidden = model.llm.backbone(embeds, self._positions[rows][:, None], rows, kv_len=kv_len)
        logp = model.speech_logp(hidden[:, 0])
        logp = mask_eos(logp, self._generated[rows] < self._min_new[rows])
        tok = sample_batched(logp, self._history[rows], self._generated[rows], self._row_params(rows),
                             self._top_k_cap(full_sort))
        act = self._active[rows]
        moving = act.bool()
        self._sampled[rows] = tok
        self._tokens[rows] = torch.where(moving, tok, self._tokens[rows])
        self._history[rows] = torch.where(moving[:, None], push_history(self._history[rows], tok),
                                          self._history[rows])
        self._positions[rows] += act
        self._generated[rows] += act

    def _decode(self) -> None:
        """Runs one decode step and hands its ids to the running requests. With `overlap_host` the next step is
        launched before this one's ids are read: the device already holds its inputs (the sampled ids), so the
        host bookkeeping below runs while it computes. It is launched only when no cancel or admission is due
        (those happen at the next step boundary, as without overlap). A row that finishes in the step being read
        still advances once more in the launched one: that extra step only touches its own, then free, slot (a
        prefill resets every piece of slot state before the slot is read again) and its id is never read."""
        cur = self._inflight
        self._inflight = None
        if cur is None:
            if not self._running:
                return
            cur = self._launch(ahead=0)
        if (self.config.overlap_host and self._running and not self._cancel_ids
                and not (self._waiting and self._free_slots)):
            self._inflight = self._launch(ahead=1)
        if cur.event is not None:
            cur.event.synchronize()
        sampled = cur.host[:cur.n].tolist()
        for slot, seq in cur.rows:
            if seq.status is not RequestStatus.RUNNING:
                continue   # finished or cancelled after this step was launched
            seq.next_position += 1
            self._accept(seq, sampled[slot])

    def _launch(self, ahead: int) -> _Launched:
        """Enqueues one decode step over the running slots and the copy of its ids to a host buffer."""
        n = self._bucket()
        with self._lock:
            running = list(self._running.items())
        kv_len = self._kv_bucket([seq for _, seq in running], ahead)
        if self._wide_top_k:
            self._decode_rows(n, kv_len, full_sort=True)   # eager: the graphs sample with the top-k cap
        else:
            graph = self._graphs.get(n, {}).get(kv_len)
            if graph is not None:
                graph.replay()
            else:
                self._step_fn(n, kv_len)
        flip = self._host_flip
        self._host_flip ^= 1
        host, event = self._host_sampled[flip], self._host_events[flip]
        # The one device-to-host copy per step (pinned and asynchronous on CUDA; waited for by the reader).
        host[:n].copy_(self._sampled[:n], non_blocking=event is not None)
        if event is not None:
            event.record()
        return _Launched(n, [(slot, seq) for slot, seq in running if slot < n], host, event)

    def _accept(self, seq: _Sequence, tok: int) -> None:
        """Host bookkeeping for one sampled id: stop, emit, or emit and hit the length limit."""
        if tok in SPEECH_STOP_IDS:
            self._finish(seq, FinishReason.STOP)
            return
        seq.num_generated += 1
        seq.tokens.append(tok)
        if seq.num_generated >= seq.request.max_new_tokens:
            seq.callback(LLMOutput(seq.request.request_id, (tok,)))
            self._finish(seq, FinishReason.LENGTH)
        elif (seq.repetition is not None and seq.repetition.push(tok)
              and seq.num_generated >= seq.request.min_new_tokens):
            seq.callback(LLMOutput(seq.request.request_id, (tok,)))
            self._finish(seq, FinishReason.REPETITION)
        else:
            seq.callback(LLMOutput(seq.request.request_id, (tok,)))

    def _finish(self, seq: _Sequence, reason: FinishReason, error: str | None = None) -> None:
        with self._lock:
            if seq.status is RequestStatus.FINISHED:
                return
            if seq.status is RequestStatus.RUNNING:
                self._active[seq.slot] = 0
                del self._running[seq.slot]
                self._wide_top_k -= self._needs_full_sort(seq)
                self._free_slots.append(seq.slot)
            seq.status = RequestStatus.FINISHED
            self._by_id.pop(seq.request.request_id, None)
        seq.callback(LLMOutput(seq.request.request_id, (), finished=True, finish_reason=reason, error=error))

    # --- CUDA graphs --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Records the decode step for every (batch bucket, kv bucket), and (`prefill_graphs`) the prefill for
        every (rows bucket, length bucket). Free rows are inactive, and prefill warm-up/capture rows all point at
        the scratch slot, so capture leaves the slots' state unchanged. Call only while no request is running."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        if self._graphs:
            return   # already captured (start() after stop())
        if self._running:
            raise RuntimeError("capture_graphs() must run before requests are admitted")
        cfg = self.config
        shapes = [(n, kv) for n in sorted(cfg.buckets, reverse=True) for kv in sorted(cfg.kv_lens, reverse=True)]
        prefill_shapes = [(r, ln) for r in sorted(cfg.prefill_rows, reverse=True)
                          for ln in sorted(cfg.prefill_lens, reverse=True)] if cfg.prefill_graphs else []
        self._pf_ids.fill_(FLAT_SOS_ID)
        self._pf_ints.fill_(1)
        self._pf_ints[:, _PF_SEED] = 0
        self._pf_ints[:, _PF_MIN_NEW] = 0
        self._pf_ints[:, _PF_SLOT] = self._scratch_slot
        self._pf_floats.fill_(1.0)
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for n, kv in shapes:
                for _ in range(2 if cfg.compile_decode else 1):
                    self._step_fn(n, kv)   # warm-up: lazy kernels/workspaces (and compilation) outside the capture
            for r, ln in prefill_shapes:
                self._prefill_rows(*self._prefill_inputs(r, ln))
        torch.cuda.current_stream().wait_stream(side)
        for n, kv in shapes:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):   # other threads may run CUDA
                self._step_fn(n, kv)
            self._graphs.setdefault(n, {})[kv] = graph
        for r, ln in prefill_shapes:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self._prefill_rows(*self._prefill_inputs(r, ln))
            self._prefill_graphs[(r, ln)] = graph
        torch.cuda.synchronize()
