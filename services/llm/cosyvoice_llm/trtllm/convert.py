"""llm.pt -> Hugging Face Qwen2 checkpoint with CosyVoice2's flat speech vocabulary (spec 8.5).

    python -m cosyvoice_llm.trtllm.convert --model-dir DIR --out HF_DIR [--dtype bfloat16|float16|float32]

Reads `<DIR>/llm.pt` and `<DIR>/CosyVoice-BlankEN/` (config + tokenizer); writes to HF_DIR `config.json`,
`generation_config.json`, `model.safetensors`, tokenizer files and `COSYVOICE2_EXPORT.json`. This is the input of
TensorRT-LLM's Qwen `convert_checkpoint.py` (see services/llm/trtllm/build_engine.sh).

The flat vocabulary (cosyvoice_common.constants): text ids 0..SPEECH_ID_OFFSET-1, speech code k at
SPEECH_ID_OFFSET + k, then eos1..eos3, sos, task_id, padded to a multiple of VOCAB_PAD_MULTIPLE (FLAT_VOCAB_SIZE).

* Input embedding: text rows <- Qwen's `embed_tokens`, the 6564 rows from SPEECH_ID_OFFSET <- `speech_embedding`,
  sos/task_id <- `llm_embedding` rows 0/1, everything else zero (never a valid input).
* `lm_head` (untied, WITH bias): weight 0 and bias MASKED_LOGIT_BIAS everywhere except the 6564 speech-head rows,
  which take `llm_decoder`'s weight and bias. So a text, sos/task or padding id has logit -inf: it can never be
  sampled, whatever the hidden state.

Tiny models: their text tokenizer is shorter than SPEECH_ID_OFFSET (1120 ids, 1200 embedding rows). Speech ids
keep their real values anyway, so the gateway, token2wav and the engine see the same ids at every size: the
tokenizer is padded with never-matching filler tokens `<|text_pad_N|>` up to SPEECH_ID_OFFSET, the embedding rows
of ids the tiny model does not have are zero, and the export has FLAT_VOCAB_SIZE rows like the real one.

The lm-head bias: stock `transformers` Qwen2ForCausalLM and TensorRT-LLM's QWenForCausalLM build `lm_head`
without a bias, so a plain load silently drops it (text rows would then have logit exactly 0 and could be
sampled; the speech rows would lose their bias). The bias is stored as the extra tensor `lm_head.bias` (and
`use_bias: true` in config.json, as the reference export does) and is honoured by:
  * transformers: `cosyvoice_llm.trtllm.hf.load_exported_causal_lm` (stock class + a biased head);
  * TensorRT-LLM: `cosyvoice_llm.trtllm.headbias` copies it into the converted TRT-LLM checkpoint and
    `cosyvoice_llm.trtllm.build` builds with a QWenForCausalLM whose lm_head has a bias.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from cosyvoice_common.constants import (
    FLAT_EOS1_ID, FLAT_EOS2_ID, FLAT_EOS3_ID, FLAT_SOS_ID, FLAT_TASK_ID, FLAT_VOCAB_SIZE, SPEECH_CODEBOOK_SIZE,
    SPEECH_HEAD_SIZE, SPEECH_ID_OFFSET,
)

from ..model import LLM_CHECKPOINT_NAME, QWEN2_CONFIG_RELPATH, SOS_ROW, TASK_ROW, Qwen2LM, load_llm

# --- the export's vocabulary ---------------------------------------------------------------------------------------
SPEECH_TOKEN_FORMAT = "<|s_{}|>"
STOP_TOKENS = ("<|eos1|>", "<|eos2|>", "<|eos3|>")      # speech head 6561..6563
SOS_TOKEN = "<|sos|>"
TASK_TOKEN = "<|task_id|>"
TEXT_FILLER_FORMAT = "<|text_pad_{}|>"                   # tiny tokenizers only: ids up to SPEECH_ID_OFFSET
VOCAB_PAD_MULTIPLE = 128                                 # resize_token_embeddings(pad_to_multiple_of=128), spec 8.5
FLAT_STOP_IDS = (FLAT_EOS1_ID, FLAT_EOS2_ID, FLAT_EOS3_ID)
# -inf as the reference: exp(-inf) = 0 exactly, so no sampler (top-k/top-p or not) can draw these rows.
MASKED_LOGIT_BIAS = float("-inf")
HEAD_BIAS_CONFIG_KEY = "use_bias"                        # the reference export's (non-standard) config key
HEAD_BIAS_KEY = "lm_head.bias"
HEAD_WEIGHT_KEY = "lm_head.weight"
EMBEDDING_KEY = "model.embed_tokens.weight"
SAFETENSORS_NAME = "model.safetensors"
EXPORT_MARKER_NAME = "COSYVOICE2_EXPORT.json"
EXPORT_FORMAT_VERSION = 1
# generation_config.json: the released yaml's sampler (ras_sampling top_p 0.8, top_k 25) at temperature 1.
GENERATION_TOP_P = 0.8
GENERATION_TOP_K = 25
GENERATION_TEMPERATURE = 1.0
# User message -> <|sos|> text <|task_id|>; assistant message (prompt speech as <|s_N|> strings) verbatim, so
# `apply_chat_template(..., continue_final_message=True)` gives the spec 4.3 prompt layout.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '" + SOS_TOKEN + "' + message['content'] + '" + TASK_TOKEN + "' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] }}{%- endif %}"
    "{%- endfor %}"
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def padded_vocab_size(num_tokens: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return -(-num_tokens // multiple) * multiple


# The layout the constants promise; checked once here so a drifted constant fails at import, not in an engine.
_NUM_FLAT_TOKENS = FLAT_TASK_ID + 1
if (SPEECH_ID_OFFSET + SPEECH_HEAD_SIZE != FLAT_SOS_ID or FLAT_TASK_ID != FLAT_SOS_ID + 1
        or padded_vocab_size(_NUM_FLAT_TOKENS) != FLAT_VOCAB_SIZE):
    raise ImportError("cosyvoice_common.constants flat vocabulary does not match the spec 8.5 layout")


def added_speech_tokens() -> list[str]:
    """The 6566 tokens appended after the text vocabulary, in id order (spec 8.5 step 1)."""
    return [SPEECH_TOKEN_FORMAT.format(k) for k in range(SPEECH_CODEBOOK_SIZE)] + [*STOP_TOKENS, SOS_TOKEN, TASK_TOKEN]


@dataclass(frozen=True, slots=True)
class ExportConfig:
    model_dir: Path
    out_dir: Path
    dtype: str = "bfloat16"          # the reference publishes bf16; float32 for exact parity checks

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True, slots=True)
class ExportResult:
    out_dir: Path
    text_tokenizer_size: int          # CosyVoice2 text tokenizer length before padding/speech tokens
    text_embedding_rows: int          # rows copied from Qwen's embed_tokens
    vocab_size: int                   # rows of the exported embedding / lm_head


# --- tokenizer ------------------------------------------------------------------------------------------------------

def build_tokenizer(blank_en_dir: Path):
    """CosyVoice2's text tokenizer (spec 2.1), padded to SPEECH_ID_OFFSET with fillers, then the speech tokens.

    Returns (transformers tokenizer, text tokenizer length before padding)."""
    from tokenizers import AddedToken
    from cosyvoice_common.text import TextTokenizer

    tok = TextTokenizer.from_dir(blank_en_dir).tokenizer
    text_size = len(tok)
    if text_size > SPEECH_ID_OFFSET:
        raise ValueError(f"text tokenizer at {blank_en_dir} has {text_size} ids, more than SPEECH_ID_OFFSET "
                         f"{SPEECH_ID_OFFSET}: speech ids would collide with text ids")
    if text_size < SPEECH_ID_OFFSET:
        # Special + unnormalised so the fillers are matched only as whole strings no text contains.
        tok.add_tokens([AddedToken(TEXT_FILLER_FORMAT.format(i), special=True, normalized=False)
                        for i in range(text_size, SPEECH_ID_OFFSET)], special_tokens=True)
    tok.add_tokens(added_speech_tokens())
    expected = {SPEECH_TOKEN_FORMAT.format(0): SPEECH_ID_OFFSET, STOP_TOKENS[0]: FLAT_EOS1_ID,
                SOS_TOKEN: FLAT_SOS_ID, TASK_TOKEN: FLAT_TASK_ID}
    got = {t: tok.convert_tokens_to_ids(t) for t in expected}
    if got != expected or len(tok) != _NUM_FLAT_TOKENS:
        raise RuntimeError(f"tokenizer ids {got} (length {len(tok)}) do not match the flat vocabulary {expected} "
                           f"(length {_NUM_FLAT_TOKENS}); was a speech token already in {blank_en_dir}?")
    tok.chat_template = CHAT_TEMPLATE
    return tok, text_size


# --- weights ---------------------------------------------------------------------------------------------------------

def build_hf_state_dict(model: Qwen2LM, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF Qwen2ForCausalLM tensors (+ `lm_head.bias`) over the flat vocabulary, from a loaded Qwen2LM."""
    hidden = model.qwen2_config.hidden_size
    backbone = {k: v for k, v in model.llm.model.state_dict().items() if k != HEAD_WEIGHT_KEY}
    text_rows = model.text_vocab_size
    speech_rows = slice(SPEECH_ID_OFFSET, SPEECH_ID_OFFSET + SPEECH_HEAD_SIZE)
    with torch.no_grad():
        embed = torch.zeros(FLAT_VOCAB_SIZE, hidden)
        embed[:text_rows] = backbone[EMBEDDING_KEY][:text_rows].float()
        embed[speech_rows] = model.speech_embedding.weight.float()
        embed[FLAT_SOS_ID] = model.llm_embedding.weight[SOS_ROW].float()
        embed[FLAT_TASK_ID] = model.llm_embedding.weight[TASK_ROW].float()
        head_w = torch.zeros(FLAT_VOCAB_SIZE, hidden)
        head_w[speech_rows] = model.llm_decoder.weight.float()
        head_b = torch.full((FLAT_VOCAB_SIZE,), MASKED_LOGIT_BIAS)
        head_b[speech_rows] = model.llm_decoder.bias.float()
    state = {**backbone, EMBEDDING_KEY: embed, HEAD_WEIGHT_KEY: head_w, HEAD_BIAS_KEY: head_b}
    # safetensors refuses shared storage; contiguous copies in the target dtype.
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in state.items()}


