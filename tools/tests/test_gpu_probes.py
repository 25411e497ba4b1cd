"""The GPU-machine diagnostics run here too, against real tritonservers: the llm-stage probe streams through a
real llm stage, and the stub probe's models (ways of answering from a decoupled Python model) all serve."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
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


@pytest.mark.stack
def test_stub_probe_reports_each_way_of_answering(tmp_path, capsys):
    probe = load("stub_probe")
    variants = ["like_all", "thread_dlpack", "main_dlpack", "async_dlpack", "thread_numpy"]
    assert probe.main(["--variants", ",".join(variants), "--out", str(tmp_path)]) == 0
    rows = [line.split(maxsplit=1) for line in (tmp_path / "stub_probe.txt").read_text().splitlines()]
    verdicts = {row[0]: row[1] for row in rows if len(row) == 2 and row[0] in variants}
    assert set(verdicts) == set(variants)
    for variant in variants[:-1]:
        assert verdicts[variant] == "ok", verdicts
    # numpy 2 arrays reach the client as 0 bytes through pb_utils.Tensor(numpy): why stages use DLPack.
    numpy2 = int(np.__version__.split(".")[0]) >= 2
    assert verdicts["thread_numpy"].startswith("FAIL") == numpy2, verdicts
    assert "stub crashes in the server log: 0" in (tmp_path / "stub_probe.txt").read_text()
