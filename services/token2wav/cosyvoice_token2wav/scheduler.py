"""The scheduler: which calls join the running set, and which run together at each Euler step.

Two queues, first in first out: urgent (a prompt prefill or a stream's first chunk: the path to a stream's
first audio) and the rest (later chunks, final chunks, offline calls). Each iteration of the engine admits
waiting calls while the running set has room, urgent ones first. Admission asks the state cache for the call's
cached prefix and pages for the blocks it will complete. A call whose next blocks another running call is still
computing does not compute them twice: an urgent call follows an urgent writer one Euler step behind, reading
each step's keys and values once the writer has written them (a stream's first chunk behind its own prompt
prefill joins at once); any other call waits until the writer is done.

Each iteration then runs one Euler step of the running calls, in groups of at most `max_batch` calls whose
padded window stays within `padding_budget` times their real frames (so a long final chunk or offline call never
pads short chunks to its size). Urgent groups run every iteration. The other groups sit out while urgent work
runs, so a first chunk waits for at most the one step already under way, but a group sits out for at most
`later_max_wait_s` at a time: under a long burst of new streams, later chunks still step at least that often
(their audio has the previous chunk's playback as slack; a first chunk has none).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cosyvoice_common.stage_params import LATER_MAX_WAIT_MS

from .block_manager import StateCache, block_hashes
from .sequence import Sequence, SequenceStatus

DEFAULT_PADDING_BUDGET = 2.0
# How long a non-urgent call may sit out Euler steps while urgent ones run (0: every call steps every iteration).
DEFAULT_LATER_MAX_WAIT_S = LATER_MAX_WAIT_MS / 1000.0


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch: int = 16             # calls per forward
    max_running: int = 32           # calls between admission and their last Euler step
    max_waiting: int = 1024         # calls queued before admission; more are refused
    padding_budget: float = DEFAULT_PADDING_BUDGET
    urgent_apart: bool = True       # urgent calls never share a group with the rest
    later_max_wait_s: float = DEFAULT_LATER_MAX_WAIT_S

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_running < self.max_batch or self.max_waiting < 1:
            raise ValueError(f"bad scheduler sizes: {self}")
        if self.padding_budget < 1.0:
            raise ValueError("padding_budget must be >= 1")
        if not self.later_max_wait_s >= 0.0:
            raise ValueError("later_max_wait_s must be >= 0")


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: StateCache, block_frames: int,
                 cacheable: Callable[[Sequence], bool]) -> None:
        self.config = config
        self.cache = cache
        self.block_frames = block_frames
        self._cacheable = cacheable
        self.urgent: deque[Sequence] = deque()
        self.normal: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def waiting(self) -> int:
        return len(self.urgent) + len(self.normal)

    def is_idle(self) -> bool:
        return not self.running and not self.waiting

    def add(self, seq: Sequence) -> bool:
        """Queue a call; False when the queue is full (the caller refuses it)."""
        if self.waiting >= self.config.max_waiting:
            return False
        (self.urgent if seq.urgent else self.normal).append(seq)
        return True

    # --- admission ----------------------------------------------------------------------------------
    def admit(self) -> list[Sequence]:
        """Calls that join the running set now (their encoder runs this iteration), urgent first."""
        admitted: list[Sequence] = []
        for queue in (self.urgent, self.normal):
            deferred: list[Sequence] = []
            while queue and len(self.running) + len(admitted) < self.config.max_running:
                seq = queue.popleft()
                if self._reserve(seq):
                    admitted.append(seq)
                else:
                    deferred.append(seq)
            queue.extendleft(reversed(deferred))
        for seq in admitted:
            seq.status = SequenceStatus.RUNNING
        self.running.extend(admitted)
        return admitted

    def _reserve(self, seq: Sequence) -> bool:
        """Cached prefix and pages to write; False = wait (the next block is being computed by another call)."""
        if not (self.cache.enabled and self._cacheable(seq)):
            return True
        if not seq.block_hashes:
            plan = seq.plan
            seq.block_hashes = block_hashes(plan.ids, plan.flow_frames // self.block_frames, seq.request.embedding,
                                            seq.request.prompt_feat, self.cache.layout)
        pages, writers = self.cache.match(seq.block_hashes)
        if writers:
            if not self._can_follow(seq, writers, len(pages)):
                return False
            seq.leader = writers[0]
            seq.leader.followers.append(seq)
        self.cache.acquire(pages)
        seq.cached_pages = pages
        seq.write_pages = self.cache.allocate(seq.block_hashes[len(pages):], seq)
        return True

    def _can_follow(self, seq: Sequence, writers: list, n_blocks: int) -> bool:
        """Whether `seq` may read blocks another running call is still computing, one Euler step behind it: one
        writer, whose encoder has run (its encoder pages are written), both urgent (urgent groups run every
        iteration, so the writer stays ahead), and `seq` needs none of those blocks' final mel (its audio starts
        after them; a first chunk behind its own prompt's prefill)."""
        (leader,) = writers if len(writers) == 1 else (None,)
        return (leader is not None and leader.status is SequenceStatus.RUNNING and leader.x is not None
                and leader.urgent and seq.urgent and leader.leader is None
                and seq.plan.start_frame >= n_blocks * self.block_frames)

    # --- grouping -----------------------------------------------------------------------------------
    def groups(self, seqs: Iterable[Sequence]) -> list[list[Sequence]]:
        """`seqs` cut into forwards: by urgency (when apart), then by window length under the padding budget;
        urgent groups first, then the cheapest."""
        seqs = list(seqs)
        classes = (True, False) if self.config.urgent_apart else (None,)
        groups: list[list[Sequence]] = []
        bf = self.block_frames
        for urgent in classes:
            members = [s for s in seqs if urgent is None or s.urgent == urgent]
            cur: list[Sequence] = []
            for s in sorted(members, key=lambda s: (s.window_frames(bf), s.submitted_s)):
                if cur and (len(cur) >= self.config.max_batch or not self._within_budget(cur + [s])):
                    groups.append(cur)
                    cur = []
                cur.append(s)
            if cur:
                groups.append(cur)
        return sorted(groups, key=lambda g: (not any(s.urgent for s in g), len(g) * self._padded(g)))

    def _padded(self, group: list[Sequence]) -> int:
        bf = self.block_frames
        return -(-max(s.window_frames(bf) for s in group) // bf) * bf

    def _within_budget(self, group: list[Sequence]) -> bool:
        bf = self.block_frames
        return len(group) * self._padded(group) <= self.config.padding_budget * sum(s.window_frames(bf)
                                                                                   for s in group)

    def step_groups(self, steppable: list[Sequence], now: float) -> list[list[Sequence]]:
        """The groups that run one Euler step this iteration (`now`: the engine's clock, time.perf_counter). A
        follower steps only behind its leader (it reads the keys and values the leader wrote at that step)."""
        steppable = [s for s in steppable if s.leader is None or s.leader.step > s.step]
        groups = self.groups(steppable)
        if not any(any(s.urgent for s in g) for g in groups):
            return groups
        limit = self.config.later_max_wait_s
        return [g for g in groups if any(s.urgent for s in g) or now - min(s.last_step_s for s in g) >= limit]

    def finish(self, seqs: Iterable[Sequence]) -> None:
        done = {id(s) for s in seqs}
        for s in self.running:
            if id(s) in done:
                s.status = SequenceStatus.FINISHED
        self.running = [s for s in self.running if id(s) not in done]
