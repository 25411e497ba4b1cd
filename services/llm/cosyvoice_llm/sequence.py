"""One generation request and its state: the typed request, what the engine sends back, and the per-request
`Sequence` the scheduler and the model runner share (status, slot, host mirror of its position)."""
from __future__ import annotations

import enum
import queue
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence as Seq

from cosyvoice_common.errors import InvalidRequestError

from .repetition import RepetitionDetector
from .sampling import SamplingParams


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


def coalesce_outputs(outputs: Seq[LLMOutput]) -> list[LLMOutput]:
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
class Sequence:
    """A request inside the engine, from submit to its final output."""
    request: LLMRequest
    callback: OutputCallback
    full_sort: bool                  # its top_k exceeds the runner's top-k cap: the steps it runs in sort fully
    repetition: RepetitionDetector | None = None
    status: RequestStatus = RequestStatus.WAITING
    slot: int = -1
    num_generated: int = 0
    next_position: int = 0           # cache position of the id fed at its next decode step (host mirror)

    @property
    def request_id(self) -> str:
        return self.request.request_id


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
