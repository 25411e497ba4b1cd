"""stage_load: inputs recorded from the in-process pipeline replay against one real stage server and give
latency percentiles, throughput and the server's own statistics."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from cosyvoice_common.contracts import LLM_MODEL, TOKEN2WAV_MODEL, Token2WavIn
from cosyvoice_tools import stage_load


def _served_count(grpc_url: str, model: str) -> int:
    stats = triton_grpc.InferenceServerClient(grpc_url).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage-inputs")
    counts = asyncio.run(stage_load.record(tiny_model_dir, "cpu", out, tokens=20, manifest=None,
                                           text="Hello there, how are you?"))
    return out, counts


@pytest.mark.stack
def test_recorded_inputs_are_each_stages_triton_tensors(recorded):
    out, counts = recorded
    # one streaming (a prefill of its prompt, first + final chunk) and one offline request, each computing its
    # prompt features
    assert counts == {"tokenizer": 2, "speaker": 2, "llm": 2, "token2wav": 4}
    calls = stage_load.load_inputs(out / "token2wav")
    prefills = [c for c in calls if Token2WavIn.PREFILL in c]
    assert len(prefills) == 1 and prefills[0][Token2WavIn.TARGET_SPEECH_TOKENS].size == 0
    chunks = [c for c in calls if Token2WavIn.PREFILL not in c]
    assert int(chunks[0]["token_offset"][0]) == 0 and "cache_mel" not in chunks[0]
    assert int(chunks[1]["token_offset"][0]) == 15 and chunks[1]["cache_mel"].shape == (80, 8)
    assert "token_offset" not in chunks[2]                       # offline: one pass
    llm = stage_load.load_inputs(out / "llm")[0]
    assert llm["random_seed"].dtype == np.uint64 and int(llm["request_output_len"][0]) == 20


@pytest.mark.stack
@pytest.mark.parametrize("stage", ["token2wav", "llm"])
def test_one_stage_under_load_reports_percentiles_and_triton_stats(recorded, stage_servers, stage, capsys):
    out, _ = recorded
    model = {"token2wav": TOKEN2WAV_MODEL, "llm": LLM_MODEL}[stage]
    counted_before = _served_count(stage_servers.grpc_url(stage), model)
    code = stage_load.main(["run", "--stage", stage, "--inputs", str(out), "--url", stage_servers.grpc_url(stage),
                            "--http-url", stage_servers.http_url(stage), "--concurrency", "2",
                            "--duration-s", "2", "--out", str(out / f"{stage}.json")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / f"{stage}.json").read_text())
    assert summary["calls"] >= 2 and summary["errors"] == 0 and summary["calls_per_s"] > 0
    assert 0 < summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    # the server counts a request when it releases it, a moment after the client has its answer: the summary
    # may miss the last few; the server's own count, waited for, is every call (the run's and its warm-up's)
    assert 0 < summary["triton"]["requests"] <= summary["calls"]
    warmup = len(stage_load.load_inputs(out / stage))
    expected = counted_before + warmup + summary["calls"]
    deadline = time.monotonic() + 60
    while (counted := _served_count(stage_servers.grpc_url(stage), model)) < expected:
        assert time.monotonic() < deadline, f"the server counted {counted} of {expected} calls"
        time.sleep(0.2)
    assert counted == expected
    if stage == "llm":
        assert summary["tokens_per_s"] > 0 and summary["first_response_ms"]["p50"] <= summary["latency_ms"]["p50"]
    else:
        assert summary["audio_s_per_s"] > 0 and summary["triton"]["infer_ms"] > 0
    assert f"## stage {stage}: concurrency 2" in printed and "Triton:" in printed
