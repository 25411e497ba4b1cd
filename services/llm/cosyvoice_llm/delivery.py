"""Token delivery groups of a streaming llm request (the optional `stream_boundaries` input).

`stream_boundaries` are cumulative generated-token counts, strictly increasing: the stage holds a request's tokens
until the count it has produced reaches the next boundary, then sends everything held at once (so a response ends
at or past a boundary, never short of it, and the token that completes a boundary is never held back). After the
last boundary every batch of new tokens goes out as soon as the engine produces it; the final response carries
whatever is left. Without boundaries every batch of new tokens goes out at once (TensorRT-LLM's per-token contract).
"""
from __future__ import annotations

from typing import Sequence

from cosyvoice_common.errors import InvalidRequestError


def validate_boundaries(boundaries: Sequence[int]) -> tuple[int, ...]:
    values = tuple(int(b) for b in boundaries)
    if any(b <= 0 for b in values):
        raise InvalidRequestError(f"stream_boundaries must be positive token counts, got {list(values)[:8]}")
    if any(b >= c for b, c in zip(values, values[1:])):
        raise InvalidRequestError(f"stream_boundaries must be strictly increasing, got {list(values)[:8]}")
    return values


class TokenGrouper:
    """Holds one request's tokens until the next boundary (see the module doc)."""

    __slots__ = ("_boundaries", "_next", "_held", "_sent")

    def __init__(self, boundaries: Sequence[int] = ()) -> None:
        self._boundaries = validate_boundaries(boundaries)
        self._next = 0          # index of the next boundary not yet reached
        self._held: list[int] = []
        self._sent = 0          # tokens handed out so far

    def push(self, tokens: Sequence[int]) -> list[int]:
        """New tokens in; returns the tokens to send now (empty: hold)."""
        self._held.extend(tokens)
        total = self._sent + len(self._held)
        bounds = self._boundaries
        if self._next < len(bounds):
            if total < bounds[self._next]:
                return []
            while self._next < len(bounds) and bounds[self._next] <= total:
                self._next += 1
        return self._take()

    def flush(self) -> list[int]:
        """Everything still held (the request ended)."""
        return self._take()

    def _take(self) -> list[int]:
        out, self._held = self._held, []
        self._sent += len(out)
        return out
