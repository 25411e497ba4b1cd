import hashlib

import pytest

from cosyvoice_common.text import (COSYVOICE2_SPECIAL_TOKENS, TINY_BASE_VOCAB_SIZE, TextTokenizer,
                                   write_tiny_bpe_tokenizer)

FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_bpe_tokenizer(tmp_path_factory.mktemp("blank_en"))


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return TextTokenizer.from_dir(tiny_dir)


def test_special_token_ids_follow_the_base_vocabulary(tok):
    base = TINY_BASE_VOCAB_SIZE
    assert tok.token_id("<|endoftext|>") == base          # tiny Qwen2 config bos/eos
    assert tok.token_id("<|im_start|>") == base + 1
    assert tok.token_id("<|im_end|>") == base + 2
    # Same offsets as the real model: <|endofprompt|> = 151643 + 3, [mn] = 151643 + 19, len = 151643 + 20.
    new_tokens = COSYVOICE2_SPECIAL_TOKENS[2:]
    assert [tok.token_id(t) for t in new_tokens] == list(range(base + 3, base + 3 + len(new_tokens)))
    assert tok.token_id("[mn]") == base + 19 and len(tok) == base + 20 <= 1200


def test_encode_matches_special_tokens_whole_and_adds_no_bos_eos(tok):
    ids = tok.encode("Hello<|endofprompt|>[breath]你好")
    assert tok.token_id("<|endofprompt|>") in ids and tok.token_id("[breath]") in ids
    assert ids[0] != tok.token_id("<|endoftext|>") and ids[-1] != tok.token_id("<|endoftext|>")
    assert tok.decode(ids) == "Hello<|endofprompt|>[breath]你好"
    assert all(i < TINY_BASE_VOCAB_SIZE for i in tok.encode("plain text, 中文 123"))
    # Language tags are ordinary text for CosyVoice2 (spec 2.1).
    assert len(tok.encode("<|en|>")) > 1


def test_writer_is_deterministic_and_keeps_config_json(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text('{"keep": true}')
    write_tiny_bpe_tokenizer(tmp_path)
    assert (tmp_path / "config.json").read_text() == '{"keep": true}'
    for name in FILES:
        assert hashlib.sha256((tmp_path / name).read_bytes()).digest() == \
            hashlib.sha256((tiny_dir / name).read_bytes()).digest(), name


def test_too_small_embedding_is_rejected(tmp_path):
    with pytest.raises(ValueError):
        write_tiny_bpe_tokenizer(tmp_path, vocab_size=1110)
