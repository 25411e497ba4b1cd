"""build_engine.sh: the commands it would run (dry run), and a clean refusal where tensorrt_llm is missing."""
from __future__ import annotations

import importlib.util
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT_DIR = Path(__file__).resolve().parents[1] / "trtllm"
SCRIPT = SCRIPT_DIR / "build_engine.sh"
EXIT_USAGE = 2
EXIT_NO_TRTLLM = 3


def _run(*args, env_python=sys.executable):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": env_python})


def test_script_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    py_compile.compile(str(SCRIPT_DIR / "cosyvoice2_qwen.py"), doraise=True)


def test_dry_run_has_the_seed_options(tmp_path):
    res = _run("--model-dir", "/models/CosyVoice2-0.5B", "--engine-dir", str(tmp_path / "engine"), "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 4
    assert "cosyvoice_llm.trtllm.convert" in lines[0] and "--dtype bfloat16" in lines[0]
    assert "convert_checkpoint.py" in lines[1] and "--dtype bfloat16" in lines[1]
    assert "cosyvoice_llm.trtllm.headbias" in lines[2]
    build = lines[3]
    for option in ("trtllm-build", "--max_batch_size 16", "--max_num_tokens 32768", "--gemm_plugin bfloat16",
                   "--model_cls_name CosyVoice2QWenForCausalLM", "cosyvoice2_qwen.py", f"--output_dir {tmp_path}"):
        assert option in build, option


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed here")
def test_refuses_cleanly_without_tensorrt_llm(tmp_path):
    res = _run("--hf-dir", str(tmp_path / "hf"), "--engine-dir", str(tmp_path / "engine"))
    assert res.returncode == EXIT_NO_TRTLLM
    assert "tensorrt_llm is not importable" in res.stderr and "README" in res.stderr
    assert not (tmp_path / "engine").exists() and not (tmp_path / "engine.work").exists()


def test_usage_errors(tmp_path):
    assert _run("--engine-dir", str(tmp_path)).returncode == EXIT_USAGE
    assert _run("--hf-dir", "x", "--engine-dir", "y", "--dtype", "int3").returncode == EXIT_USAGE
    assert _run("--bogus").returncode == EXIT_USAGE
    assert _run("--help").returncode == 0
