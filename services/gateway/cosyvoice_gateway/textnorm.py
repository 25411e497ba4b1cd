"""Text frontend of spec 2.2: light normalisation and sentence splitting (`text_normalize`, `split_paragraph`).

Everything here is optional and switchable per request (`text_frontend`): the reference's published demos
and the Triton runtime never normalise, so the default of the gRPC API is off. Skipped when the text
carries `<|...|>` markup (the caller is speaking in model tokens).

Optional packages, used when installed and otherwise skipped (documented degradation, never an error):
  * `wetext`  - the WeTextProcessing zh/en normalisers the reference calls first (dates, units, ...);
  * `inflect` - English digit runs spelled out as words ("42" -> "forty-two"). Without it digits stay
                digits (the BPE tokenizer reads them one by one, the model says them less reliably).
The proprietary `ttsfrd` engine of the reference is not supported.
"""
from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

# Sentence terminators (spec 2.2); a closing quote right after one stays with its piece.
ZH_TERMINATORS = frozenset("。？！；：、.?!;")
EN_TERMINATORS = frozenset(".?!;:")
CLOSING_QUOTES = frozenset("\"”")
ZH_FULL_STOP = "。"
EN_FULL_STOP = "."
_CJK_FIRST, _CJK_LAST = "\u4e00", "\u9fff"
_MARKUP_OPEN, _MARKUP_CLOSE = "<|", "|>"
# zh branch replacements, in the reference's order.
_ZH_CORNER_MARKS = (("²", "平方"), ("³", "立方"))
_ZH_DELETED = ("（", "）", "【", "】", "`")
_ZH_DASH = "——"
_ZH_SPACED_HYPHEN = " - "
_ZH_TRAILING_COMMAS = re.compile(r"[，,、]+$")


@dataclass(frozen=True, slots=True)
class SplitConfig:
    """`split_paragraph` lengths: characters for zh, tokenizer tokens for en (spec 2.2 defaults)."""
    token_max_n: int = 80
    token_min_n: int = 60
    merge_len: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.merge_len <= self.token_min_n <= self.token_max_n:
            raise ValueError(f"need 0 < merge_len <= token_min_n <= token_max_n, got {self}")


DEFAULT_SPLIT = SplitConfig()


def is_zh(text: str) -> bool:
    """The reference's language switch: any CJK unified ideograph selects the zh branch."""
    return any(_CJK_FIRST <= ch <= _CJK_LAST for ch in text)


def has_markup(text: str) -> bool:
    """Text with `<|` and `|>` is model-token markup: the frontend leaves it alone."""
    return _MARKUP_OPEN in text and _MARKUP_CLOSE in text


def is_only_punctuation(text: str) -> bool:
    """Empty, or only Unicode punctuation/symbols (\\p{P}, \\p{S}); such segments are dropped.

    Whitespace is ignored too (the reference would keep " . !", a segment with nothing to say)."""
    return all(unicodedata.category(ch)[0] in "PSZ" or ch.isspace() for ch in text)


# --- optional engines ------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _inflect_engine():
    try:
        import inflect
    except ImportError:
        log.info("inflect is not installed: English digits are not spelled out")
        return None
    return inflect.engine()


@lru_cache(maxsize=2)
def _wetext_normalizer(lang: str):
    try:
        from wetext import Normalizer
    except ImportError:
        return None
    try:
        return Normalizer(lang=lang, operator="tn", remove_erhua=False) if lang == "zh" \
            else Normalizer(lang=lang, operator="tn")
    except Exception as exc:  # a broken install must not take the gateway down: skip the stage, say so
        log.warning("wetext %s normaliser unavailable: %s", lang, exc)
        return None


def load_engines() -> None:
    """Load the optional engines now: wetext's normalisers take seconds to load, which the first request that
    normalises text would otherwise spend (inside a server's event loop, stalling every other request)."""
    _inflect_engine()
    for lang in ("zh", "en"):
        _wetext_normalizer(lang)


def inflect_available() -> bool:
    return _inflect_engine() is not None


# --- zh / en rules ---------------------------------------------------------------------------------------
def remove_unpaired_blanks(text: str) -> str:
    """Delete every ASCII space that is not between two non-space ASCII characters (keeps "a b", drops "中 文")."""
    out = []
    for i, ch in enumerate(text):
        if ch == " ":
            before = text[i - 1] if i > 0 else ""
            after = text[i + 1] if i + 1 < len(text) else ""
            if not (before.isascii() and after.isascii() and before not in ("", " ") and after not in ("", " ")):
                continue
        out.append(ch)
    return "".join(out)


