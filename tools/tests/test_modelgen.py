"""modelgen: released key layout (full size, meta device), a complete tiny model dir that every loader reads,
idempotence, and random weights that terminate."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from cosyvoice_common import modelconfig as mc
from cosyvoice_common.constants import SPEECH_EOS, SPEECH_STOP_IDS
from cosyvoice_common.golden import golden_dir
from cosyvoice_tools import modelgen as mg

GOLDEN = golden_dir()
needs_golden = pytest.mark.skipif(not (GOLDEN / "full_size_keys.json").is_file(), reason=f"no golden set at {GOLDEN}")


def _import(module: str, attr: str):
    return getattr(importlib.import_module(module), attr)


def _layout(sd) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sd.items()}


@needs_golden
@pytest.mark.parametrize("size, keys_file", [("full", "full_size_keys.json"), ("tiny", "tiny_keys.json")])
def test_state_dict_layout_matches_golden_keys_in_order(size, keys_file):
    want = json.loads((GOLDEN / keys_file).read_text())
    sds, _ = mg.build_state_dicts(mc.add_source_defaults(mg.model_config(size)), seed=1, device="meta")
    assert set(sds) == set(want)
    for name, sd in sds.items():
        assert all(t.device.type == "meta" for t in sd.values())
        assert list(_layout(sd).items()) == list(want[name].items()), name   # keys, shapes and order


@needs_golden
def test_tiny_config_is_the_golden_tiny_config():
    golden = mc.load_golden_config(GOLDEN)
    ours = mg.model_config("tiny")
    assert mc.strip_to_yaml({k: ours[k] for k in ("llm", "flow", "hift")}) == \
        {k: mc.strip_to_yaml(golden)[k] for k in ("llm", "flow", "hift")} | \
        {"llm": {**mc.strip_to_yaml(golden)["llm"],
                 "llm": {**mc.strip_to_yaml(golden)["llm"]["llm"], "pretrain_path": ""}}}
    assert mg.qwen2_config("tiny") == golden["llm"]["llm"]["qwen2_config"]


def test_full_size_layout_matches_the_model_classes_on_meta():
    cfg = mc.add_source_defaults(mg.model_config("full"))
    want = mg.param_shapes(cfg)
    builders = {
        mc.FLOW_CHECKPOINT_NAME: lambda: _import("cosyvoice_token2wav.flow", "CausalMaskedDiffWithXvec")
        .from_config(cfg["flow"]),
        mc.HIFT_CHECKPOINT_NAME: lambda: _import("cosyvoice_token2wav.hift", "HiFTGenerator")
        .from_config(cfg["hift"]),
        mc.LLM_CHECKPOINT_NAME: lambda: _import("cosyvoice_llm.model", "Qwen2LM")
        .from_config(cfg["llm"], mc.qwen2_config_of(cfg)),
    }
    for name, build in builders.items():
        with torch.device("meta"):
            module = build()
        assert _layout(module.state_dict()) == {k: list(v) for k, v in want[name].items()}, name


def test_eos_calibration_hits_the_target_share():
    gen = torch.Generator().manual_seed(0)
    d, rows = 64, 6564
    w = torch.randn(rows, d, generator=gen) / d ** 0.5 * mg.LLM_DECODER_SHARPEN
    b = torch.randn(rows, generator=gen) * mg.BIAS_STD
    norm_w = torch.ones(d)
    bias = mg.calibrate_eos_bias(w, b, norm_w, torch.Generator().manual_seed(1))
    hidden = torch.randn(512, d, generator=torch.Generator().manual_seed(2))
    logits = hidden @ w.T + b
    logits[:, SPEECH_EOS] = hidden @ w[SPEECH_EOS] + bias
    p_eos = logits.softmax(-1)[:, SPEECH_EOS]
    assert 0.02 < p_eos.median() < 0.8          # eos likely, yet never the whole nucleus by itself


# --- a generated tiny model directory -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    for mod, attr in (("cosyvoice_common.text", "write_tiny_bpe_tokenizer"),
                      ("cosyvoice_speaker.standin", "write_campplus_onnx"),
                      ("cosyvoice_tokenizer.standin", "write_speech_tokenizer_onnx")):
        _import(mod, attr)
    return mg.generate(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=3)


def test_tiny_dir_has_the_real_layout(tiny_dir):
    for path in mg.expected_files(tiny_dir):
        assert path.is_file(), path
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tiny_dir / mc.QWEN2_DIR_NAME / name).is_file()
    marker = json.loads((tiny_dir / mg.MARKER_NAME).read_text())
    assert (marker["size"], marker["seed"]) == ("tiny", 3)
    cfg = mc.load_model_config(tiny_dir)                       # the loader never needs the marker
    assert mc.strip_to_yaml(cfg)["flow"] == mc.strip_to_yaml(mg.model_config("tiny"))["flow"]
    assert mc.qwen2_config_of(cfg)["vocab_size"] == mg.SIZE_SPECS["tiny"].qwen_vocab_size
    assert len(mc.model_revision(tiny_dir)) == mc.REVISION_HEX_CHARS
    assert "RANDOM WEIGHTS" in mc.random_weights_notice(tiny_dir)             # said by make up, gateway, playground
    assert mc.random_weights_notice(tiny_dir / mc.QWEN2_DIR_NAME) == ""       # no marker: not announced


def test_checkpoints_are_float32_with_a_tied_lm_head(tiny_dir):
    want = mg.param_shapes(mc.load_model_config(tiny_dir))
    for name in mc.CHECKPOINT_NAMES:
        sd = torch.load(tiny_dir / name, weights_only=True)
        assert _layout(sd) == {k: list(v) for k, v in want[name].items()}
        assert list(sd) == list(want[name])
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in sd.values()), name
    llm = torch.load(tiny_dir / mc.LLM_CHECKPOINT_NAME, weights_only=True)
    assert llm[mg.TIED_LM_HEAD_KEY].data_ptr() == llm[mg.EMBED_TOKENS_KEY].data_ptr()
    bias = llm["llm_decoder.bias"]
    assert bias[SPEECH_EOS] > bias[:SPEECH_EOS].max() + 3      # spec 9.3: eos raised ...
    assert all(bias[s] == mg.STOP_FILL_BIAS for s in SPEECH_STOP_IDS[1:])   # ... fill ids silenced


def test_generation_is_deterministic_in_the_seed():
    cfg = mg.model_config("tiny")
    a, _ = mg.build_state_dicts(cfg, seed=5)
    b, _ = mg.build_state_dicts(cfg, seed=5)
    c, _ = mg.build_state_dicts(cfg, seed=6)
    key = "decoder.estimator.final_proj.weight"
    assert torch.equal(a[mc.FLOW_CHECKPOINT_NAME][key], b[mc.FLOW_CHECKPOINT_NAME][key])
    assert not torch.equal(a[mc.FLOW_CHECKPOINT_NAME][key], c[mc.FLOW_CHECKPOINT_NAME][key])


def test_generate_is_idempotent_and_protects_other_models(tiny_dir, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in mg.expected_files(tiny_dir)}
    mg.generate(tiny_dir, "tiny", seed=3)
    assert "already holds" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in mg.expected_files(tiny_dir)} == before
    with pytest.raises(FileExistsError):                      # same dir, other seed: needs --force
        mg.generate(tiny_dir, "tiny", seed=4)
    real = tmp_path / "real"
    real.mkdir()
    (real / mc.LLM_CHECKPOINT_NAME).write_bytes(b"not ours")
    assert mg.main(["--size", "tiny", "--out", str(real)]) == 2
    assert (real / mc.LLM_CHECKPOINT_NAME).read_bytes() == b"not ours"


def test_tiny_dir_loads_with_every_component_loader(tiny_dir):
    load_llm = _import("cosyvoice_llm.model", "load_llm")
    load_flow = _import("cosyvoice_token2wav.flow", "load_flow")
    load_hift = _import("cosyvoice_token2wav.hift", "load_hift")
    llm = load_llm(tiny_dir)
    assert llm.llm_decoder.weight.shape[0] == SPEECH_EOS + len(SPEECH_STOP_IDS)
    load_flow(tiny_dir, "cpu")
    load_hift(tiny_dir, "cpu")
    text_tok = _import("cosyvoice_common.text", "TextTokenizer").from_dir(tiny_dir / mc.QWEN2_DIR_NAME)
    assert len(text_tok) <= mg.SIZE_SPECS["tiny"].qwen_vocab_size
    import numpy as np
    wav16 = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    emb = _import("cosyvoice_speaker.encoder", "SpeakerEncoder")(tiny_dir).embed([wav16])
    assert emb.shape == (1, 192)
    codes = _import("cosyvoice_tokenizer.tokenizer", "SpeechTokenizer")(tiny_dir).tokenize([wav16])[0]
    assert len(codes) == 25                                    # 1 s of 16 kHz audio at 25 Hz


def test_random_llm_terminates_soon_after_min_len(tiny_dir):
    load_llm = _import("cosyvoice_llm.model", "load_llm")
    llm = load_llm(tiny_dir)
    text = list(range(100, 112))                               # 12 text tokens: min_len 24, max_len 240
    gen = torch.Generator().manual_seed(0)
    lengths = [len(list(llm.inference(text, generator=gen))) for _ in range(8)]
    assert all(2 * len(text) <= n < 20 * len(text) for n in lengths), lengths
    assert sum(lengths) / len(lengths) < 6 * len(text), lengths   # ends near 2-3 tokens per text token
