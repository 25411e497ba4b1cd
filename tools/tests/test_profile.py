"""profile: one per-stage table from the gateway's Prometheus histograms and each stage server's Triton
statistics, over real servers; addresses from stack.json; --watch shows interval numbers."""
from __future__ import annotations

import asyncio
import json
import math

import pytest
from cosyvoice_common.contracts import GatewayMetric
from cosyvoice_gateway.testing import prompt_wav_bytes
from cosyvoice_tools import profile
from cosyvoice_tools.bench import STAGES, GrpcDriver, WorkItem

HIST_TEXT = """# HELP cosyvoice_gateway_stage_seconds stage call latency seen by the gateway
# TYPE cosyvoice_gateway_stage_seconds histogram
cosyvoice_gateway_stage_seconds_bucket{le="0.01",part="compute",stage="token2wav"} 0.0
cosyvoice_gateway_stage_seconds_bucket{le="0.1",part="compute",stage="token2wav"} 10.0
cosyvoice_gateway_stage_seconds_bucket{le="1.0",part="compute",stage="token2wav"} 20.0
cosyvoice_gateway_stage_seconds_bucket{le="+Inf",part="compute",stage="token2wav"} 20.0
cosyvoice_gateway_stage_seconds_count{part="compute",stage="token2wav"} 20.0
cosyvoice_gateway_stage_seconds_sum{part="compute",stage="token2wav"} 5.0
"""


def test_gateway_histograms_give_average_and_bucket_quantiles():
    hist = profile.parse_gateway_metrics(HIST_TEXT)[(GatewayMetric.STAGE_SECONDS, "token2wav", "compute")]
    assert hist.count == 20 and hist.avg_ms == pytest.approx(250.0)
    assert hist.quantile_ms(0.5) == pytest.approx(100.0)          # the 10th observation closes the 0.1 s bucket
    assert hist.quantile_ms(0.75) == pytest.approx(550.0)         # halfway through (0.1, 1.0]
    assert math.isnan(profile.Histogram().quantile_ms(0.5))


def test_triton_stats_sum_replicas_and_keep_batch_sizes():
    stats = {"model_stats": [{"name": "token2wav", "execution_count": 3, "inference_stats": {
        "success": {"count": 4, "ns": 0}, "queue": {"ns": 4_000_000}, "compute_input": {"ns": 400_000},
        "compute_infer": {"ns": 40_000_000}, "compute_output": {"ns": 800_000}},
        "batch_stats": [{"batch_size": 1, "compute_infer": {"count": 2}},
                        {"batch_size": 2, "compute_infer": {"count": 1}}]}]}
    one = profile.parse_triton_stats(stats)["token2wav"]
    two = profile.ModelStats()
    two.add(one)
    two.add(one)
    assert two.requests == 8 and two.per_request_ms(two.infer_ns) == pytest.approx(10.0)
    assert two.avg_batch == pytest.approx(4 / 3) and two.batch_sizes == {1: 4, 2: 2}
    assert two.minus(one).requests == 4


def _one_request(stack) -> None:
    item = WorkItem("profile", prompt_wav_bytes(1.0), "A short prompt.", "Hello there.", 20)

    async def go():
        driver = GrpcDriver(stack.gateway_grpc_url, 120.0)
        try:
            for mode in ("stream", "offline"):
                result = await driver.run(item, mode)
                assert result.ok, result.error
        finally:
            await driver.close()
    asyncio.run(go())


@pytest.mark.stack
def test_addresses_come_from_stack_json(stage_servers, stack):
    stages = profile.stack_addresses(stage_servers.stack.config.run_dir)
    assert stages.stage_http == {s: [stage_servers.http_url(s)] for s in STAGES}
    assert stages.stage_grpc == {s: [stage_servers.grpc_url(s)] for s in STAGES}
    gateway = profile.stack_addresses(stack.config.run_dir)
    assert gateway.gateway_grpc == stack.gateway_grpc_url
    assert "http://" + gateway.gateway_http == stack.gateway_http_url
    assert profile.main(["--run-dir", str(stage_servers.stack.config.run_dir), "--print-addresses", "stage-http"]) == 0


@pytest.mark.stack
def test_profile_table_has_gateway_and_triton_numbers_per_stage(stack, stage_servers, capsys):
    _one_request(stack)
    args = ["--gateway", stack.gateway_http_url, "--stages", ",".join(stage_servers.http_url(s) for s in STAGES)]
    assert profile.main([*args, "--json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(STAGES)
    for stage in STAGES:
        assert rows[stage]["gateway_calls"] >= 1 and rows[stage]["gateway_compute_avg_ms"] > 0, stage
        assert rows[stage]["triton_requests"] >= 1 and rows[stage]["triton_infer_ms"] > 0, stage
        assert rows[stage]["triton_executions"] >= 1 and sum(rows[stage]["triton_batch_sizes"].values()) >= 1
    assert rows["token2wav"]["triton_requests"] >= 3          # two streaming chunks + one offline call
    assert profile.main(args) == 0
    table = capsys.readouterr().out
    assert "| stage | gw calls |" in table and "| token2wav |" in table and "first chunk:" in table


@pytest.mark.stack
def test_watch_prints_the_last_interval_only(stack, stage_servers, capsys):
    args = ["--gateway", stack.gateway_http_url, "--stages", stage_servers.http_url("llm"),
            "--watch", "0.2", "--count", "1", "--json"]
    assert profile.main(args) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["llm"]["triton_requests"] == 0 and rows["llm"]["gateway_calls"] == 0   # nothing ran meanwhile