def spell_out_numbers(text: str) -> str:
    """Replace each maximal run of `str.isdigit()` characters by inflect's words; unchanged without inflect."""
    engine = _inflect_engine()
    if engine is None:
        return text
    out, start = [], None
    for i, ch in enumerate(text):
        if ch.isdigit():
            if start is None:
                start = i
            continue
        if start is not None:
            out.append(engine.number_to_words(text[start:i]))
            start = None
        out.append(ch)
    if start is not None:
        out.append(engine.number_to_words(text[start:]))
    return "".join(out)


def normalize_zh(text: str) -> str:
    normalizer = _wetext_normalizer("zh")
    if normalizer is not None:
        text = normalizer.normalize(text)
    text = remove_unpaired_blanks(text.replace("\n", ""))
    for mark, word in _ZH_CORNER_MARKS:
        text = text.replace(mark, word)
    text = text.replace(".", ZH_FULL_STOP).replace(_ZH_SPACED_HYPHEN, "，")
    for ch in _ZH_DELETED:
        text = text.replace(ch, "")
    text = text.replace(_ZH_DASH, " ")
    return _ZH_TRAILING_COMMAS.sub(ZH_FULL_STOP, text)


def normalize_en(text: str) -> str:
    normalizer = _wetext_normalizer("en")
    if normalizer is not None:
        text = normalizer.normalize(text)
    return spell_out_numbers(text)


# --- splitting -------------------------------------------------------------------------------------------
def split_paragraph(text: str, count: Callable[[str], int], zh: bool, config: SplitConfig = DEFAULT_SPLIT
                    ) -> list[str]:
    """Spec 2.2 `split_paragraph` (comma splitting off).

    Appends a full stop when the text does not end in a terminator, cuts after every terminator (a closing
    quote right after stays with the piece), greedily joins pieces: a new segment starts when adding the
    next piece would exceed `token_max_n` while the current one already exceeds `token_min_n`; a last
    segment shorter than `merge_len` joins the previous one. `count` measures length (the reference: len
    for zh, tokenizer tokens for en)."""
    if not text:
        return []
    terminators = ZH_TERMINATORS if zh else EN_TERMINATORS
    if text[-1] not in terminators:
        text += ZH_FULL_STOP if zh else EN_FULL_STOP
    pieces: list[str] = []
    start = 0
    for i, ch in enumerate(text):
        if ch not in terminators or i < start:
            continue
        if i > start:
            pieces.append(text[start:i] + ch)
        if i + 1 < len(text) and text[i + 1] in CLOSING_QUOTES:
            if pieces:       # the reference would pop an empty list on text like '."' at the very start
                pieces[-1] += text[i + 1]
            start = i + 2
        else:
            start = i + 1
    segments: list[str] = []
    current = ""
    for piece in pieces:
        if count(current + piece) > config.token_max_n and count(current) > config.token_min_n:
            segments.append(current)
            current = ""
        current += piece
    if current:
        if segments and count(current) < config.merge_len:
            segments[-1] += current
        else:
            segments.append(current)
    return segments


def text_normalize(text: str, count_tokens: Callable[[str], int], split: bool = True, enabled: bool = True,
                   config: SplitConfig = DEFAULT_SPLIT) -> list[str] | str:
    """Spec 2.2 `text_normalize`: a list of segments when `split`, else the normalised string.

    With `enabled=False`, empty text or `<|...|>` markup the text comes back untouched (one segment when
    `split`). `count_tokens` is the tokenizer length used by the en branch."""
    if not enabled or not text or has_markup(text):
        return [text] if split else text
    text = text.strip()
    zh = is_zh(text)
    text = normalize_zh(text) if zh else normalize_en(text)
    if not split:
        return text
    count = len if zh else count_tokens
    return [s for s in split_paragraph(text, count, zh, config) if not is_only_punctuation(s)]


__all__ = ["DEFAULT_SPLIT", "SplitConfig", "has_markup", "inflect_available", "is_only_punctuation", "is_zh",
           "normalize_en", "normalize_zh", "remove_unpaired_blanks", "spell_out_numbers", "split_paragraph",
           "text_normalize"]
