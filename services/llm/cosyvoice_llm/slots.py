"""`SlotTable`: which request holds which row of the static KV cache.

Slots are handed out lowest first, so the prefix of rows a decode step runs over ([0, highest held + 1)) stays
short. One row past the slots, `scratch_slot`, belongs to nobody: padding rows of a prefill write there.
Releasing a slot tells the model runner (`on_release`) to stop advancing that row.
"""
from __future__ import annotations

import heapq
from typing import Callable

from .sequence import RequestStatus, Sequence


class SlotTable:
    def __init__(self, num_slots: int, on_release: Callable[[int], None]) -> None:
        self.num_slots = num_slots
        self.scratch_slot = num_slots
        self.running: dict[int, Sequence] = {}     # slot -> sequence
        self.num_full_sort = 0                     # running sequences whose top_k needs the full sort
        self._free = list(range(num_slots))        # a heap: the lowest free slot first
        self._on_release = on_release

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, seq: Sequence) -> None:
        seq.slot = heapq.heappop(self._free)
        seq.status = RequestStatus.RUNNING
        self.running[seq.slot] = seq
        self.num_full_sort += seq.full_sort

    def release(self, seq: Sequence) -> None:
        self._on_release(seq.slot)
        del self.running[seq.slot]
        self.num_full_sort -= seq.full_sort
        heapq.heappush(self._free, seq.slot)

    def rows_in_use(self) -> int:
        """Rows a decode step must cover: up to the highest slot held."""
        return max(self.running) + 1
