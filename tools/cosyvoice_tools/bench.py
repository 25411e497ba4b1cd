"""Benchmark the stack the way the seed's client_grpc.py does, but async and over our public API.

    python -m cosyvoice_tools.bench --addr 127.0.0.1:50051 \
        --manifest bench/seedtts-like/manifest.jsonl --concurrency 1,2,4,8,16,32 \
        --modes stream,stream-cached,offline --out bench_results/run.json

Modes (the seed's three rows):
  stream         streaming, prompt features recomputed on every request (request.skip_cache = true)
  stream-cached  streaming, prompt features from the spk2info cache (warmed before timing)
  offline        whole-utterance Synthesize, cache on

Every request forces its length with min_speech_tokens = max_speech_tokens = target_speech_tokens
(random weights never choose to stop), so N tokens = N/25 s of audio.

At concurrency c, c workers pull requests from one queue holding max(len(manifest), 2c) items.
RTF = wall time of the whole level / seconds of audio returned (the seed's definition).
First-chunk latency = first streamed chunk received - request sent (client side).
`--engine-only` runs the same workload against the in-process pipeline (no servers): a second line
that shows what the servers and gRPC cost.

Beside the JSON report (`--out run.json`) go the tables (`run.md`) and two plots, one line per mode:
`run.first-chunk.png` (first-chunk latency p50 and p90 vs concurrency) and `run.throughput.png` (seconds of
audio per second vs concurrency). `--plot run.json` redraws them from a report, e.g. one a run cut short left.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cosyvoice_common.constants import MEL_HOP_SAMPLES, OUTPUT_SAMPLE_RATE_HZ
from cosyvoice_common.contracts import Token2WavMetric
from cosyvoice_common.stage_params import StageParams, stage_params
from cosyvoice_common.stages import STAGE_NAMES

STAGES = STAGE_NAMES
MODES = ("stream", "stream-cached", "offline")
CACHE_WARMUP_TOKENS = 4  # a short request is enough to store a prompt's features


@dataclass(frozen=True, slots=True)
class WorkItem:
    item_id: str
    prompt_audio: bytes
    prompt_text: str
    target_text: str
    speech_tokens: int


@dataclass(slots=True)
class RequestResult:
    item_id: str
    ok: bool
    error: str = ""
    first_chunk_s: float = 0.0
    total_s: float = 0.0
    audio_s: float = 0.0
    chunks: int = 0
    first_chunk_samples: int = 0
    stage_ms: dict = field(default_factory=dict)   # {"llm.queue": ms, "llm.compute": ms, ...}
    cache_hit: bool = False


def load_manifest(path: pathlib.Path) -> list[WorkItem]:
    items = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        items.append(WorkItem(row["id"], (path.parent / row["prompt_audio"]).read_bytes(),
                              row["prompt_text"], row["target_text"], int(row["target_speech_tokens"])))
    if not items:
        raise SystemExit(f"{path}: empty manifest")
    return items


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(mode: str, concurrency: int, results: list[RequestResult], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    audio_s = sum(r.audio_s for r in ok)
    first = [r.first_chunk_s * 1000 for r in ok]
    total = [r.total_s * 1000 for r in ok]
    stage_ms = {}
    for key in sorted({k for r in ok for k in r.stage_ms}):
        stage_ms[key] = statistics.fmean(r.stage_ms.get(key, 0.0) for r in ok)
    return {
        "mode": mode, "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
        "first_errors": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": wall_s, "audio_s": audio_s, "rtf": wall_s / audio_s if audio_s else float("nan"),
        "audio_s_per_s": audio_s / wall_s if wall_s else float("nan"),
        "first_chunk_ms": {"avg": statistics.fmean(first) if first else float("nan"), "p50": percentile(first, 50),
                           "p90": percentile(first, 90), "p99": percentile(first, 99)},
        "total_ms": {"avg": statistics.fmean(total) if total else float("nan"), "p50": percentile(total, 50),
                     "p90": percentile(total, 90), "p99": percentile(total, 99)},
        "first_chunk_samples": statistics.median([r.first_chunk_samples for r in ok]) if ok else 0,
        "cache_hit_rate": sum(r.cache_hit for r in ok) / len(ok) if ok else 0.0,
        "stage_ms": stage_ms,
    }


# --- request drivers ------------------------------------------------------------------------------

class GrpcDriver:
    """Speaks cosyvoice.v1.TextToSpeech to a running gateway."""

    def __init__(self, addr: str, timeout_s: float):
        import grpc
        from cosyvoice.v1 import tts_pb2, tts_pb2_grpc

        self._pb = tts_pb2
        self._channel = grpc.aio.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 << 20),
                                                                  ("grpc.max_send_message_length", 64 << 20)])
        self._stub = tts_pb2_grpc.TextToSpeechStub(self._channel)
        self._timeout_s = timeout_s

    def _request(self, item: WorkItem, skip_cache: bool):
        pb = self._pb
        return pb.SynthesizeRequest(
            text=item.target_text, prompt_audio=item.prompt_audio, prompt_text=item.prompt_text,
            encoding=pb.FLOAT32, sample_rate=OUTPUT_SAMPLE_RATE_HZ, request_id=f"bench-{item.item_id}",
            min_speech_tokens=item.speech_tokens, max_speech_tokens=item.speech_tokens, skip_cache=skip_cache)

    @staticmethod
    def _stage_ms(timings) -> dict:
        out = {}
        for stage in STAGES:
            t = getattr(timings, stage)
            out[f"{stage}.queue"] = t.queue_ms
            out[f"{stage}.compute"] = t.compute_ms
        return out

    async def run(self, item: WorkItem, mode: str) -> RequestResult:
        result = RequestResult(item.item_id, ok=False)
        start = time.perf_counter()
        try:
            if mode == "offline":
                resp = await self._stub.Synthesize(self._request(item, skip_cache=False), timeout=self._timeout_s)
                result.total_s = result.first_chunk_s = time.perf_counter() - start
                samples = len(resp.audio) // 4
                result.chunks, result.first_chunk_samples = 1, samples
                result.stage_ms, result.cache_hit = self._stage_ms(resp.timings), resp.timings.cache_hit
            else:
                samples = 0
                call = self._stub.SynthesizeStream(self._request(item, skip_cache=(mode == "stream")),
                                                   timeout=self._timeout_s)
                async for chunk in call:
                    n = len(chunk.audio) // 4
                    if result.chunks == 0 and n:
                        result.first_chunk_s = time.perf_counter() - start
                        result.first_chunk_samples = n
                    result.chunks += 1 if n else 0
                    samples += n
                    if chunk.is_final:
                        result.stage_ms, result.cache_hit = self._stage_ms(chunk.timings), chunk.timings.cache_hit
                result.total_s = time.perf_counter() - start
            result.audio_s = samples / OUTPUT_SAMPLE_RATE_HZ
            result.ok = samples > 0
            if not result.ok:
                result.error = "no audio"
        except Exception as exc:  # a failed request is a row in the table, not a crash of the benchmark
            result.error = f"{type(exc).__name__}: {getattr(exc, 'details', lambda: str(exc))()}"
        return result

    async def close(self):
        await self._channel.close()


class EngineDriver:
    """Runs the gateway pipeline in-process against in-process stages (no servers, no gRPC): the same
    RequestResult fields as GrpcDriver."""

    def __init__(self, model_dir: str, device: str, stage_settings: Mapping[str, StageParams] | None = None):
        from cosyvoice_tools.local import (
            LocalPipeline,  # built on the same pipeline code as the gateway
        )

        # The stage servers' settings (TOKENIZER_BACKEND, LLM_DTYPE, TOKEN2WAV_DTYPE, ...), so both lines match.
        self._pipeline = LocalPipeline.create(model_dir, device, stage_settings=stage_settings)

    async def run(self, item: WorkItem, mode: str) -> RequestResult:
        from cosyvoice_gateway.pipeline import StageTimings, SynthesisRequest

        pipeline = self._pipeline.pipeline
        result = RequestResult(item.item_id, ok=False)
        request = SynthesisRequest(text=item.target_text, prompt_audio=item.prompt_audio,
                                   prompt_text=item.prompt_text, request_id=f"bench-{item.item_id}",
                                   min_speech_tokens=item.speech_tokens, max_speech_tokens=item.speech_tokens,
                                   skip_cache=(mode == "stream"))
        start = time.perf_counter()
        timings = StageTimings()
        samples = 0
        try:
            prepared = await pipeline.prepare(request, timings)
            if mode == "offline":
                wav = await pipeline.synthesize(prepared, timings)
                result.total_s = result.first_chunk_s = time.perf_counter() - start
                samples = result.first_chunk_samples = wav.shape[0]
                result.chunks = 1
            else:
                async for wav in pipeline.stream(prepared, timings):
                    if result.chunks == 0:
                        result.first_chunk_s = time.perf_counter() - start
                        result.first_chunk_samples = wav.shape[0]
                    result.chunks += 1
                    samples += wav.shape[0]
                result.total_s = time.perf_counter() - start
            result.audio_s = samples / OUTPUT_SAMPLE_RATE_HZ
            result.ok = samples > 0
            result.error = "" if result.ok else "no audio"
        except Exception as exc:  # noqa: BLE001 - a failed request is a row in the table
            result.error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
        result.cache_hit = timings.cache_hit
        for stage in STAGES:
            t = timings.per_stage[stage]
            result.stage_ms[f"{stage}.queue"] = t.queue_ms
            result.stage_ms[f"{stage}.compute"] = t.compute_ms
        return result

    async def close(self):
        await self._pipeline.close()


class SeedDriver:
    """The seed's own request contract (Triton model `cosyvoice2`, tensors reference_wav / reference_wav_len /
    reference_text / target_text -> waveform) against our seed-compatible fronts: streaming on
    `--seed-stream-addr` (default 127.0.0.1:8001), offline on `--seed-offline-addr` (127.0.0.1:8011).
    Our table and the seed's are then measured by the same request code (tools/cosyvoice_tools/seed_client.py).
    `stream-cached` sends only target_text: the fronts speak with their default speaker (the seed's
    --use-spk2info-cache True). Per-stage timings are not part of the seed's contract (columns stay 0)."""

    def __init__(self, stream_addr: str, offline_addr: str):
        from cosyvoice_tools import seed_client

        self._seed = seed_client
        self._addrs = {"stream": stream_addr, "stream-cached": stream_addr, "offline": offline_addr}
        self._sessions: dict = {}

    def _session(self, mode: str):
        # tritonclient's streaming client is blocking and holds one stream: one session per thread and mode.
        import threading

        key = (threading.get_ident(), mode)
        if key not in self._sessions:
            self._sessions[key] = self._seed.SeedSession(self._addrs[mode],
                                                         mode="offline" if mode == "offline" else "streaming")
        return self._sessions[key]

    def _run_blocking(self, item: WorkItem, mode: str) -> RequestResult:
        result = RequestResult(item.item_id, ok=False)
        try:
            wav_16k = None
            if mode != "stream-cached":
                from cosyvoice_common.audio import decode_audio, resample
                from cosyvoice_common.constants import PROMPT_16K_SAMPLE_RATE_HZ

                wav, rate = decode_audio(item.prompt_audio)
                wav_16k = resample(wav, rate, PROMPT_16K_SAMPLE_RATE_HZ)
            first_s, total_s, audio_s = self._session(mode).run_one(
                wav_16k, item.prompt_text if wav_16k is not None else "", item.target_text,
                min_speech_tokens=item.speech_tokens, max_speech_tokens=item.speech_tokens)
            result.first_chunk_s, result.total_s, result.audio_s = first_s, total_s, audio_s
            result.first_chunk_samples = 0
            result.ok = audio_s > 0
            result.cache_hit = mode == "stream-cached"
            if not result.ok:
                result.error = "no audio"
        except Exception as exc:  # a failed request is a row in the table, not a crash of the benchmark
            result.error = f"{type(exc).__name__}: {exc}"[:300]
        return result

    async def run(self, item: WorkItem, mode: str) -> RequestResult:
        return await asyncio.to_thread(self._run_blocking, item, mode)

    async def ensure_default_speaker(self, gateway_addr: str, item: WorkItem, speaker_id: str) -> None:
        """The seed's cache mode needs its default speaker provisioned (its spk2info.pt entry "001"). Ours
        lives in the gateway's Redis registry: register the first manifest prompt under that name if absent."""
        import grpc
        from cosyvoice.v1 import tts_pb2, tts_pb2_grpc

        try:
            async with grpc.aio.insecure_channel(gateway_addr) as channel:
                stub = tts_pb2_grpc.TextToSpeechStub(channel)
                listed = await stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), timeout=10)
                if any(s.speaker_id == speaker_id for s in listed.speakers):
                    return
                await stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(
                    speaker_id=speaker_id, prompt_audio=item.prompt_audio, prompt_text=item.prompt_text), timeout=60)
                print(f"registered the seed fronts' default speaker {speaker_id!r} from {item.item_id}", file=sys.stderr)
        except grpc.aio.AioRpcError as exc:   # the fronts may be provisioned another way (SEED_PROMPT_WAV)
            print(f"could not check speaker {speaker_id!r} at the gateway {gateway_addr}: {exc.code().name}; "
                  "cache-mode requests need it registered", file=sys.stderr)

    async def close(self):
        for session in self._sessions.values():
            session.close()


