"""The GPU machine's first check runs here too, against a real tritonserver: the llm-stage probe streams through a
real llm stage."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GPU_TOOLS = Path(__file__).resolve().parents[1] / "gpu"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, GPU_TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.stack
def test_llm_stage_probe_streams_forced_lengths_through_a_real_llm_stage(stage_servers, capsys):
    probe = load("llm_stage_probe")
    assert probe.main(["--url", stage_servers.grpc_url("llm"), "--requests", "3", "--tokens", "12"]) == 0
    assert capsys.readouterr().out.startswith("ok: 3 streams x 12 tokens")
    # stream_boundaries: responses of 4 tokens (or more, when the responder merged some), never fewer.
    assert probe.main(["--url", stage_servers.grpc_url("llm"), "--requests", "3", "--tokens", "12",
                       "--boundaries", "4,8,12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: 3 streams x 12 tokens")
    assert float(out.split(" tokens per response")[0].rsplit("(", 1)[-1].split(",")[-1].strip()) >= 4.0, out
