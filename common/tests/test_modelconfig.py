"""modelconfig: HyperPyYAML reading (the released format), yaml round trip, model revision."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cosyvoice_common import modelconfig as mc
from cosyvoice_common.golden import golden_dir

REPO = Path(__file__).resolve().parents[2]
REFERENCE_YAML = REPO / "tools" / "tests" / "data" / "format_sample.yaml"
GOLDEN = golden_dir()
needs_golden = pytest.mark.skipif(not (GOLDEN / "config.json").is_file(), reason=f"golden set not at {GOLDEN}")


def _drop(node, keys=("pretrain_path", "qwen_pretrain_path", "token_path")):
    if isinstance(node, dict):
        return {k: _drop(v, keys) for k, v in node.items() if k not in keys}
    if isinstance(node, list):
        return [_drop(v, keys) for v in node]
    return node


def test_reads_released_yaml_tags_refs_and_arithmetic():
    cfg = mc.parse_hyperpyyaml(REFERENCE_YAML.read_text(), overrides={"qwen_pretrain_path": "/m/CosyVoice-BlankEN"})
    assert not any(k.startswith("__") for k in cfg)            # the !apply seed lines are not config
    assert cfg["llm"]["__class__"] == "cosyvoice.llm.llm.Qwen2LM"
    assert cfg["llm"]["llm_input_size"] == 896                 # !ref <llm_input_size>
    assert cfg["llm"]["llm"]["pretrain_path"] == "/m/CosyVoice-BlankEN"   # override before refs resolve
    assert cfg["llm"]["sampling"] == {"__fn__": "cosyvoice.utils.common.ras_sampling",
                                      "top_p": 0.8, "top_k": 25, "win_size": 10, "tau_r": 0.1}
    est = cfg["flow"]["decoder"]["estimator"]
    assert est["static_chunk_size"] == 50                      # !ref <chunk_size> * <token_mel_ratio>
    assert est["channels"] == [256]
    cfm = cfg["flow"]["decoder"]["cfm_params"]                 # !new:omegaconf.DictConfig {content: ...}
    assert cfm["sigma_min"] == pytest.approx(1e-6) and isinstance(cfm["sigma_min"], float)
    assert cfg["hift"]["sampling_rate"] == 24000
    assert cfg["hift"]["resblock_dilation_sizes"] == [[1, 3, 5]] * 3
    assert cfg["mel_spec_transform1"]["fmax"] is None
    assert cfg["feat_extractor"]["fmax"] == 8000
    assert cfg["hifigan"]["generator"] is cfg["hift"]          # !ref to a whole node
    assert cfg["get_tokenizer"]["token_path"] == "/m/CosyVoice-BlankEN"
    assert cfg["data_pipeline"][1]["__fn__"] == "cosyvoice.dataset.processor.tokenize"
    assert cfg["train_conf"]["optim_conf"]["lr"] == pytest.approx(1e-5)


def test_ref_inside_string_unknown_tag_and_cycle():
    text = "root: /data\nsub: !ref <root>/models\nodd: !weird:thing {a: 1}\nn: !ref <m>\nm: !ref <n>\n"
    with pytest.raises(ValueError, match="cycle"):
        mc.parse_hyperpyyaml(text)
    cfg = mc.parse_hyperpyyaml(text.replace("n: !ref <m>\nm: !ref <n>\n", "t: !tuple [1, 2]\nc: !copy <odd>\n"))
    assert cfg["sub"] == "/data/models"
    assert cfg["odd"] == {"__tag__": "!weird:thing", "__value__": {"a": 1}}
    assert cfg["t"] == (1, 2)
    assert cfg["c"] == cfg["odd"] and cfg["c"] is not cfg["odd"]
    with pytest.raises(KeyError):
        mc.parse_hyperpyyaml("a: !ref <missing>\n")


def test_released_yaml_round_trips_through_our_writer(tmp_path):
    released = mc.parse_hyperpyyaml(REFERENCE_YAML.read_text())
    inference_part = {k: released[k] for k in ("sample_rate", "llm_input_size", "llm_output_size", "spk_embed_dim",
                                                "token_frame_rate", "token_mel_ratio", "chunk_size",
                                                "num_decoding_left_chunks", "llm", "flow", "hift",
                                                "get_tokenizer", "allowed_special", "feat_extractor")}
    mc.write_model_yaml(inference_part, tmp_path / mc.YAML_NAME)
    text = (tmp_path / mc.YAML_NAME).read_text()
    assert "static_chunk_size: !ref <chunk_size> * <token_mel_ratio>" in text   # released layout, not numbers
    assert "cfm_params: !new:omegaconf.DictConfig" in text
    back = mc.load_model_config(tmp_path)
    assert back["llm"]["llm"]["pretrain_path"] == str(tmp_path / mc.QWEN2_DIR_NAME)
    assert _drop(mc.strip_to_yaml(back)) == _drop(inference_part)
    # load_model_config adds what the reference hard-codes, sized from the yaml.
    extra = back["flow"]["encoder"]["__not_in_yaml__"]
    assert extra["pre_lookahead_layer"] == {"in_channels": 512, "channels": 512, "pre_lookahead_len": 3}
    assert extra["num_up_blocks"] == 4


@needs_golden
def test_golden_config_round_trips_and_matches_source_defaults(tmp_path):
    golden = mc.load_golden_config(GOLDEN)
    mc.write_model_yaml(golden, tmp_path / mc.YAML_NAME)
    (tmp_path / mc.QWEN2_DIR_NAME).mkdir()
    shutil.copy(GOLDEN / mc.QWEN2_DIR_NAME / "config.json", tmp_path / mc.QWEN2_DIR_NAME / "config.json")
    back = mc.load_model_config(tmp_path)
    assert _drop(mc.strip_to_yaml(back)) == _drop(mc.strip_to_yaml(golden))
    for key, value in golden["flow"]["encoder"]["__not_in_yaml__"].items():
        if key != "note":
            assert back["flow"]["encoder"]["__not_in_yaml__"][key] == value, key
    assert mc.qwen2_config_of(back)["hidden_size"] == golden["llm"]["llm"]["qwen2_config"]["hidden_size"]
    assert back["cosyvoice2_model"] == {k: v for k, v in golden["cosyvoice2_model"].items() if k != "speech_window"}


def test_missing_yaml_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        mc.load_model_config(tmp_path)


def test_model_revision_is_content_based(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / mc.YAML_NAME).write_text("sample_rate: 24000\n")
    for name in mc.CHECKPOINT_NAMES:
        (a / name).write_bytes(bytes(range(256)) * 4100)    # > 1 MiB so head and tail are both sampled
    rev = mc.model_revision(a)
    assert len(rev) == mc.REVISION_HEX_CHARS
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert mc.model_revision(b) == rev                      # a copy (new mtimes) keeps the revision
    data = bytearray((b / "flow.pt").read_bytes())
    data[-1] ^= 1
    (b / "flow.pt").write_bytes(bytes(data))
    assert mc.model_revision(b) != rev                      # a changed tail changes it