# --- the sweep ------------------------------------------------------------------------------------

async def run_level(driver, items: list[WorkItem], mode: str, concurrency: int, progress) -> dict:
    total = max(len(items), 2 * concurrency)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(items[i % len(items)])
    results: list[RequestResult] = []

    async def worker():
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await driver.run(item, mode))
            progress.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(mode, concurrency, results, time.perf_counter() - start)


async def warm_level(driver, items: list[WorkItem], mode: str, concurrency: int) -> list[str]:
    """One unmeasured wave of `concurrency` simultaneous requests before a level is timed: the stages see
    that level's batch sizes once, so lazily captured CUDA graphs (one per batch bucket) are recorded here
    and not inside the level's latencies. Returns the errors."""
    wave = [items[i % len(items)] for i in range(concurrency)]
    results = await asyncio.gather(*(driver.run(item, mode) for item in wave))
    return [f"{r.item_id}: {r.error}" for r in results if not r.ok]


_TRITON_ZERO = {"count": 0, "queue_ns": 0, "input_ns": 0, "compute_ns": 0, "output_ns": 0, "exec": 0}


def triton_stats(urls: list[str]) -> dict:
    """Per-model queue/compute totals from each stage server's statistics API (HTTP port), summed over
    replicas. For the decoupled `llm` model, compute covers execute() (enqueue) only, not generation."""
    out = {}
    for url in urls:
        try:
            with urllib.request.urlopen(f"http://{url.removeprefix('http://')}/v2/models/stats", timeout=5) as resp:
                stats = json.load(resp)
        except OSError:
            continue
        for model in stats.get("model_stats", []):
            inf = model["inference_stats"]
            entry = out.setdefault(model["name"], dict(_TRITON_ZERO))
            entry["count"] += int(inf["success"]["count"])
            entry["queue_ns"] += int(inf["queue"]["ns"])
            entry["input_ns"] += int(inf["compute_input"]["ns"])
            entry["compute_ns"] += int(inf["compute_infer"]["ns"])
            entry["output_ns"] += int(inf["compute_output"]["ns"])
            entry["exec"] += int(model.get("execution_count", 0))
    return out


