"""bench: the engine-only line (in-process pipeline) and the whole stack (real stage servers + gateway) both
print the tables and write JSON rows with every field; cache-off rows recompute, cached rows hit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cosyvoice_gateway.testing import prompt_wav_bytes
from cosyvoice_tools import bench

TOKENS = 20            # 0.8 s per request: first chunk (15 + 3 look-ahead tokens) + the final one
FIRST_CHUNK_SAMPLES = 15 * 2 * 480 - 3840   # 15 tokens x 2 mel frames x 480 samples, minus the 3840 kept back
ROW_FIELDS = {"mode", "concurrency", "requests", "errors", "wall_s", "audio_s", "rtf", "audio_s_per_s",
              "first_chunk_ms", "total_ms", "first_chunk_samples", "cache_hit_rate", "stage_ms", "triton"}


def write_manifest(directory: Path) -> Path:
    rows = []
    for i, (text, prompt_text) in enumerate((("Hello there, how are you today?", "A short prompt."),
                                             ("今天天气很好。", "这是一个提示。"))):
        (directory / f"p{i}.wav").write_bytes(prompt_wav_bytes(1.0, seed=i))
        rows.append({"id": f"item{i}", "prompt_audio": f"p{i}.wav", "prompt_text": prompt_text, "target_text": text,
                     "target_speech_tokens": TOKENS})
    path = directory / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def run_bench(tmp_path: Path, capsys, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    code = bench.main(["--manifest", str(write_manifest(tmp_path)), "--limit", "2", "--concurrency", "1,2",
                       "--warmup", "1", "--timeout-s", "120", "--out", str(out), *extra])
    printed = capsys.readouterr().out
    assert code == 0, printed
    check_plots(out)
    assert out.with_suffix(".md").read_text().startswith("## ")          # the tables beside the JSON
    return json.loads(out.read_text()), printed


def check_plots(report: Path) -> None:
    """Both PNGs beside the report are real images (matplotlib reads them back)."""
    from matplotlib import image

    for png in bench.plot_paths(report):
        pixels = image.imread(png)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0, png


def check_report(report: dict, printed: str) -> None:
    rows = report["rows"]
    assert [(r["mode"], r["concurrency"]) for r in rows] == [(m, c) for c in (1, 2) for m in bench.MODES]
    for r in rows:
        assert ROW_FIELDS <= set(r), r
        assert r["errors"] == 0 and r["requests"] == max(2, 2 * r["concurrency"])
        assert r["warmup_requests"] == (r["concurrency"] if r["concurrency"] > 1 else 0)   # not counted above
        assert r["audio_s"] == pytest.approx(r["requests"] * TOKENS / 25, rel=0.05)
        assert r["first_chunk_ms"]["p50"] > 0 and r["total_ms"]["p99"] >= r["first_chunk_ms"]["p50"]
        assert {f"{s}.{p}" for s in bench.STAGES for p in ("queue", "compute")} <= set(r["stage_ms"])
        assert r["stage_ms"]["llm.compute"] > 0 and r["stage_ms"]["token2wav.compute"] > 0
        if r["mode"] == "stream":     # skip_cache: prompt features recomputed on every request
            assert r["cache_hit_rate"] == 0 and r["stage_ms"]["tokenizer.compute"] > 0
        else:
            assert r["cache_hit_rate"] == 1 and r["stage_ms"]["tokenizer.compute"] == 0
        if r["mode"] == "offline":
            assert r["first_chunk_ms"] == r["total_ms"]
        else:   # streaming: the first chunk is 15 tokens of audio less the withheld vocoder overlap
            assert r["first_chunk_samples"] == FIRST_CHUNK_SAMPLES
            assert r["first_chunk_ms"]["avg"] < r["total_ms"]["avg"]
    for mode in bench.MODES:
        assert f"### {mode}" in printed
    assert "| c | reqs | err | first chunk avg / p50 / p90 / p99 (ms)" in printed
    assert "Per-stage time per request" in printed


@pytest.mark.stack
def test_engine_only_bench_prints_tables_and_json(tiny_model_dir, tmp_path, capsys):
    report, printed = run_bench(tmp_path, capsys, "--engine-only", "--model-dir", str(tiny_model_dir),
                                "--device", "cpu", "--label", "tiny-engine")
    assert report["engine_only"] is True and report["label"] == "tiny-engine"
    check_report(report, printed)
    assert "## engine-only: tiny-engine" in printed
    assert all(r["triton"] == {} for r in report["rows"])
    out = tmp_path / "bench.json"                   # --plot redraws the PNGs of a report (e.g. a run cut short)
    for png in bench.plot_paths(out):
        png.unlink()
    assert bench.main(["--plot", str(out)]) == 0
    check_plots(out)


@pytest.mark.stack
def test_stack_bench_fills_the_triton_stage_table(stack, stage_servers, tmp_path, capsys):
    stage_http = ",".join(stage_servers.http_url(s) for s in bench.STAGES)
    report, printed = run_bench(tmp_path, capsys, "--addr", stack.gateway_grpc_url, "--triton-stats", stage_http,
                                "--stage-metrics", stage_servers.metrics_url("token2wav"), "--label", "tiny-stack")
    assert report["engine_only"] is False
    check_report(report, printed)
    assert "## whole stack: tiny-stack" in printed
    assert "Per-stage Triton statistics" in printed
    for r in report["rows"]:
        t2w = r["triton"]["token2wav"]
        calls = 1 if r["mode"] == "offline" else 3          # streaming: the prompt's prefill, first and final chunk
        assert t2w["requests"] == calls * r["requests"]      # bench waits for the servers' counts to settle
        assert t2w["avg_compute_ms"] > 0 and t2w["avg_batch"] >= 1
        assert r["triton"]["llm"]["requests"] == r["requests"]
        assert ("audio_tokenizer" in r["triton"]) == (r["mode"] == "stream")
        engine = r["token2wav"]            # the engine's own counters: work per frame of audio, calls by kind
        kinds = {"offline"} if r["mode"] == "offline" else {"prefill", "first", "final"}
        assert set(engine["kinds"]) == kinds and all(k["calls"] == r["requests"] for k in engine["kinds"].values())
        # 20 tokens on a 1 s prompt: no block completes before the final chunk, so every call computes its prefix
        assert engine["frames_per_audio_frame"] > 1 and engine["state_bytes"] >= 0
    assert "token2wav engine (stage metrics" in printed


@pytest.mark.stack
def test_seed_client_bench_measures_our_fronts_with_the_seeds_contract(seed_front, tmp_path, capsys):
    stream_port = seed_front.seed_ports("seed-stream")["grpc"]
    offline_port = seed_front.seed_ports("seed-offline")["grpc"]
    out = tmp_path / "seed.json"
    code = bench.main(["--manifest", str(write_manifest(tmp_path)), "--limit", "1", "--concurrency", "1",
                       "--warmup", "0", "--modes", "stream,stream-cached,offline", "--client", "seed",
                       "--seed-stream-addr", f"127.0.0.1:{stream_port}",
                       "--seed-offline-addr", f"127.0.0.1:{offline_port}", "--out", str(out), "--label", "seed"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["stream", "stream-cached", "offline"]
    for r in rows:
        assert r["errors"] == 0 and r["requests"] == 2
        assert r["audio_s"] == pytest.approx(r["requests"] * TOKENS / 25, rel=0.05)   # forced lengths honoured
        assert 0 < r["first_chunk_ms"]["p50"] <= r["total_ms"]["p99"]
    assert "## seed client: seed" in printed
