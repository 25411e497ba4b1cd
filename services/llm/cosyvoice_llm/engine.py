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

from .model import Qwen2LM
from .repetition import RepetitionConfig, RepetitionDetector
from .sampling import (
    BatchSamplingParams, SamplingParams, mask_eos, precompute_noise_tables, push_history, sample_batched,
)

_DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MIN_KV_BUCKET = 128    # smallest default attended cache length; then doubling up to max_seq_len


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
        model.setup_caches(slots, config.max_seq_len)
        self._max_seq_len = model.llm.backbone.max_seq_len   # may exceed ours if the model's cache was bigger
        if config.fuse_projections:
            model.llm.backbone.fuse_projections()
        precompute_noise_tables(model.llm_config.speech_head_size, dev)
        i64 = dict(dtype=torch.int64, device=dev)
        # Per-slot decoding state, updated in place by the step (so a captured graph sees the same storage).
        self._tokens = torch.zeros(slots, **i64)          # last sampled id, fed at the next step
        self._positions = torch.zeros(slots, **i64)       # where that id goes in the cache
        self._generated = torch.zeros(slots, **i64)       # ids sampled so far (the noise counter)
        self._min_new = torch.zeros(slots, **i64)
        self._active = torch.zeros(slots, **i64)          # 1 = running; 0 rows compute but do not advance
        self._history = torch.full((slots, config.history_width_tokens), -1, **i64)
        self._sampled = torch.zeros(slots, **i64)         # this step's draws (what the host copies back)
        self._slot_ids = torch.arange(slots, **i64)
        self._params = BatchSamplingParams(
            top_p=torch.ones(slots, dtype=torch.float32, device=dev), top_k=torch.ones(slots, **i64),
            temperature=torch.ones(slots, dtype=torch.float32, device=dev), win_size=torch.ones(slots, **i64),
            min_repeats=torch.ones(slots, **i64), seeds=torch.zeros(slots, **i64))
        self._graphs: dict[int, dict[int, torch.cuda.CUDAGraph]] = {}   # batch bucket -> kv bucket -> graph
        self._step_fn = self._decode_rows
        if config.compile_decode:
            self._step_fn = torch.compile(self._decode_rows, dynamic=True, mode=config.compile_mode)
        # The one device-to-host copy per step lands in pinned memory (CUDA), then the stream is synchronized.
        self._host_sampled = torch.zeros(slots, dtype=torch.int64, pin_memory=dev.type == "cuda")

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[int, _Sequence] = {}          # slot -> sequence
        self._by_id: dict[str, _Sequence] = {}
        self._cancel_ids: set[str] = set()
        self._free_slots = list(range(slots))
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
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._cancel_ids)

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
                with self._lock:
                    running = list(self._running.values())
                for seq in running:
                    self._finish(seq, FinishReason.ERROR, f"decode step failed: {e!r}")

    @torch.inference_mode()
    def step(self) -> None:
        """One engine iteration (also callable directly, without the loop thread, e.g. in tests)."""
        self._apply_cancellations()
        self._admit()
        if self._running:
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
            while self._admit_batch():
                pass
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
        return seq

    def _admit_batch(self) -> bool:
        """Admits waiting requests into free slots, as many as fit `max_prefill_tokens` padded tokens (at least
        one), prefills them in one forward and samples their first tokens. Returns whether any was admitted."""
        budget = self.config.max_prefill_tokens
        with self._lock:
            batch: list[_Sequence] = []
            longest = 0
            while self._waiting and self._free_slots:
                need = max(longest, len(self._waiting[0].request.input_ids))
                if batch and need * (len(batch) + 1) > budget:
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
        writes land beyond each request's length, where decode overwrites them before they become visible)."""
        dev = self.device
        lens = [len(seq.request.input_ids) for seq in batch]
        longest = max(lens)
        # Per-request uploads: once per admission batch, not per token.
        ids_host = torch.full((len(batch), longest), FLAT_SOS_ID, dtype=torch.int64)
        for i, seq in enumerate(batch):
            ids_host[i, :lens[i]] = torch.tensor(seq.request.input_ids, dtype=torch.int64)
        ids = ids_host.to(dev, non_blocking=True)
        slots = torch.tensor([seq.slot for seq in batch], dtype=torch.int64).to(dev, non_blocking=True)
        last = torch.tensor([n - 1 for n in lens], dtype=torch.int64).to(dev, non_blocking=True)
        p = self._params
        sps = [seq.request.sampling for seq in batch]
        f32 = dict(dtype=torch.float32)
        p.top_p[slots] = torch.tensor([sp.top_p for sp in sps], **f32).to(dev, non_blocking=True)
        p.temperature[slots] = torch.tensor([sp.temperature for sp in sps], **f32).to(dev, non_blocking=True)
        ints = torch.tensor([[sp.top_k, sp.win_size, sp.min_repeats, seq.request.seed, seq.request.min_new_tokens,
                              n] for sp, seq, n in zip(sps, batch, lens)], dtype=torch.int64).to(dev, non_blocking=True)
        p.top_k[slots], p.win_size[slots], p.min_repeats[slots] = ints[:, 0], ints[:, 1], ints[:, 2]
        p.seeds[slots], self._min_new[slots] = ints[:, 3], ints[:, 4]
        self._generated[slots] = 0
        self._history[slots] = -1

        model = self.model
        positions = torch.arange(longest, device=dev).expand(len(batch), longest)
        hidden = model.llm.backbone(model.embed_flat(ids), positions, slots, fresh=True)
        logp = model.speech_logp(hidden[torch.arange(len(batch), device=dev), last])
        generated = self._generated[slots]
        logp = mask_eos(logp, generated < self._min_new[slots])
        rows = BatchSamplingParams(top_p=p.top_p[slots], top_k=p.top_k[slots], temperature=p.temperature[slots],
                                   win_size=p.win_size[slots], min_repeats=p.min_repeats[slots], seeds=p.seeds[slots])
        history = self._history[slots]
        tok = sample_batched(logp, history, generated, rows)
        self._tokens[slots] = tok
        self._positions[slots] = ints[:, 5]
        self._history[slots] = push_history(history, tok)
        self._generated[slots] = 1
        self._active[slots] = 1
        return tok.tolist()   # the one device-to-host copy of this prefill

    def _prefill(self, seq: _Sequence) -> int:
        req, s = seq.request, seq.slot
        row = slice(s, s + 1)
        p = self._params
        sp = req.sampling
        # Per-request state upload: once per request, not per token.
        p.top_p[s], p.top_k[s], p.temperature[s] = sp.top_p, sp.top_k, sp.temperature
        p.win_size[s], p.min_repeats[s], p.seeds[s] = sp.win_size, sp.min_repeats, req.seed
        self._min_new[s] = req.min_new_tokens
        self._generated[s] = 0
        self._history[s] = -1
        ids = torch.tensor(req.input_ids, dtype=torch.int64, device=self.device)
        logp = self.model.prefill(ids, self._slot_ids[row])[None]
        logp = mask_eos(logp, self._generated[row] < self._min_new[row])
        tok = sample_batched(logp, self._history[row], self._generated[row], self._row_params(row))
        self._tokens[s] = tok[0]
        self._positions[s] = len(req.input_ids)
        self._history[row] = push_history(self._history[row], tok)
        self._generated[s] = 1
        self._active[s] = 1
        return int(tok[0].item())

    def _row_params(self, rows: slice) -> BatchSamplingParams:
        p = self._params
        return BatchSamplingParams(top_p=p.top_p[rows], top_k=p.top_k[rows], temperature=p.temperature[rows],
                                   win_size=p.win_size[rows], min_repeats=p.min_repeats[rows], seeds=p.seeds[rows])

    def _bucket(self) -> int:
        need = max(self._running) + 1
        return next(b for b in self.config.buckets if b >= need)

    def _kv_bucket(self, running: Sequence[_Sequence]) -> int:
        """Smallest kv bucket covering every running request's next position (rows not running are masked junk)."""
        need = max(seq.next_position for seq in running) + 1
        return next((b for b in self.config.kv_lens if b >= need), self._max_seq_len)

    def _decode_rows(self, n: int, kv_len: int | None = None) -> None:
        """The static decode step over slots [0, n), attending over cache positions [0, kv_len): reads and writes
        only preallocated state."""
        rows = slice(0, n)
        model = self.model
        embeds = model.speech_embedding(self._tokens[rows])[:, None]
        hidden = model.llm.backbone(embeds, self._positions[rows][:, None], rows, kv_len=kv_len)
        logp = model.speech_logp(hidden[:, 0])
        logp = mask_eos(logp, self._generated[rows] < self._min_new[rows])
        tok = sample_batched(logp, self._history[rows], self._generated[rows], self._row_params(rows))
        act = self._active[rows]
        moving = act.bool()
        self._sampled[rows] = tok
        self._tokens[rows] = torch.where(moving, tok, self._tokens[rows])
        self._history[rows] = torch.where(moving[:, None], push_history(self._history[rows], tok),
                                          self._history[rows])
        self._positions[rows] += act
        self._generated[rows] += act

    def _decode(self) -> None:
        n = self._bucket()
        with self._lock:
            running = list(self._running.items())
        kv_len = self._kv_bucket([seq for _, seq in running])
        graph = self._graphs.get(n, {}).get(kv_len)
        if graph is not None:
            graph.replay()
        else:
            self._step_fn(n, kv_len)
        # The one device-to-host copy per step.
        if self.device.type == "cuda":
            self._host_sampled[:n].copy_(self._sampled[:n], non_blocking=True)
            torch.cuda.current_stream().synchronize()
            sampled = self._host_sampled[:n].tolist()
        else:
            sampled = self._sampled[:n].tolist()
        for slot, seq in running:
            if slot < n:
                seq.next_position += 1
                self._accept(seq, sampled[slot])

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
                self._free_slots.append(seq.slot)
            seq.status = RequestStatus.FINISHED
            self._by_id.pop(seq.request.request_id, None)
        seq.callback(LLMOutput(seq.request.request_id, (), finished=True, finish_reason=reason, error=error))

    # --- CUDA graphs --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Records the decode step for every (batch bucket, kv bucket). Free rows are inactive, so warm-up leaves
        state unchanged except the scratch writes into unused cache slots. Call only while no request is running."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        if self._graphs:
            return   # already captured (start() after stop())
        if self._running:
            raise RuntimeError("capture_graphs() must run before requests are admitted")
        shapes = [(n, kv) for n in sorted(self.config.buckets, reverse=True)
                  for kv in sorted(self.config.kv_lens, reverse=True)]
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for n, kv in shapes:
                for _ in range(2 if self.config.compile_decode else 1):
                    self._step_fn(n, kv)   # warm-up: lazy kernels/workspaces (and compilation) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        for n, kv in shapes:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):   # other threads may run CUDA
                self._step_fn(n, kv)
            self._graphs.setdefault(n, {})[kv] = graph
        torch.cuda.synchronize()
