"""`cosyvoice_tools.download`: verification of generated (tiny, and full-size key/shape-only) and corrupted
model dirs, and a clear one-line failure when no hub is reachable."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cosyvoice_common import modelconfig as mc
from cosyvoice_common.golden import golden_dir
from cosyvoice_tools import download, modelgen
from cosyvoice_launcher.triton import free_ports

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosyvoice_tools.download", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture
def tiny_copy(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def write_full_size_shapes(out: Path, tiny_dir: Path, legacy_hift: bool = False) -> Path:
    """A full-size model dir whose checkpoints have every released key and shape but almost no bytes: each
    tensor is one float expanded (stride 0), which torch.save stores as a one-element storage."""
    out.mkdir(parents=True)
    cfg = modelgen.model_config("full")
    for name, shapes in modelgen.param_shapes(cfg).items():
        state = {k: torch.zeros(1).expand(*shape) for k, shape in shapes.items()}
        if legacy_hift and name == mc.HIFT_CHECKPOINT_NAME:   # the 2024 release spelling, as the loader accepts
            state = {"generator." + k.replace("parametrizations.weight.original0", "weight_g")
                     .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
        torch.save(state, out / name)
    mc.write_model_yaml(cfg, out / mc.YAML_NAME)
    qwen_dir = out / mc.QWEN2_DIR_NAME
    shutil.copytree(tiny_dir / mc.QWEN2_DIR_NAME, qwen_dir)
    (qwen_dir / mc.QWEN2_CONFIG_NAME).write_text(json.dumps(
        {**modelgen.QWEN2_CONFIG_EXTRA, **cfg["llm"]["llm"]["qwen2_config"]}))
    for name in (mc.CAMPPLUS_ONNX_NAME, mc.SPEECH_TOKENIZER_ONNX_NAME):
        shutil.copy(tiny_dir / name, out / name)
    (out / modelgen.MARKER_NAME).write_text(json.dumps({"size": "full"}))
    return out


def test_generated_tiny_model_verifies(tiny_model_dir):
    result = run_cli("--model-dir", str(tiny_model_dir), "--verify-only")
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout and "llm.pt" in result.stdout


def test_full_size_keys_and_shapes_verify_without_gigabytes(tiny_model_dir, tmp_path):
    model_dir = write_full_size_shapes(tmp_path / "full", tiny_model_dir, legacy_hift=True)
    assert sum(f.stat().st_size for f in model_dir.glob("*.pt")) < 5_000_000
    report = download.verify_model_dir(model_dir)
    assert report.ok, report.problems
    assert report.keys == {"llm.pt": 295, "flow.pt": 1121, "hift.pt": 328}


def test_full_size_shapes_match_the_golden_key_table():
    golden = golden_dir() / "full_size_keys.json"
    if not golden.is_file():
        pytest.skip(f"no {golden}")
    table = json.loads(golden.read_text())
    expected = download.expected_shapes(modelgen.model_config("full"))
    for name in ("llm.pt", "flow.pt", "hift.pt"):
        golden_shapes = {k: tuple(v) for k, v in table[name].items()}
        assert download.compare_shapes(name, expected[name], golden_shapes) == []


def test_a_real_download_with_wrong_sizes_is_flagged(tiny_model_dir, tmp_path):
    model_dir = write_full_size_shapes(tmp_path / "full", tiny_model_dir)
    (model_dir / modelgen.MARKER_NAME).unlink()          # now it claims to be the release
    problems = download.verify_model_dir(model_dir).problems
    assert any(p.startswith("llm.pt:") and "2,023,316,821" in p for p in problems)
    assert not any("keys" in p or "shape" in p for p in problems), problems


def test_missing_file_and_wrong_shape_give_clear_messages(tiny_copy):
    (tiny_copy / mc.CAMPPLUS_ONNX_NAME).unlink()
    state = torch.load(tiny_copy / "llm.pt", weights_only=True)
    width = state["llm_embedding.weight"].shape[1]
    state["llm_embedding.weight"] = torch.zeros(3, width)
    del state["llm_decoder.bias"]
    torch.save(state, tiny_copy / "llm.pt")
    result = run_cli("--model-dir", str(tiny_copy), "--verify-only")
    assert result.returncode == download.EXIT_VERIFY_FAILED
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert "download: error: campplus.onnx: missing" in lines
    assert f"download: error: llm.pt: 1 shape mismatches: llm_embedding.weight is [3, {width}], expected [2, {width}]" \
        in lines
    assert "download: error: llm.pt: 1 missing keys: llm_decoder.bias" in lines
    assert "NOT a usable" in lines[-1]


def test_lfs_pointer_truncated_checkpoint_and_wrong_onnx_names(tiny_copy, tmp_path):
    (tiny_copy / "flow.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 450575567\n")
    data = (tiny_copy / "hift.pt").read_bytes()
    (tiny_copy / "hift.pt").write_bytes(data[: len(data) // 2])
    import onnx
    model = onnx.load(str(tiny_copy / mc.CAMPPLUS_ONNX_NAME))
    model.graph.output[0].name = "xvector"
    for node in model.graph.node:
        node.output[:] = ["xvector" if o == "embedding" else o for o in node.output]
    onnx.save(model, str(tiny_copy / mc.CAMPPLUS_ONNX_NAME))
    problems = download.verify_model_dir(tiny_copy).problems
    assert any(p.startswith("flow.pt: a Git LFS pointer") for p in problems)
    assert any(p.startswith("hift.pt: cannot be read as a state dict") for p in problems)
    assert any(p.startswith("campplus.onnx: graph outputs ['xvector']") for p in problems)


def test_unreachable_hub_is_one_clear_line_and_nonzero_exit(tmp_path):
    closed_port = free_ports(1)[0]                       # nothing listens there: connection refused at once
    result = run_cli("--model-dir", str(tmp_path / "model"), "--source", "hf",
                     env={"HF_ENDPOINT": f"http://127.0.0.1:{closed_port}", "HF_HOME": str(tmp_path / "hf"),
                          "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert result.returncode == download.EXIT_DOWNLOAD_FAILED
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("download: error:")]
    assert len(errors) == 1 and "cannot download" in errors[0] and download.HF_REPO_ID in errors[0]


def test_modelscope_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "modelscope_available", lambda: False)
    assert download.main(["--model-dir", str(tmp_path / "m"), "--source", "modelscope"]) == \
        download.EXIT_DOWNLOAD_FAILED
