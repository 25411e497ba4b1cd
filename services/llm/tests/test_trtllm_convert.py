"""HF export of the tiny model (spec 8.5): tokenizer ids, config, logits parity with Qwen2LM, lm-head bias carried
into a (simulated) TensorRT-LLM checkpoint. CPU only, no tensorrt_llm."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cosyvoice_common.constants import (
    FLAT_EOS1_ID, FLAT_EOS2_ID, FLAT_EOS3_ID, FLAT_SOS_ID, FLAT_TASK_ID, FLAT_VOCAB_SIZE, SPEECH_CODEBOOK_SIZE,
    SPEECH_HEAD_SIZE, SPEECH_ID_OFFSET,
)
from cosyvoice_llm.model import QWEN2_CONFIG_RELPATH, build_prompt_flat_ids, load_llm
from cosyvoice_llm.trtllm import convert, headbias
from cosyvoice_llm.trtllm.hf import load_exported_causal_lm, read_head_bias

PARITY_ATOL = 1e-4
SPEECH_ROWS = slice(SPEECH_ID_OFFSET, SPEECH_ID_OFFSET + SPEECH_HEAD_SIZE)
TEXT = "Hello, this is a tiny test."
PROMPT_TEXT = "Good morning"
PROMPT_CODES = (0, 17, 6560, 4242)
GENERATED_CODES = (5, 6000, 123)


@pytest.fixture(scope="session")
def hf_export(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trtllm") / "hf"
    convert.export(convert.ExportConfig(tiny_model_dir, out, dtype="float32"))
    return out


@pytest.fixture(scope="session")
def text_tokenizer(tiny_model_dir):
    from cosyvoice_common.text import TextTokenizer
    return TextTokenizer.from_dir(tiny_model_dir / QWEN2_CONFIG_RELPATH.parent)


def test_tokenizer_ids(hf_export, text_tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_export / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == FLAT_TASK_ID + 1
    expected = {"<|s_0|>": SPEECH_ID_OFFSET, "<|s_1|>": SPEECH_ID_OFFSET + 1,
                f"<|s_{SPEECH_CODEBOOK_SIZE - 1}|>": SPEECH_ID_OFFSET + SPEECH_CODEBOOK_SIZE - 1,
                "<|eos1|>": FLAT_EOS1_ID, "<|eos2|>": FLAT_EOS2_ID, "<|eos3|>": FLAT_EOS3_ID,
                "<|sos|>": FLAT_SOS_ID, "<|task_id|>": FLAT_TASK_ID}
    assert {t: tok.token_to_id(t) for t in expected} == expected
    # Text ids unchanged (the tiny text tokenizer is padded, never renumbered); CosyVoice2 specials kept.
    assert tok.encode(TEXT, add_special_tokens=False).ids == text_tokenizer.encode(TEXT)
    assert tok.token_to_id("[breath]") == text_tokenizer.token_id("[breath]")
    # Speech tokens as text give the flat ids the gateway sends.
    ids = tok.encode("<|sos|>hi<|task_id|><|s_0|><|s_6560|>", add_special_tokens=False).ids
    assert ids[0] == FLAT_SOS_ID and ids[-3:] == [FLAT_TASK_ID, SPEECH_ID_OFFSET, SPEECH_ID_OFFSET + 6560]


def test_config_and_marker(hf_export):
    cfg = json.loads((hf_export / "config.json").read_text())
    assert cfg["vocab_size"] == FLAT_VOCAB_SIZE and FLAT_VOCAB_SIZE % convert.VOCAB_PAD_MULTIPLE == 0
    assert cfg["tie_word_embeddings"] is False and cfg["eos_token_id"] == FLAT_EOS1_ID and cfg["use_bias"] is True
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["torch_dtype"] == "float32"
    gen = json.loads((hf_export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [FLAT_EOS1_ID, FLAT_EOS2_ID, FLAT_EOS3_ID]
    marker = json.loads((hf_export / convert.EXPORT_MARKER_NAME).read_text())
    assert marker["speech_id_offset"] == SPEECH_ID_OFFSET and marker["text_tokenizer_size"] < SPEECH_ID_OFFSET


def test_logits_parity_and_text_rows_unsampleable(hf_export, tiny_model_dir, text_tokenizer):
    ours = load_llm(tiny_model_dir, "cpu", torch.float32)
    hf = load_exported_causal_lm(hf_export, torch.float32)
    flat = build_prompt_flat_ids(text_tokenizer.encode(TEXT), text_tokenizer.encode(PROMPT_TEXT), PROMPT_CODES)
    flat += [SPEECH_ID_OFFSET + c for c in GENERATED_CODES]
    ids = torch.tensor([flat])
    with torch.no_grad():
        expected = ours.llm_decoder(ours.forward_hidden(ids))[0]
        logits = hf(input_ids=ids).logits[0].float()
    assert logits.shape == (len(flat), FLAT_VOCAB_SIZE)
    torch.testing.assert_close(logits[:, SPEECH_ROWS], expected, atol=PARITY_ATOL, rtol=0)
    # Every text, sos/task and padding row is -inf at every position: probability exactly 0.
    assert torch.isneginf(logits[:, :SPEECH_ID_OFFSET]).all()
    assert torch.isneginf(logits[:, SPEECH_ROWS.stop:]).all()
    probs = logits.softmax(-1)
    assert probs[:, :SPEECH_ID_OFFSET].sum() == 0 and probs[:, SPEECH_ROWS.stop:].sum() == 0
    draws = torch.multinomial(probs, 2000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert ((draws >= SPEECH_ROWS.start) & (draws < SPEECH_ROWS.stop)).all()


def test_headbias_into_tp2_trtllm_checkpoint(hf_export, tmp_path):
    """A TensorRT-LLM checkpoint as convert_checkpoint.py writes it for tp 2 (lm_head rows split per rank)."""
    from safetensors.torch import load_file, save_file

    bias = read_head_bias(hf_export)
    weight = load_file(str(hf_export / convert.SAFETENSORS_NAME))[convert.HEAD_WEIGHT_KEY]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(
        {"architecture": "Qwen2ForCausalLM", "dtype": "float32",
         "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1}}))
    for rank, rows in enumerate(weight.chunk(2)):
        save_file({convert.HEAD_WEIGHT_KEY: rows.contiguous()}, str(ckpt / f"rank{rank}.safetensors"))
    check = [sys.executable, "-m", "cosyvoice_llm.trtllm.headbias", "--check", "--ckpt-dir", str(ckpt)]
    assert subprocess.run(check, capture_output=True).returncode == 1
    changed = headbias.add_head_bias(ckpt, hf_export)
    assert [p.name for p in changed] == ["rank0.safetensors", "rank1.safetensors"]
    got = torch.cat([load_file(str(p))[convert.HEAD_BIAS_KEY] for p in changed])
    torch.testing.assert_close(got, bias)
    assert headbias.has_head_bias(ckpt) and subprocess.run(check, capture_output=True).returncode == 0


def test_headbias_rejects_foreign_checkpoint(hf_export, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"mapping": {"world_size": 1, "tp_size": 1}}))
    save_file({convert.HEAD_WEIGHT_KEY: torch.zeros(8, 4)}, str(tmp_path / "rank0.safetensors"))
    with pytest.raises(headbias.HeadBiasError, match="rows"):
        headbias.add_head_bias(tmp_path, hf_export)
    assert not headbias.has_head_bias(tmp_path)
