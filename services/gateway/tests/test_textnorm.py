"""Spec 2.2 text frontend: splitting rules (checked as invariants of the spec's rules), zh/en normalisation."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosyvoice_gateway import textnorm
from cosyvoice_gateway.textnorm import SplitConfig, split_paragraph, text_normalize


def check_split_rules(text, segments, length, config, terminator):
    """The spec 2.2 rules as invariants (our own oracle; no reference code):
    nothing lost or reordered, every segment ends a sentence, a new segment starts only once the current
    one is longer than token_min_n, and a short tail (< merge_len) is merged into the previous segment."""
    joined = "".join(segments)
    assert joined in (text, text + terminator)
    assert all(seg and seg.rstrip('"\u201d')[-1] in ".?!;:\u3002\uff1f\uff01\uff1b\uff1a\u3001" for seg in segments)
    assert all(length(seg) > config.token_min_n for seg in segments[:-1])
    if len(segments) > 1:
        assert length(segments[-1]) >= config.merge_len


def words(text: str) -> list[str]:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return text.split()


def word_count(text: str) -> int:
    return len(words(text))


EN_SENTENCES = ["The quick brown fox jumps over the lazy dog.", "What time is it?", "Wow!",
                'She said "hello."', "Streaming returns the first chunk quickly; then it keeps going."]
ZH_SENTENCES = ["你好，欢迎使用语音合成服务。", "今天天气很好！", "我们一起去公园散步吧？", "他说：“好。”"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(EN_SENTENCES), min_size=1, max_size=40), st.booleans())
def test_english_split_matches_the_reference_rules(sentences, trailing_fragment):
    text = " ".join(sentences) + (" and no full stop" if trailing_fragment else "")
    config = SplitConfig(16, 10, 5)
    got = split_paragraph(text, word_count, zh=False, config=config)
    check_split_rules(text, got, word_count, config, ".")
    assert "".join(got).replace(" ", "").startswith(text.replace(" ", "")[:10])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(ZH_SENTENCES), min_size=1, max_size=40))
def test_chinese_split_counts_characters_like_the_reference(sentences):
    text = "".join(sentences)
    check_split_rules(text, split_paragraph(text, len, zh=True), len, SplitConfig(), "\u3002")


def test_long_text_is_cut_between_min_and_max_and_short_tail_merges():
    text = "".join(f"第{i}句话说得很长很长很长很长。" for i in range(40))   # 14 characters a piece
    segments = split_paragraph(text, len, zh=True)
    assert "".join(segments) == text
    assert all(60 < len(s) <= 80 + 14 for s in segments[:-1])
    assert len(segments[-1]) >= 20 or len(segments) == 1


def test_closing_quote_stays_with_its_sentence():
    assert split_paragraph('He said "go." Then left.', word_count, zh=False, config=SplitConfig(2, 1, 1)) == \
        ['He said "go."', " Then left."]


def test_missing_final_terminator_gets_a_full_stop():
    assert split_paragraph("hello there", word_count, zh=False) == ["hello there."]
    assert split_paragraph("你好", len, zh=True) == ["你好。"]


def test_quote_right_at_the_start_does_not_crash():
    assert split_paragraph('."abc', word_count, zh=False) == ["abc."]


def test_english_digits_become_words_when_inflect_is_installed():
    pytest.importorskip("inflect")
    assert text_normalize("I have 42 apples and 3 pears.", word_count, split=False) == \
        "I have forty-two apples and three pears."


def test_english_digits_stay_without_inflect(monkeypatch):
    monkeypatch.setattr(textnorm, "_inflect_engine", lambda: None)
    assert text_normalize("Room 101.", word_count, split=False) == "Room 101."


def test_chinese_punctuation_rules():
    out = text_normalize("面积是3m²， 价格（含税）是100 - 200元. 【注意】——`谢谢`，，", len, split=False)
    assert "平方" in out and "（" not in out and "【" not in out and "`" not in out
    # " - " survives blank removal only between ASCII characters, then becomes a comma (reference order).
    assert " - " not in out and "100，200元" in out
    assert out.endswith("谢谢。")
    assert "。" in out and "." not in out


def test_spaces_survive_only_between_ascii_words():
    assert textnorm.remove_unpaired_blanks("我 爱 CosyVoice two 模型") == "我爱CosyVoice two模型"


def test_markup_disabled_and_empty_text_are_left_untouched():
    marked = "<|en|>I have 3 cats"
    assert text_normalize(marked, word_count) == [marked]
    assert text_normalize("I have 3 cats", word_count, enabled=False) == ["I have 3 cats"]
    assert text_normalize("", word_count, split=False) == ""


def test_punctuation_only_segments_are_dropped():
    assert text_normalize("Hello there. ... !!!", word_count, config=SplitConfig(1, 1, 1)) == ["Hello there."]


def test_split_config_is_validated():
    with pytest.raises(ValueError):
        SplitConfig(token_max_n=10, token_min_n=20, merge_len=5)
