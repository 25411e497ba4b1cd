"""CosyVoice2 text tokenizer: the Qwen2 byte-level BPE plus CosyVoice2's added special tokens (spec 2.1).

`TextTokenizer.from_dir(<model>/CosyVoice-BlankEN)` gives the ids the reference LLM was trained with;
`write_tiny_bpe_tokenizer` writes a small deterministic vocabulary of the same kind for the tiny model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen2's own special tokens, right after the base vocabulary, in id order.
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# CosyVoice2Tokenizer's additional special tokens, in the order of its add_special_tokens call (spec 2.1).
# The first two already exist (keep their ids); the rest get consecutive new ids.
COSYVOICE2_SPECIAL_TOKENS = (
    IM_START, IM_END, "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]", "[laughter]",
    "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>", "[hissing]",
    "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
)
ENDOFPROMPT = "<|endofprompt|>"

# The tiny model's Qwen2 config: vocab 1200 rows, bos = eos = 1100 -> 1100 base BPE tokens.
TINY_BASE_VOCAB_SIZE = 1100
TINY_EMBEDDING_ROWS = 1200
_BYTE_ALPHABET_SIZE = 256
_QWEN2_MODEL_MAX_LENGTH = 32768

# Qwen2's pre-tokenizer split pattern (contractions, letters, single digits, punctuation, spaces).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Built-in training text for the tiny BPE: a little English and Chinese so both scripts get merges.
_TINY_CORPUS_EN = (
    "Hello, this is a tiny text to speech model. It reads numbers like 1, 2, 3 and 2025 aloud. "
    "The quick brown fox jumps over the lazy dog while the speaker takes a short breath. "
    "Streaming synthesis returns the first audio chunk quickly, then keeps going until the sentence ends. "
    "Please speak slowly and clearly; the voice prompt sets the timbre, the text sets the words. "
    "We are testing a serving stack with a language model, a flow decoder and a neural vocoder. "
    "What time is it? It is half past seven in the evening, and the weather is calm and warm. "
    "She said: \"I can't believe it's already done!\" He laughed, coughed, and sighed. "
    "Good morning everyone, welcome to the meeting about speech tokens, mel frames and sample rates. "
)
_TINY_CORPUS_ZH = (
    "你好，欢迎使用语音合成服务。今天天气很好，我们一起去公园散步吧。"
    "这是一个很小的测试模型，它可以把文字变成声音。请慢慢地、清楚地说话。"
    "北京是中国的首都，上海是一座美丽的城市。我喜欢听音乐，也喜欢看书和写字。"
    "时间过得真快，一年又一年，春夏秋冬，四季轮回。谢谢大家的帮助和支持！"
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。"
)


@dataclass(frozen=True, slots=True)
class TextTokenizer:
    """Encode text to Qwen2 ids with CosyVoice2's special tokens (matched whole, no BOS/EOS added)."""
    tokenizer: object   # a transformers fast tokenizer

    @classmethod
    def from_dir(cls, blank_en_dir: str | Path) -> "TextTokenizer":
        from tokenizers import AddedToken
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(blank_en_dir))
        # One add call, in the reference's order: existing tokens keep their ids, new ones are appended.
        tok.add_special_tokens({"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT})
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in COSYVOICE2_SPECIAL_TOKENS],
                       special_tokens=True)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    def __len__(self) -> int:
        return len(self.tokenizer)


def _train_tiny_bpe(base_vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=base_vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    # Repeat the corpus with varied casing/punctuation so there are enough distinct pairs to merge.
    lines = []
    for text in (_TINY_CORPUS_EN, _TINY_CORPUS_ZH):
        for sentence in text.replace("。", "。\n").replace(". ", ".\n").splitlines():
            lines += [sentence, sentence.upper(), sentence.lower(), " ".join(reversed(sentence.split(" ")))]
    lines += [" ".join(f"{a}{b}" for a in "abcdefghijklmnopqrstuvwxyz" for b in "aeiouy")]
    lines += ["".join(chr(c) for c in range(0x4E00, 0x4E00 + 400))]   # common CJK block start
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def write_tiny_bpe_tokenizer(out_dir: str | Path, vocab_size: int = TINY_EMBEDDING_ROWS,
                             base_vocab_size: int = TINY_BASE_VOCAB_SIZE) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json of a small Qwen2-style byte-level BPE.

    Base vocabulary `base_vocab_size` tokens, then <|endoftext|>, <|im_start|>, <|im_end|> (so
    <|endoftext|> = base_vocab_size, the tiny Qwen2 config's bos/eos); CosyVoice2's tokens follow when
    loaded with TextTokenizer. Deterministic: identical files on every run. Never touches config.json.
    """
    needed = base_vocab_size + len(QWEN_SPECIAL_TOKENS) + len(COSYVOICE2_SPECIAL_TOKENS) - 2
    if needed > vocab_size:
        raise ValueError(f"{needed} token ids do not fit the {vocab_size}-row embedding")
    trained = _train_tiny_bpe(base_vocab_size)
    state = json.loads(trained.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges = state["model"]["merges"]
    if len(vocab) != base_vocab_size:
        raise RuntimeError(f"tiny BPE training produced {len(vocab)} tokens, expected {base_vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (out / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
    merge_lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")
    added = {
        str(base_vocab_size + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}
        for i, t in enumerate(QWEN_SPECIAL_TOKENS)
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": _QWEN2_MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return out