async def settled(read, poll_s: float = 0.1, max_wait_s: float = 2.0):
    """Triton counts a request when it releases it, a moment after the client has the answer: call
    `read()` (a statistics snapshot) until two reads agree, so every returned call is counted."""
    stats = read()
    deadline = time.perf_counter() + max_wait_s
    while time.perf_counter() < deadline:
        await asyncio.sleep(poll_s)
        again = read()
        if again == stats:
            break
        stats = again
    return stats


async def settled_triton_stats(urls: list[str]) -> dict:
    """A level's last requests land in that level, not the next."""
    return await settled(lambda: triton_stats(urls)) if urls else {}


def stats_delta(before: dict, after: dict) -> dict:
    rows = {}
    for name, a in after.items():
        b = before.get(name, _TRITON_ZERO)
        n = a["count"] - b["count"]
        if n > 0:
            rows[name] = {"requests": n, "avg_queue_ms": (a["queue_ns"] - b["queue_ns"]) / n / 1e6,
                          "avg_input_ms": (a["input_ns"] - b["input_ns"]) / n / 1e6,
                          "avg_compute_ms": (a["compute_ns"] - b["compute_ns"]) / n / 1e6,
                          "avg_output_ms": (a["output_ns"] - b["output_ns"]) / n / 1e6,
                          "avg_batch": n / max(1, a["exec"] - b["exec"])}
    return rows


