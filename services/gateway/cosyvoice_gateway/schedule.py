"""Streaming chunk schedule: when to call token2wav and with which token span (spec 7).

The LLM produces speech tokens one by one; the flow needs `PRE_LOOKAHEAD_TOKENS` tokens of right
context for every chunk it emits, and the vocoder chunks are joined by token2wav's caches. The
schedule (per request; the upstream bug of a shared, growing hop is avoided by construction):

* chunk 0 covers `FIRST_CHUNK_TOKENS` (15) tokens and is emitted once 15 + 3 lookahead = 18 tokens
  exist (the seed's first chunk; the reference waits for 25 + 3);
* then hops of 25, 50, 100, 100, ... tokens (doubling, capped at `TOKEN_MAX_HOP_TOKENS`), each
  emitted once hop + 3 lookahead tokens beyond the offset exist;
* once the LLM is done, full hops that are already available are still emitted (audio leaves
  sooner than one big final call would give it), and the rest, lookahead included, is the final
  chunk (`finalize=True`), which also flushes token2wav's withheld vocoder tail.

A chunk is `(token_offset, end)`: token2wav receives the prefix `tokens[:end]` and returns the audio
of the tokens from `token_offset` on (minus the withheld tail when not final). Summed over a request
the audio is exactly `SAMPLES_PER_TOKEN` per token.
"""
from dataclasses import dataclass

from cosyvoice_common.constants import (
    FIRST_CHUNK_TOKENS,
    PRE_LOOKAHEAD_TOKENS,
    STREAM_SCALE_FACTOR,
    TOKEN_HOP_TOKENS,
    TOKEN_MAX_HOP_TOKENS,
)


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    token_offset: int   # tokens whose audio was already emitted
    end: int            # send tokens[:end] (the hop plus lookahead, or everything when final)
    finalize: bool

    @property
    def hop_tokens(self) -> int:
        """Tokens whose audio this chunk emits (the lookahead of a non-final chunk is not among them)."""
        return self.end - self.token_offset - (0 if self.finalize else PRE_LOOKAHEAD_TOKENS)


@dataclass(frozen=True, slots=True)
class ScheduleConfig:
    first_hop_tokens: int = FIRST_CHUNK_TOKENS
    hop_tokens: int = TOKEN_HOP_TOKENS
    max_hop_tokens: int = TOKEN_MAX_HOP_TOKENS
    lookahead_tokens: int = PRE_LOOKAHEAD_TOKENS
    growth_factor: int = STREAM_SCALE_FACTOR

    def __post_init__(self) -> None:
        if min(self.first_hop_tokens, self.hop_tokens, self.max_hop_tokens) < 1:
            raise ValueError(f"hops must be positive: {self}")
        if self.lookahead_tokens < 0 or self.growth_factor < 1:
            raise ValueError(f"bad lookahead/growth: {self}")


class ChunkSchedule:
    """Pure per-request state machine: feed it the token count, it says which chunk to run next.

    Usage: after every LLM response call `next_chunk(len(tokens), llm_done)` in a loop until it returns
    None; run each returned chunk. After the final chunk `done` is True and nothing more is returned.
    """

    __slots__ = ("config", "_offset", "_hop", "_index", "_done")

    def __init__(self, config: ScheduleConfig = ScheduleConfig()) -> None:
        self.config = config
        self._offset = 0
        self._hop = config.first_hop_tokens
        self._index = 0
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def token_offset(self) -> int:
        return self._offset

    def next_chunk(self, tokens_available: int, llm_done: bool) -> Chunk | None:
        if self._done:
            return None
        if tokens_available < self._offset:
            raise ValueError(f"tokens_available went backwards: {tokens_available} < {self._offset}")
        need = self._hop + self.config.lookahead_tokens
        if tokens_available - self._offset >= need:
            chunk = Chunk(self._index, self._offset, self._offset + need, finalize=False)
            self._offset += self._hop
            self._hop = self._next_hop()
            self._index += 1
            return chunk
        if not llm_done:
            return None
        self._done = True
        if tokens_available == 0:
            return None     # nothing was generated: there is no audio to finalize
        return Chunk(self._index, self._offset, tokens_available, finalize=True)

    def _next_hop(self) -> int:
        if self._index == 0:
            return self.config.hop_tokens
        return min(self.config.max_hop_tokens, self._hop * self.config.growth_factor)


def plan(total_tokens: int, config: ScheduleConfig = ScheduleConfig()) -> list[Chunk]:
    """All chunks of a request whose LLM produced `total_tokens` before the first look (tests, bench)."""
    schedule = ChunkSchedule(config)
    chunks = []
    while (chunk := schedule.next_chunk(total_tokens, llm_done=True)) is not None:
        chunks.append(chunk)
    return chunks


def chunk_ends(max_tokens: int, config: ScheduleConfig = ScheduleConfig()) -> list[int]:
    """Token counts at which the schedule runs its non-final chunks, for a request of at most `max_tokens`:
    what a token producer must deliver at once (the final chunk waits for the end anyway)."""
    return [chunk.end for chunk in plan(max_tokens, config) if not chunk.finalize]
