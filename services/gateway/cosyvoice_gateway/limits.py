"""Lengths that fit the llm stage: its capacity, each segment's speech-token bounds, splitting to fit.

The llm stage holds `max_seq_len` positions per slot (input ids + generated tokens). The gateway reads it from
the served llm model's config parameters (`StageClient.int_parameter`), falling back to the common default
`LLM_MAX_SEQ_LEN` until a replica's config was read. Then, per segment:

- an implicit bound (the model's 2x / 20x text-token rule) is capped to the room the input leaves;
- an explicit bound beyond that room is INVALID_ARGUMENT naming the limit;
- a text without explicit bounds is split (sentences, then words or characters) until every segment leaves
  the rule's full room, so long texts are never cut short by the cap.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from cosyvoice_common.constants import MAX_TOKEN_TEXT_RATIO, MIN_TOKEN_TEXT_RATIO

from cosyvoice_gateway.textnorm import SplitConfig, has_markup, is_zh, split_paragraph

LLM_FRAME_POSITIONS = 2                    # <|sos|> and <|task_id|> around the texts
_WORD = re.compile(r"\S+\s*")


class LimitError(ValueError):
    """A request that cannot fit the llm stage; the message names the limit."""


def speech_token_bounds(min_tokens: int, max_tokens: int, target_text_tokens: int, limit: int,
                        room: int | None = None) -> tuple[int, int]:
    """Request bounds, else the model's rule (spec 4.4: 2x / 20x target text tokens), capped at `limit` (the
    API's per-segment bound) and at `room` (positions the input leaves in the llm stage). An explicit bound
    beyond `room` raises LimitError."""
    cap = limit if room is None else min(limit, room)
    if cap < 1:
        raise LimitError(f"the input leaves no room for speech tokens (room {room})")
    rule_min = min(MIN_TOKEN_TEXT_RATIO * target_text_tokens, cap)
    rule_max = min(MAX_TOKEN_TEXT_RATIO * target_text_tokens, cap)
    hi = max_tokens or max(rule_max, min_tokens)
    lo = min_tokens or min(rule_min, hi)
    if room is not None and max(lo, hi) > room:
        raise LimitError(f"speech token bound {max(lo, hi)} does not fit: the input leaves room for {room}")
    return lo, max(hi, 1)


def fits(input_positions: int, text_tokens: int, capacity: int) -> bool:
    """A segment fits when its input and the rule's largest output (20x its text tokens) fit `capacity`."""
    return input_positions + text_tokens + MAX_TOKEN_TEXT_RATIO * text_tokens <= capacity


def max_text_tokens(fixed_positions: int, capacity: int) -> int:
    """The most target-text tokens a segment may have after `fixed_positions` (frame, prompt text, prompt
    speech) and still fit with the rule's full room."""
    return max(0, (capacity - fixed_positions) // (1 + MAX_TOKEN_TEXT_RATIO))


def _pack(units: list[str], count: Callable[[str], int], max_tokens: int) -> list[str]:
    """Greedily join consecutive units while the joined piece stays within `max_tokens` (a unit longer than
    that on its own stays a piece of its own)."""
    pieces: list[str] = []
    current = ""
    for unit in units:
        if current and count(current + unit) > max_tokens:
            pieces.append(current)
            current = ""
        current += unit
    if current:
        pieces.append(current)
    return pieces


def split_to_fit(text: str, count: Callable[[str], int], max_tokens: int) -> list[str]:
    """`text` as pieces of at most `max_tokens` tokens where it can be: after sentence terminators first,
    then between words (characters for zh). Markup text (`<|...|>`) is kept whole."""
    if max_tokens < 1 or count(text) <= max_tokens or has_markup(text):
        return [text]
    zh = is_zh(text)
    config = SplitConfig(token_max_n=max_tokens, token_min_n=max(1, max_tokens * 3 // 4),
                         merge_len=max(1, min(20, max_tokens // 4)))
    out: list[str] = []
    for sentence in split_paragraph(text, count, zh, config):
        if count(sentence) <= max_tokens:
            out.append(sentence)
            continue
        units = list(sentence) if zh else _WORD.findall(sentence)
        out.extend(_pack(units, count, max_tokens))
    return [piece.strip() for piece in out if piece.strip()]


def fit_segments(texts: list[str], count: Callable[[str], int], fixed_positions: int, capacity: int) -> list[str]:
    """Split each segment that would not leave the rule's full room after `fixed_positions`."""
    budget = max_text_tokens(fixed_positions, capacity)
    out: list[str] = []
    for text in texts:
        out.extend(split_to_fit(text, count, budget) if not fits(fixed_positions, count(text), capacity) else [text])
    return out