MEL_FRAMES_PER_S = OUTPUT_SAMPLE_RATE_HZ // MEL_HOP_SAMPLES
_T2W_KIND_METRICS = {Token2WavMetric.CHUNKS: "calls", Token2WavMetric.CHUNK_WAIT_MS: "wait_ms",
                     Token2WavMetric.CHUNK_COMPUTE_MS: "compute_ms"}
_T2W_TOTALS = {Token2WavMetric.FLOW_FRAMES_COMPUTED: "frames_computed",
               Token2WavMetric.FLOW_FRAMES_REUSED: "frames_reused", Token2WavMetric.STREAM_STATE_BYTES: "state_bytes"}


def token2wav_metrics(urls: list[str]) -> dict:
    """The token2wav engine's counters from each stage server's metrics port (Prometheus text), summed over
    replicas: per chunk kind calls / wait / compute ms, flow frames computed and reused, state-cache bytes."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {"kinds": {}, **{name: 0.0 for name in _T2W_TOTALS.values()}}
    for url in urls:        # host:port, or the whole http://host:port/metrics
        if "://" not in url:
            url = f"http://{url}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):   # by family: the parser adds _total to counters
            for sample in family.samples:
                if family.name in _T2W_KIND_METRICS and "kind" in sample.labels:
                    kind = out["kinds"].setdefault(sample.labels["kind"], {"calls": 0.0, "wait_ms": 0.0,
                                                                          "compute_ms": 0.0})
                    kind[_T2W_KIND_METRICS[family.name]] += sample.value
                elif family.name in _T2W_TOTALS:
                    out[_T2W_TOTALS[family.name]] += sample.value
    return out


def token2wav_delta(before: dict, after: dict, audio_s: float) -> dict:
    """One level's token2wav work: flow frames computed per frame of audio (50 mel frames a second), frames read
    from the state cache, the state cache's bytes at the end, and per chunk kind the average wait and compute."""
    if not after.get("kinds"):
        return {}
    computed = after["frames_computed"] - before.get("frames_computed", 0.0)
    kinds = {}
    for kind, a in after["kinds"].items():
        b = before.get("kinds", {}).get(kind, {"calls": 0.0, "wait_ms": 0.0, "compute_ms": 0.0})
        n = a["calls"] - b["calls"]
        if n > 0:
            kinds[kind] = {"calls": n, "avg_wait_ms": (a["wait_ms"] - b["wait_ms"]) / n,
                           "avg_compute_ms": (a["compute_ms"] - b["compute_ms"]) / n}
    return {"frames_computed": computed, "frames_reused": after["frames_reused"] - before.get("frames_reused", 0.0),
            "frames_per_audio_frame": computed / (audio_s * MEL_FRAMES_PER_S) if audio_s else float("nan"),
            "state_bytes": after["state_bytes"], "kinds": kinds}


