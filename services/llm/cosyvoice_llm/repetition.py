"""Repetition-loop detection: end an utterance whose speech tokens have fallen into a loop.

An autoregressive TTS LM sometimes locks into a cycle (the same p tokens again and again) and would then
babble until `max_new_tokens`. The detector watches each request's generated tokens and reports a loop
when the most recent tokens are periodic: for some period p in [1, max_period_tokens], the last
`max(p * min_repeats, min_span_tokens)` tokens satisfy t[i] == t[i - p]. `min_span_tokens` keeps natural
repetition (a pause is a short run of one silence token) from triggering: the default asks for 4 s of
audio in one exact cycle.

Incremental and O(max_period_tokens) per token, no allocation: `run[p]` counts how many consecutive
latest tokens equal the token p positions earlier; the last `run[p] + p` tokens are then p-periodic.
The engine calls `push(token)` once per emitted token and ends the request with
`FinishReason.REPETITION` when it returns True (only once the request's `min_new_tokens` are out, so
forced lengths are never cut short).

Configured by a short spec string (`RepetitionConfig.parse`), the llm model's `repetition` parameter
(variable LLM_REPETITION): "on", "off", or "max_period=20,min_repeats=4,min_span=100".
"""
from __future__ import annotations

from dataclasses import dataclass, fields

# 25 speech tokens per second: 100 tokens of one exact cycle = 4 s of looped audio.
DEFAULT_MAX_PERIOD_TOKENS = 20
DEFAULT_MIN_REPEATS = 4
DEFAULT_MIN_SPAN_TOKENS = 100
_OFF = ("off", "0", "false", "no", "none", "disabled")
_KEYS = {"max_period": "max_period_tokens", "min_repeats": "min_repeats", "min_span": "min_span_tokens"}


@dataclass(frozen=True, slots=True)
class RepetitionConfig:
    enabled: bool = True
    max_period_tokens: int = DEFAULT_MAX_PERIOD_TOKENS   # longest cycle looked for
    min_repeats: int = DEFAULT_MIN_REPEATS               # whole cycles that must be seen
    min_span_tokens: int = DEFAULT_MIN_SPAN_TOKENS       # and at least this many looping tokens in all

    def __post_init__(self) -> None:
        if self.max_period_tokens < 1:
            raise ValueError(f"max_period_tokens must be >= 1, got {self.max_period_tokens}")
        if self.min_repeats < 2:
            raise ValueError(f"min_repeats must be >= 2 (one occurrence is not a repetition), got {self.min_repeats}")
        if self.min_span_tokens < 2:
            raise ValueError(f"min_span_tokens must be >= 2, got {self.min_span_tokens}")

    @classmethod
    def parse(cls, spec: str | None) -> "RepetitionConfig":
        """"" or None = defaults; "off" = disabled; else comma-separated key=value with keys
        max_period, min_repeats, min_span (and optionally enabled=on|off)."""
        spec = (spec or "").strip()
        if not spec or spec.lower() in ("on", "default", "true", "1"):
            return cls()
        if spec.lower() in _OFF:
            return cls(enabled=False)
        values: dict[str, object] = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if key == "enabled" and sep:
                values["enabled"] = value.lower() not in _OFF
            elif key in _KEYS and sep:
                try:
                    values[_KEYS[key]] = int(value)
                except ValueError:
                    raise ValueError(f"repetition spec {spec!r}: {key} must be an integer, got {value!r}") from None
            else:
                names = ", ".join([*_KEYS, "enabled"])
                raise ValueError(f"repetition spec {spec!r}: unknown item {item!r}; use off or {names}")
        return cls(**values)

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        return (f"max_period={self.max_period_tokens},min_repeats={self.min_repeats},"
                f"min_span={self.min_span_tokens}")

    def detector(self) -> "RepetitionDetector | None":
        return RepetitionDetector(self) if self.enabled else None


class RepetitionDetector:
    """Per-request state: the last `max_period_tokens` tokens (a ring) and one run counter per period."""

    __slots__ = ("_max_period", "_need", "_ring", "_runs", "_count", "period")

    def __init__(self, config: RepetitionConfig) -> None:
        self._max_period = config.max_period_tokens
        # Tokens that must be p-periodic for period p (index p - 1).
        self._need = [max(p * config.min_repeats, config.min_span_tokens) for p in range(1, self._max_period + 1)]
        self._ring = [-1] * self._max_period
        self._runs = [0] * self._max_period
        self._count = 0
        self.period = 0            # the period of the loop found (0 = none yet)

    def push(self, token: int) -> bool:
        """Add one generated token; True when the latest tokens form a loop (then `period` is set)."""
        ring, runs, n, size = self._ring, self._runs, self._count, self._max_period
        found = 0
        for p in range(1, min(n, size) + 1):
            if ring[(n - p) % size] == token:
                runs[p - 1] += 1
                if not found and runs[p - 1] + p >= self._need[p - 1]:
                    found = p
            else:
                runs[p - 1] = 0
        ring[n % size] = token
        self._count = n + 1
        if found:
            self.period = found
        return bool(found)


def find_loop(tokens, config: RepetitionConfig = RepetitionConfig()) -> int:
    """The period of a loop at the end of `tokens` (the first point the detector would fire), else 0.
    A reference for tests and offline analysis: feeds every token through a fresh detector."""
    detector = RepetitionDetector(config)
    for token in tokens:
        if detector.push(int(token)):
            return detector.period
    return 0
