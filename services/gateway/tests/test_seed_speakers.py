"""Seed drop-in: a seed-format spk2info.pt read without torch (cosyvoice_gateway.torchfile) into the registry."""
import asyncio
import pickle

import numpy as np
import pytest
import torch

from cosyvoice_gateway import torchfile
from cosyvoice_gateway.seed_speakers import features_from_entry, import_spk2info, read_spk2info
from cosyvoice_gateway.spk2info import Spk2InfoCache, Spk2InfoConfig


def test_torchfile_reads_what_torch_saved(tmp_path):
    obj = {"a": torch.arange(12, dtype=torch.int32).reshape(3, 4), "f": torch.randn(2, 5),
           "h": torch.randn(3).half(), "b": torch.randn(4, 3).bfloat16().t(), "s": "text", "n": [1, 2.5],
           "scalar": torch.tensor(7)}
    torch.save(obj, tmp_path / "x.pt")
    got = torchfile.load(tmp_path / "x.pt")
    assert got["s"] == "text" and got["n"] == [1, 2.5] and int(got["scalar"]) == 7
    for key in ("a", "f", "h"):
        assert got[key].dtype == obj[key].numpy().dtype and np.array_equal(got[key], obj[key].numpy())
    assert np.array_equal(got["b"], obj["b"].float().numpy())       # bfloat16 -> float32, strides kept


class Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_torchfile_refuses_any_other_pickled_global(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(torchfile.TorchFileError, match="print"):
        torchfile.load(tmp_path / "evil.pt")


def _recipe_entry(tokens=40, text_ids=(5, 6, 7)):
    g = torch.Generator().manual_seed(0)
    return {"name": "001", "prompt_text": "Hi there.", "prompt_text_token": torch.tensor([text_ids], dtype=torch.int32),
            "speech_token": torch.randint(0, 6561, (1, tokens), generator=g, dtype=torch.int32),
            "speech_feat": torch.randn(1, 2 * tokens + 1, 80, generator=g), "embedding": torch.randn(1, 192, generator=g)}


def _reference_entry(tokens=30):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 6561, (1, tokens), generator=g, dtype=torch.int32)
    emb = torch.randn(1, 192, generator=g)
    return {"prompt_text": torch.tensor([[9, 8]], dtype=torch.int32), "prompt_text_len": torch.tensor([2]),
            "llm_prompt_speech_token": codes, "llm_prompt_speech_token_len": torch.tensor([tokens]),
            "flow_prompt_speech_token": codes, "flow_prompt_speech_token_len": torch.tensor([tokens]),
            "prompt_speech_feat": torch.randn(1, 2 * tokens, 80, generator=g),
            "prompt_speech_feat_len": torch.tensor([2 * tokens]), "llm_embedding": emb, "flow_embedding": emb}


def test_both_seed_layouts_become_aligned_prompt_features(tmp_path):
    torch.save({"001": _recipe_entry(), "alice": _reference_entry(), "broken": {"embedding": torch.zeros(1, 192)}},
               tmp_path / "spk2info.pt")
    speakers = read_spk2info(tmp_path / "spk2info.pt")
    assert set(speakers) == {"001", "alice"}                    # the broken entry is skipped, not fatal
    recipe, ref = speakers["001"], speakers["alice"]
    assert recipe.speech_codes.shape == (40,) and recipe.speech_feat.shape == (80, 80)
    assert recipe.prompt_text == "Hi there." and recipe.text_ids.tolist() == [5, 6, 7]
    assert ref.speech_codes.shape == (30,) and ref.text_ids.tolist() == [9, 8] and ref.prompt_text
    assert ref.spk_embedding.shape == (192,)


def test_import_registers_new_speakers_and_leaves_registered_ones(tmp_path, redis_server):
    torch.save({"001": _recipe_entry(), "alice": _reference_entry()}, tmp_path / "spk2info.pt")

    async def run():
        cache = Spk2InfoCache(Spk2InfoConfig(url=redis_server.url, model_revision=f"seed-{tmp_path.name}"))
        try:
            mine = features_from_entry(torchfile.load(tmp_path / "spk2info.pt")["alice"])
            await cache.register_speaker("alice", mine)
            added = await import_spk2info(cache, tmp_path / "spk2info.pt")
            again = await import_spk2info(cache, tmp_path / "spk2info.pt")
            names = sorted(s.speaker_id for s in await cache.list_speakers())
            return added, again, names
        finally:
            await cache.close()
    added, again, names = asyncio.run(run())
    assert added == ["001"] and again == [] and names == ["001", "alice"]
