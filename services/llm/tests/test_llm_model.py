import json
import shutil
from pathlib import Path

import pytest
import torch

from cosyvoice_common.constants import FLAT_SOS_ID, FLAT_TASK_ID, SPEECH_ID_OFFSET
from cosyvoice_common.errors import CheckpointError, InvalidRequestError
from cosyvoice_llm.model import Qwen2LM, build_prompt_flat_ids, load_llm


def _golden_copy(golden_dir: Path, tmp_path: Path) -> Path:
    (tmp_path / "CosyVoice-BlankEN").mkdir()
    shutil.copy(golden_dir / "CosyVoice-BlankEN" / "config.json", tmp_path / "CosyVoice-BlankEN" / "config.json")
    shutil.copy(golden_dir / "config.json", tmp_path / "config.json")
    return tmp_path


def test_state_dict_keys_match_golden_and_full_size_key_lists(golden_dir: Path):
    keys = json.loads((golden_dir / "tiny_keys.json").read_text())["llm.pt"]
    cfg = json.loads((golden_dir / "config.json").read_text())["llm"]
    model = Qwen2LM.from_config(cfg, json.loads((golden_dir / "CosyVoice-BlankEN" / "config.json").read_text()))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == keys
    full = json.loads((golden_dir / "full_size_config.json").read_text())
    full_keys = json.loads((golden_dir / "full_size_keys.json").read_text())["llm.pt"]
    with torch.device("meta"):
        big = Qwen2LM.from_config(full["llm"], full["llm"]["llm"]["qwen2_config"])
    assert {k: list(v.shape) for k, v in big.state_dict().items()} == full_keys


def test_loader_names_missing_and_unexpected_keys(golden_dir: Path, tmp_path: Path):
    d = _golden_copy(golden_dir, tmp_path)
    state = torch.load(golden_dir / "llm.pt", weights_only=True)
    del state["llm.model.model.layers.1.mlp.up_proj.weight"]
    state["llm.model.model.layers.9.bogus.weight"] = torch.zeros(2)
    torch.save(state, d / "llm.pt")
    with pytest.raises(CheckpointError) as e:
        load_llm(d)
    assert "llm.model.model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "llm.model.model.layers.9.bogus.weight" in str(e.value)
    assert "missing" in str(e.value) and "unexpected" in str(e.value)


def test_loader_names_shape_mismatch(golden_dir: Path, tmp_path: Path):
    d = _golden_copy(golden_dir, tmp_path)
    state = torch.load(golden_dir / "llm.pt", weights_only=True)
    state["llm_embedding.weight"] = torch.zeros(3, state["llm_embedding.weight"].shape[1])
    torch.save(state, d / "llm.pt")
    with pytest.raises(CheckpointError, match="llm_embedding.weight"):
        load_llm(d)


def test_loader_ties_text_head_and_loads_values(golden_dir: Path):
    model = load_llm(golden_dir)
    state = torch.load(golden_dir / "llm.pt", weights_only=True)
    assert model.llm.model.lm_head.weight is model.llm.backbone.embed_tokens.weight
    assert torch.equal(model.speech_embedding.weight, state["speech_embedding.weight"])
    assert not model.training


def test_embed_flat_routes_each_id_space(tiny_model: Qwen2LM):
    ids = torch.tensor([[FLAT_SOS_ID, 5, 96, FLAT_TASK_ID, SPEECH_ID_OFFSET, SPEECH_ID_OFFSET + 6563]])
    e = tiny_model.embed_flat(ids)[0]
    assert torch.equal(e[0], tiny_model.llm_embedding.weight[0])
    assert torch.equal(e[1], tiny_model.llm.backbone.embed_tokens.weight[5])
    assert torch.equal(e[2], tiny_model.llm.backbone.embed_tokens.weight[96])
    assert torch.equal(e[3], tiny_model.llm_embedding.weight[1])
    assert torch.equal(e[4], tiny_model.speech_embedding.weight[0])
    assert torch.equal(e[5], tiny_model.speech_embedding.weight[6563])


def test_prompt_layout_and_validation(tiny_model: Qwen2LM):
    ids = build_prompt_flat_ids([7, 8], [3], [0, 6560])
    assert ids == [FLAT_SOS_ID, 3, 7, 8, FLAT_TASK_ID, SPEECH_ID_OFFSET, SPEECH_ID_OFFSET + 6560]
    with pytest.raises(InvalidRequestError, match="prompt_speech_codes"):
        build_prompt_flat_ids([7], [], [6561])
    with pytest.raises(InvalidRequestError, match="input_ids"):
        tiny_model.validate_flat_ids([FLAT_SOS_ID, 97])   # text id beyond the tiny vocab


@torch.inference_mode()
def test_cached_prefill_and_batched_decode_match_full_pass(tiny_model: Qwen2LM):
    """Two slots of different lengths decoded in one batched step equal cache-free passes of each sequence."""
    gen = torch.Generator().manual_seed(3)
    seqs = [build_prompt_flat_ids(torch.randint(0, 97, (n,), generator=gen).tolist(), [],
                                  torch.randint(0, 6561, (m,), generator=gen).tolist()) for n, m in ((4, 3), (9, 0))]
    nxt = [11, 4000]
    tiny_model.setup_caches(max_batch_slots=3, max_seq_len=32)
    slots = torch.tensor([2, 0])
    for s, seq in zip(slots, seqs):
        tiny_model.prefill(torch.tensor(seq), s[None])
    positions = torch.tensor([len(s) for s in seqs])
    logp = tiny_model.decode_step(torch.tensor(nxt), positions, slots)
    for b, seq in enumerate(seqs):
        full = tiny_model.forward_hidden(torch.tensor([seq + [SPEECH_ID_OFFSET + nxt[b]]]))
        want = tiny_model.speech_logp(full[0, -1])
        torch.testing.assert_close(logp[b], want, atol=1e-5, rtol=0)


def test_config_rejects_unsupported_features(tiny_configs):
    TINY_LLM, TINY_QWEN2 = tiny_configs
    with pytest.raises(ValueError, match="rope_scaling"):
        Qwen2LM.from_config(TINY_LLM, {**TINY_QWEN2, "rope_scaling": {"type": "yarn"}})
    with pytest.raises(ValueError, match="hidden_size"):
        Qwen2LM.from_config({**TINY_LLM, "llm_input_size": 16}, TINY_QWEN2)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Qwen2LM.from_config(TINY_LLM, {**TINY_QWEN2, "num_key_value_heads": 3})


@torch.inference_mode()
def test_decode_over_a_slot_slice_equals_decode_over_slot_ids(tiny_model: Qwen2LM):
    tiny_model.setup_caches(max_batch_slots=2, max_seq_len=16)
    seqs = [build_prompt_flat_ids([1, 2, 3], [], [7]), build_prompt_flat_ids([4], [], [])]
    for s, seq in enumerate(seqs):
        tiny_model.prefill(torch.tensor(seq), torch.tensor([s]))
    positions = torch.tensor([len(s) for s in seqs])
    by_ids = tiny_model.decode_step(torch.tensor([5, 6]), positions, torch.tensor([0, 1]))
    by_slice = tiny_model.decode_step(torch.tensor([5, 6]), positions, slice(0, 2))   # rewrites the same entries
    torch.testing.assert_close(by_slice, by_ids, atol=0, rtol=0)
