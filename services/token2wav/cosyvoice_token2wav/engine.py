"""Token2WavEngine: token2wav as an engine, as the LLM stage is one: calls are submitted at any time and run
in a loop that admits new calls between Euler steps.

Each iteration: admit waiting calls (`scheduler`), run the encoder over the admitted calls' windows, run one
Euler step for the running calls (`model_runner`; each call at its own step, urgent groups first), then vocode
the calls that finished their last step, make their new blocks visible in the state cache (`block_manager`)
and answer them. A stream's first chunk that arrives during other work waits at most one step of it.

Streaming calls compute only their window: the frames from their first block not in the state cache on. With
`cache_bytes` 0 every call computes every frame of its prefix, as the reference does, and the output is the same
either way (the cache changes only the order of float sums). Final chunks and offline calls always compute
every frame (full attention, as the reference). `submit` is thread-safe; `run_chunks` runs a list of calls to
completion (inline when no loop thread runs: deterministic batching for tests and benchmarks).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .block_manager import PageLayout, StateCache
from .flow import CausalMaskedDiffWithXvec
from .hift import HiFTGenerator
from .model_runner import ModelRunner
from .scheduler import DEFAULT_LATER_MAX_WAIT_S, DEFAULT_PADDING_BUDGET, Scheduler, SchedulerConfig
from .sequence import (
    ChunkRequest,
    ChunkRequestError,
    ChunkResult,
    Sequence,
    SequenceStatus,
    plan_sequence,
)
from .token2wav import Token2WavConfig

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05          # loop wake-up period when idle (also bounds stop() latency)
_DRAIN_S = 30.0              # stop(): how long calls already submitted may take to finish
_MS_PER_S = 1000.0


@dataclass(frozen=True, slots=True)
class CallStats:
    """What one answered call cost (metrics)."""
    kind: str
    wait_ms: float               # submitted -> admitted (its encoder started)
    compute_ms: float            # admitted -> answered
    frames_computed: int         # flow frames its window computed (each through every Euler step)
    frames_reused: int           # flow frames it read from the state cache instead


class EngineFullError(RuntimeError):
    """The engine's waiting queue is full: the call is refused (the caller may retry elsewhere or later)."""