def hf_config(qwen2_cfg: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    cfg = dict(qwen2_cfg)
    cfg.update({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": FLAT_VOCAB_SIZE,
        "tie_word_embeddings": False,
        "eos_token_id": FLAT_EOS1_ID,
        HEAD_BIAS_CONFIG_KEY: True,
        "torch_dtype": dtype,
    })
    cfg.pop("dtype", None)   # transformers 5 spelling; one key only (TensorRT-LLM reads torch_dtype)
    return cfg


def generation_config() -> dict[str, Any]:
    return {"eos_token_id": list(FLAT_STOP_IDS), "pad_token_id": FLAT_EOS1_ID, "do_sample": True,
            "temperature": GENERATION_TEMPERATURE, "top_p": GENERATION_TOP_P, "top_k": GENERATION_TOP_K}


def export(cfg: ExportConfig) -> ExportResult:
    from safetensors.torch import save_file

    model_dir = Path(cfg.model_dir)
    qwen2_path = model_dir / QWEN2_CONFIG_RELPATH
    if not (model_dir / LLM_CHECKPOINT_NAME).is_file() or not qwen2_path.is_file():
        raise FileNotFoundError(f"{model_dir} lacks {LLM_CHECKPOINT_NAME} or {QWEN2_CONFIG_RELPATH}")
    model = load_llm(model_dir, "cpu", torch.float32)
    tokenizer, text_size = build_tokenizer(qwen2_path.parent)
    if text_size > model.text_vocab_size:
        raise ValueError(f"tokenizer has {text_size} text ids but the Qwen2 embedding only "
                         f"{model.text_vocab_size} rows")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = build_hf_state_dict(model, DTYPES[cfg.dtype])
    save_file(state, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(json.loads(qwen2_path.read_text()), cfg.dtype),
                                                indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(), indent=2) + "\n")
    tokenizer.save_pretrained(str(out))
    result = ExportResult(out, text_size, model.text_vocab_size, FLAT_VOCAB_SIZE)
    marker = {"format_version": EXPORT_FORMAT_VERSION, "source": str(model_dir.resolve()), "dtype": cfg.dtype,
              "text_tokenizer_size": text_size, "text_embedding_rows": result.text_embedding_rows,
              "speech_id_offset": SPEECH_ID_OFFSET, "vocab_size": FLAT_VOCAB_SIZE,
              "end_id": FLAT_EOS1_ID, "stop_ids": list(FLAT_STOP_IDS), "lm_head_bias": HEAD_BIAS_KEY}
    (out / EXPORT_MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")   # last: its presence = complete
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cosyvoice_llm.trtllm.convert", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, type=Path, help="CosyVoice2 model dir (llm.pt, CosyVoice-BlankEN/)")
    p.add_argument("--out", required=True, type=Path, help="output Hugging Face checkpoint dir")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    result = export(ExportConfig(args.model_dir, args.out, args.dtype))
    print(f"wrote {result.out_dir}: vocab {result.vocab_size} (text tokenizer {result.text_tokenizer_size}, "
          f"speech ids from {SPEECH_ID_OFFSET}, end_id {FLAT_EOS1_ID}), dtype {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
