"""`Scheduler`: who waits, who runs, who is cancelled, and what each sampled id does to its request.

Requests wait in a FIFO queue. Each engine step admits at most one prefill group: waiting requests in arrival
order, into free slots, as many as fit the largest prefill rows bucket and `max_prefill_tokens` padded tokens
(at least one), so running streams wait at most one prefill between two of their tokens. `postprocess` is where a
sampled id stops, extends or ends its request; `finish` is the one place a request ends and frees its slot.

Thread safety: `add`, `cancel` and the counters are called from any thread; everything else from the engine's
loop thread. The lock (a Condition the loop also sleeps on) guards the queue, the registry and the slot table.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from cosyvoice_common.constants import SPEECH_STOP_IDS
from cosyvoice_common.errors import InvalidRequestError

from .sequence import FinishReason, LLMOutput, RequestStatus, Sequence
from .slots import SlotTable

PrefillShape = Callable[[int, int], tuple[int, int]]   # (rows, longest prompt) -> the (rows, length) it runs as


class Scheduler:
    def __init__(self, slots: SlotTable, prefill_shape: PrefillShape, max_prefill_rows: int,
                 max_prefill_tokens: int) -> None:
        self.slots = slots
        self.wake = threading.Condition()
        self._prefill_shape = prefill_shape
        self._max_prefill_rows = max_prefill_rows
        self._max_prefill_tokens = max_prefill_tokens
        self._waiting: deque[Sequence] = deque()
        self._by_id: dict[str, Sequence] = {}
        self._cancel_ids: set[str] = set()

    # --- any thread ---------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        with self.wake:
            if seq.request_id in self._by_id:
                raise InvalidRequestError(f"request id {seq.request_id!r} is already in flight")
            self._by_id[seq.request_id] = seq
            self._waiting.append(seq)
            self.wake.notify()

    def cancel(self, request_id: str) -> None:
        with self.wake:
            if request_id in self._by_id:
                self._cancel_ids.add(request_id)
                self.wake.notify()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self.slots.running or self._cancel_ids)

    @property
    def cancel_due(self) -> bool:
        return bool(self._cancel_ids)

    @property
    def admission_due(self) -> bool:
        return bool(self._waiting and self.slots.num_free)

    # --- the loop thread ----------------------------------------------------------------------------------------
    def running(self) -> list[Sequence]:
        """The running sequences, in the order they were admitted."""
        with self.wake:
            return list(self.slots.running.values())

    def apply_cancellations(self) -> None:
        with self.wake:
            ids, self._cancel_ids = self._cancel_ids, set()
            cancelled = [self._by_id[i] for i in ids if i in self._by_id]
            for seq in cancelled:
                if seq.status is RequestStatus.WAITING:
                    self._waiting.remove(seq)
        for seq in cancelled:
            self.finish(seq, FinishReason.CANCELLED)

    def schedule_prefill(self) -> list[Sequence]:
        """The next prefill group (see the module doc), already holding their slots; empty if none can start."""
        group: list[Sequence] = []
        longest = 0
        with self.wake:
            while self._waiting and self.slots.num_free and len(group) < self._max_prefill_rows:
                need = max(longest, len(self._waiting[0].request.input_ids))
                rows, length = self._prefill_shape(len(group) + 1, need)
                if group and rows * length > self._max_prefill_tokens:
                    break
                longest = need
                seq = self._waiting.popleft()
                self.slots.allocate(seq)
                group.append(seq)
        return group

    def postprocess(self, seq: Sequence, token: int) -> None:
        """One sampled id of a running request: a stop id ends it unsent; else the id goes out, and the request
        ends there if it reached max_new_tokens or (past min_new_tokens) fell into a loop."""
        if token in SPEECH_STOP_IDS:
            self.finish(seq, FinishReason.STOP)
            return
        seq.num_generated += 1
        seq.callback(LLMOutput(seq.request_id, (token,)))
        if seq.num_generated >= seq.request.max_new_tokens:
            self.finish(seq, FinishReason.LENGTH)
        elif (seq.repetition is not None and seq.repetition.push(token)
              and seq.num_generated >= seq.request.min_new_tokens):
            self.finish(seq, FinishReason.REPETITION)

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        with self.wake:
            if seq.status is RequestStatus.FINISHED:
                return
            if seq.status is RequestStatus.RUNNING:
                self.slots.release(seq)
            seq.status = RequestStatus.FINISHED
            self._by_id.pop(seq.request_id, None)
        seq.callback(LLMOutput(seq.request_id, (), finished=True, finish_reason=reason, error=error))

    def drain(self) -> list[Sequence]:
        """Every request not finished yet, the waiting queue emptied (engine stop)."""
        with self.wake:
            pending = list(self._waiting) + list(self.slots.running.values())
            self._waiting.clear()
        return pending
