"""Shared fixtures: the golden tiny checkpoint (skipped with a reason when absent) and a random tiny model."""
from pathlib import Path

import pytest
import torch
from cosyvoice_common.golden import MISSING_HINT, golden_dir
from cosyvoice_llm.model import Qwen2LM

# data/golden/tiny-seed1 (`make golden`), as every other test finds it (cosyvoice_common.golden)
GOLDEN_DIR = golden_dir()

TINY_QWEN2 = {
    "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "hidden_act": "silu",
}
TINY_LLM = {"llm_input_size": 32, "llm_output_size": 32, "speech_token_size": 6561}


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN_DIR / "llm.npz").is_file():
        pytest.skip(MISSING_HINT)
    return GOLDEN_DIR


@pytest.fixture()
def tiny_model() -> Qwen2LM:
    torch.manual_seed(0)
    model = Qwen2LM.from_config(TINY_LLM, TINY_QWEN2).eval()
    with torch.no_grad():
        model.llm_decoder.weight.mul_(4.0)   # sharper logits so greedy margins are not razor thin
    return model


@pytest.fixture()
def tiny_configs() -> tuple[dict, dict]:
    """(llm section, Qwen2 config) of a random tiny model."""
    return dict(TINY_LLM), dict(TINY_QWEN2)