class Token2WavEngine:
    def __init__(self, model: str | Path | tuple[CausalMaskedDiffWithXvec, HiFTGenerator],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 hift_dtype: torch.dtype = torch.float32, cache_bytes: int = 0, max_batch: int = 16,
                 max_running: int | None = None, max_waiting: int = 1024,
                 padding_budget: float = DEFAULT_PADDING_BUDGET, urgent_apart: bool = True,
                 later_max_wait_s: float = DEFAULT_LATER_MAX_WAIT_S, use_cuda_graphs: bool = False,
                 config: Token2WavConfig = Token2WavConfig()) -> None:
        """model: a model directory or (flow, HiFT) modules (copied when they must change device or dtype).
        cache_bytes: the state cache's budget (0 = off). max_running: calls between admission and their last
        step (default 2 x max_batch). later_max_wait_s: how long a later chunk or offline call may sit out Euler steps
        while urgent calls run (0: every call steps every iteration)."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if use_cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if isinstance(model, (str, Path)):
            from .flow import load_flow
            from .hift import load_hift
            flow, hift, owned = load_flow(model, "cpu", torch.float32), load_hift(model, "cpu", fold=True), True
        else:
            (flow, hift), owned = model, False
        self.config = config
        self.dtype = dtype
        self.cache = StateCache(PageLayout.of(flow, dtype), cache_bytes, self.device)
        self.runner = ModelRunner(flow, hift, owned, self.device, dtype, hift_dtype, self.cache, config,
                                  use_cuda_graphs, max_batch)
        self.scheduler = Scheduler(SchedulerConfig(max_batch, max_running or 2 * max_batch, max_waiting,
                                                   padding_budget, urgent_apart, later_max_wait_s),
                                   self.cache, self.runner.block_frames, self._cacheable)
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._drain_until = 0.0
        self.frames_computed = 0
        self.frames_reused = 0
        self.startup_s = 0.0

    # --- set-up -------------------------------------------------------------------------------------
    def capture_graphs(self, log_line: Callable[[str], None] | None = None) -> float:
        """Capture every CUDA graph bucket now (nothing is captured inside a call); returns the seconds."""
        t0 = time.perf_counter()
        steps = self.runner.capture_step_graphs()
        hift = self.runner.capture_hift_graphs()
        self.startup_s = time.perf_counter() - t0
        if log_line is not None:
            log_line(f"token2wav: {steps} Euler-step and {hift} HiFT graphs ready in {self.startup_s:.1f} s; state "
                     f"cache {self.cache.n_pages} pages of {self.cache.page_bytes / 2**20:.1f} MiB")
        return self.startup_s

    def start(self) -> "Token2WavEngine":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="token2wav-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain_s: float = _DRAIN_S) -> None:
        """Stop the loop once the calls already submitted are answered (at most `drain_s` later)."""
        if self._thread is not None:
            self._drain_until = time.monotonic() + drain_s
            self._stop.set()
            self._thread.join()
            self._thread = None

    # --- calls --------------------------------------------------------------------------------------
    def _cacheable(self, seq: Sequence) -> bool:
        """Streaming calls before the final one (and prefills) read and keep blocks; final chunks and offline
        calls use full attention, whose frames depend on everything after them."""
        return seq.plan.streaming and not seq.plan.finalize

    def submit(self, request: ChunkRequest, on_done: Callable[[ChunkResult, CallStats], None],
               keep_mel: bool = False) -> None:
        """Queue one call; `on_done(result, stats)` is called once, from the engine's thread (or inline for a
        request that fails validation)."""
        runner = self.runner
        try:
            plan = plan_sequence(request, runner.lookahead, runner.ratio, self.runner.flow.cfg.vocab_size,
                                 self.config, runner.block_tokens)
        except ChunkRequestError as exc:
            on_done(ChunkResult(None, None, error=exc), CallStats(request.kind, 0.0, 0.0, 0, 0))
            return
        if plan.prefill and not self.cache.enabled:     # nothing would keep what it computes
            on_done(ChunkResult(torch.zeros(1, 0), None), CallStats(request.kind, 0.0, 0.0, 0, 0))
            return
        self._inbox.put(Sequence(request, plan, on_done, keep_mel))

    def run_chunks(self, requests: list[ChunkRequest], keep_mel: bool = False) -> list[ChunkResult]:
        """Run every request to completion; results in request order (a failed request has `error` set)."""
        results: list[ChunkResult | None] = [None] * len(requests)
        done = threading.Semaphore(0)

        def answer(i: int) -> Callable[[ChunkResult, CallStats], None]:
            def on_done(result: ChunkResult, stats: CallStats) -> None:
                results[i] = result
                done.release()
            return on_done

        for i, r in enumerate(requests):
            self.submit(r, answer(i), keep_mel)
        if self._thread is None:
            while any(r is None for r in results):
                self.step()
        for _ in requests:
            done.acquire()
        return results  # type: ignore[return-value]

    # --- the loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if self._stop.is_set() and ((self.scheduler.is_idle() and self._inbox.empty())
                                        or time.monotonic() > self._drain_until):
                return
            if self.scheduler.is_idle():
                try:
                    seq = self._inbox.get(timeout=_IDLE_WAIT_S)
                except queue.Empty:
                    continue
                self._enqueue(seq)
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must survive; step() already answered the calls hit
                log.exception("token2wav engine: an iteration failed")

    def _enqueue(self, seq: Sequence) -> None:
        if not self.scheduler.add(seq):
            self._answer_error(seq, EngineFullError(
                f"token2wav engine queue is full ({self.scheduler.config.max_waiting} calls waiting)"))

    def step(self) -> None:
        """One iteration: admit, encode, one Euler step, vocode and answer what finished."""
        while True:
            try:
                self._enqueue(self._inbox.get_nowait())
            except queue.Empty:
                break
        sched, runner, bf = self.scheduler, self.runner, self.runner.block_frames
        admitted = sched.admit()
        now = time.perf_counter()
        for s in admitted:
            s.admitted_s = s.last_step_s = now
        to_encode = [s for s in admitted if s.window_frames(bf) > 0]
        for group in sched.groups(to_encode):
            self._guarded(group, runner.encode)
        steppable = [s for s in sched.running if s.x is not None and s.step < runner.n_steps
                     and s.status is SequenceStatus.RUNNING]
        for group in sched.step_groups(steppable, time.perf_counter()):
            self._guarded(group, runner.step)
            stepped = time.perf_counter()
            for s in group:
                s.last_step_s = stepped
        finished = [s for s in sched.running if s.status is SequenceStatus.RUNNING
                    and (s.window_frames(bf) == 0 or (s.x is not None and s.step == runner.n_steps))]
        if finished:
            self._finish(finished)

    def _guarded(self, group: list[Sequence], fn: Callable[[list[Sequence]], None]) -> None:
        try:
            fn(group)
        except Exception as exc:  # noqa: BLE001 - a failed forward answers only its own calls
            log.exception("token2wav engine: a %s of %d calls failed", fn.__name__, len(group))
            for s in group:
                self._answer_error(s, exc)

    def _finish(self, seqs: list[Sequence]) -> None:
        """Answer the calls that ran their last step: prefills at once, audio calls group by group, urgent groups
        first, each group as soon as its vocoder batch is done (a first chunk does not wait for a final chunk's
        HiFT)."""
        self.runner.store_block_mels(seqs)
        self._complete([s for s in seqs if s.plan.prefill], {})
        for group in self.scheduler.groups(s for s in seqs if not s.plan.prefill):
            keep_mel = any(s.keep_mel for s in group)
            try:
                results = {id(s): res for s, res in
                           zip(group, self.runner.vocode(group, keep_mel, torch.device("cpu")))}
            except Exception as exc:  # noqa: BLE001 - a failed vocoder batch answers only its own calls
                log.exception("token2wav engine: HiFT for %d calls failed", len(group))
                for s in group:
                    self._answer_error(s, exc)
                continue
            self._complete(group, results)

    def _complete(self, seqs: list[Sequence], results: dict[int, ChunkResult]) -> None:
        empty = torch.zeros(1, 0)
        for s in seqs:
            if s.status is not SequenceStatus.RUNNING:
                continue   # answered with an error already
            self.cache.commit(s.cached_pages, s.write_pages)
            for follower in s.followers:     # its blocks are valid now: every step of them is written
                follower.leader = None
            s.followers = []
            self.scheduler.finish([s])
            self._answer(s, results.get(id(s)) or ChunkResult(empty, None))

    def _stats(self, s: Sequence) -> CallStats:
        bf = self.runner.block_frames
        now = time.perf_counter()
        admitted = s.admitted_s or now
        computed = max(0, s.window_frames(bf)) if s.admitted_s else 0
        return CallStats(s.kind, (admitted - s.submitted_s) * _MS_PER_S, (now - admitted) * _MS_PER_S, computed,
                         s.window_start(bf) if s.admitted_s else 0)

    def _answer(self, s: Sequence, result: ChunkResult) -> None:
        stats = self._stats(s)
        self.frames_computed += stats.frames_computed
        self.frames_reused += stats.frames_reused
        s.x = s.mu = s.cond = s.spks = None
        try:
            s.on_done(result, stats)
        except Exception:  # noqa: BLE001 - a failed answer concerns only its own call
            log.exception("token2wav engine: answering a %s call failed", s.kind)

    def _answer_error(self, s: Sequence, exc: BaseException) -> None:
        for follower in s.followers:     # they read blocks this call will never finish writing
            if follower.status is SequenceStatus.RUNNING:
                self._answer_error(follower, exc)
        s.followers = []
        if s.leader is not None:
            s.leader.followers = [f for f in s.leader.followers if f is not s]
            s.leader = None
        if s.status is SequenceStatus.RUNNING:
            self.cache.abort(s.cached_pages, s.write_pages)
            self.scheduler.finish([s])
        s.status = SequenceStatus.FINISHED
        self._answer(s, ChunkResult(None, None, error=exc if isinstance(exc, Exception) else RuntimeError(str(exc))))