def format_tables(rows: list[dict], title: str) -> str:
    lines = [f"## {title}", ""]
    for mode in MODES:
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        lines += [f"### {mode}", "",
                  "| c | reqs | err | first chunk avg / p50 / p90 / p99 (ms) | total avg / p50 / p99 (ms) | RTF | audio s/s | cache hit |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mode_rows:
            f, t = r["first_chunk_ms"], r["total_ms"]
            lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {f['avg']:.0f} / {f['p50']:.0f} / "
                         f"{f['p90']:.0f} / {f['p99']:.0f} | {t['avg']:.0f} / {t['p50']:.0f} / {t['p99']:.0f} | "
                         f"{r['rtf']:.4f} | {r['audio_s_per_s']:.1f} | {r['cache_hit_rate']:.2f} |")
        lines += ["", "Per-stage time per request (gateway timings, ms, queue + compute):", "",
                  "| c | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
        for r in mode_rows:
            s = r["stage_ms"]
            cells = [f"{s.get(st + '.queue', 0):.1f} + {s.get(st + '.compute', 0):.1f}" for st in STAGES]
            lines.append(f"| {r['concurrency']} | " + " | ".join(cells) + " |")
        lines.append("")
        if any(r.get("triton") for r in mode_rows):
            lines += ["Per-stage Triton statistics (server side, per request: queue / input + infer + output ms, "
                      "avg batch):", "",
                      "| c | model | requests | queue | input + infer + output | avg batch |",
                      "|---|---|---|---|---|---|"]
            for r in mode_rows:
                for name, t in sorted(r.get("triton", {}).items()):
                    lines.append(f"| {r['concurrency']} | {name} | {t['requests']} | {t['avg_queue_ms']:.1f} | "
                                 f"{t.get('avg_input_ms', 0):.1f} + {t['avg_compute_ms']:.1f} + "
                                 f"{t.get('avg_output_ms', 0):.1f} | {t['avg_batch']:.2f} |")
            lines.append("")
        if any(r.get("token2wav") for r in mode_rows):
            kinds = ("prefill", "first", "middle", "final", "offline")
            lines += ["token2wav engine (stage metrics: flow frames computed per frame of audio, state cache held at the "
                      "end; per chunk kind: calls, wait + compute ms):", "",
                      "| c | frames / audio frame | state GiB | " + " | ".join(kinds) + " |",
                      "|---|---|---|" + "---|" * len(kinds)]
            for r in mode_rows:
                t = r.get("token2wav") or {}
                if not t:
                    continue
                cells = [(f"{k['calls']:.0f}: {k['avg_wait_ms']:.0f} + {k['avg_compute_ms']:.0f}"
                          if (k := t["kinds"].get(kind)) else "") for kind in kinds]
                lines.append(f"| {r['concurrency']} | {t['frames_per_audio_frame']:.2f} | {t['state_bytes'] / 2**30:.2f} | "
                             + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


PLOT_DPI = 120


def plot_paths(report_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    return report_path.with_suffix(".first-chunk.png"), report_path.with_suffix(".throughput.png")


def write_plots(rows: list[dict], title: str, report_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """First-chunk latency (p50 solid, p90 dashed) and audio seconds per second against concurrency, one
    colour per mode; concurrency on a log2 axis (the sweep doubles it)."""
    import matplotlib
    matplotlib.use("Agg")                 # files only, no display
    import matplotlib.pyplot as plt

    latency_png, throughput_png = plot_paths(report_path)
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    colors = dict(zip(MODES, ("tab:blue", "tab:orange", "tab:green")))
    concurrencies = sorted({r["concurrency"] for r in rows})
    for path, ylabel, series in (
            (latency_png, "first chunk latency (ms)", (("p50", "-"), ("p90", "--"))),
            (throughput_png, "audio seconds per second", ((None, "-"),))):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for mode in modes:
            mode_rows = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in mode_rows]
            for quantile, style in series:
                ys = [r["first_chunk_ms"][quantile] if quantile else r["audio_s_per_s"] for r in mode_rows]
                label = f"{mode} {quantile}" if quantile else mode
                if mode == "offline" and quantile:
                    label += " (whole utterance)"
                ax.plot(xs, ys, style, marker="o", color=colors[mode], label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=PLOT_DPI)
        plt.close(fig)
    return latency_png, throughput_png


def bench_title(args) -> str:
    kind = "engine-only" if args.engine_only else ("seed client" if args.client == "seed" else "whole stack")
    return f"{kind}: {args.label}"


def write_report(args, rows: list[dict]) -> None:
    if not args.out:
        return
    report = {"label": args.label, "title": bench_title(args), "engine_only": args.engine_only,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "rows": rows}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(format_tables(rows, report["title"]) + "\n")


async def main_async(args) -> int:
    from tqdm import tqdm

    items = load_manifest(pathlib.Path(args.manifest))
    if args.limit:
        items = items[: args.limit]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if args.engine_only:
        driver = EngineDriver(args.model_dir, args.device,
                              {name: stage_params(name, os.environ) for name in STAGE_NAMES})
    elif args.client == "seed":
        driver = SeedDriver(args.seed_stream_addr, args.seed_offline_addr)
    else:
        driver = GrpcDriver(args.addr, args.timeout_s)
    stage_urls = [u for u in args.triton_stats.split(",") if u]
    metrics_urls = [u for u in args.stage_metrics.split(",") if u]
    rows = []
    try:
        if isinstance(driver, SeedDriver) and "stream-cached" in modes:
            await driver.ensure_default_speaker(args.addr, items[0], args.seed_speaker)
        # Warm-up: fill caches, load kernels, capture graphs. The cached rows then measure cache hits.
        warm = items[: max(1, min(len(items), args.warmup))]
        for item in tqdm(warm, desc="warm-up", file=sys.stderr):
            for mode in modes:
                r = await driver.run(item, mode)
                if not r.ok:
                    print(f"warm-up {item.item_id} {mode}: {r.error}", file=sys.stderr)
        if any(m != "stream" for m in modes):  # every prompt in the cache before the cached rows
            for item in tqdm(items, desc="cache warm-up", file=sys.stderr):
                await driver.run(dataclasses.replace(item, speech_tokens=CACHE_WARMUP_TOKENS), "offline")
        total = sum(max(len(items), 2 * c) for c in concurrencies) * len(modes)
        with tqdm(total=total, desc="bench", file=sys.stderr) as progress:
            for c in concurrencies:          # level by level: a run cut short still has every mode at low c
                for mode in modes:
                    warmed = c if c > 1 and args.level_warmup else 0
                    if warmed:
                        for err in await warm_level(driver, items, mode, c):
                            print(f"level warm-up c={c} {mode}: {err}", file=sys.stderr)
                    before = await settled_triton_stats(stage_urls)
                    t2w_before = token2wav_metrics(metrics_urls)
                    row = await run_level(driver, items, mode, c, progress)
                    row["warmup_requests"] = warmed
                    row["triton"] = stats_delta(before, await settled_triton_stats(stage_urls))
                    row["token2wav"] = token2wav_delta(t2w_before, token2wav_metrics(metrics_urls), row["audio_s"])
                    rows.append(row)
                    write_report(args, rows)   # after every level: a run cut short keeps what it measured
    finally:
        await driver.close()
    title = bench_title(args)
    write_report(args, rows)
    print(format_tables(rows, title))
    if args.out and rows:
        for path in write_plots(rows, title, pathlib.Path(args.out)):
            print(f"plot: {path}", file=sys.stderr)
    return 1 if any(r["errors"] for r in rows) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--manifest", help="the workload (JSON lines); required unless --plot")
    parser.add_argument("--plot", metavar="REPORT", help="only redraw the PNGs and tables of a JSON report")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--limit", type=int, default=0, help="use only the first N manifest items")
    parser.add_argument("--warmup", type=int, default=4, help="requests per mode before timing")
    parser.add_argument("--level-warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="before each level with c > 1, one unmeasured wave of c concurrent requests")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--triton-stats", default="", help="comma list of stage servers' HTTP host:port")
    parser.add_argument("--stage-metrics", default="",
                        help="comma list of stage servers' metrics host:port or http://host:port/metrics "
                             "(the token2wav engine's counters)")
    parser.add_argument("--engine-only", action="store_true")
    parser.add_argument("--client", choices=("ours", "seed"), default="ours",
                        help="seed: the seed's Triton contract against our cosyvoice2 fronts")
    parser.add_argument("--seed-stream-addr", default="127.0.0.1:8001")
    parser.add_argument("--seed-offline-addr", default="127.0.0.1:8011")
    parser.add_argument("--seed-speaker", default="001", help="the fronts' default speaker (SEED_SPEAKER)")
    parser.add_argument("--model-dir", default="models/cosyvoice2-tiny")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.plot:
        report_path = pathlib.Path(args.plot)
        report = json.loads(report_path.read_text())
        title = report.get("title") or report.get("label", "")
        report_path.with_suffix(".md").write_text(format_tables(report["rows"], title) + "\n")
        for path in write_plots(report["rows"], title, report_path):
            print(f"plot: {path}")
        return 0
    if not args.manifest:
        parser.error("--manifest is required")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
