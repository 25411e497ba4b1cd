"""Load ONE stage server alone with recorded inputs: latency percentiles and throughput at a concurrency.

    # 1. record real stage inputs (.npz, the stage's Triton tensors) from the in-process pipeline
    python -m cosyvoice_tools.stage_load record --model-dir models/cosyvoice2-tiny --out stage_inputs
    # 2. replay them against a running stage server (address from run/stack.json unless --url)
    python -m cosyvoice_tools.stage_load run --stage token2wav --inputs stage_inputs --concurrency 8 --duration-s 20

`record` runs one streaming and one offline request (forced length `--tokens`) through
`cosyvoice_tools.local.LocalPipeline` with a recorder on every stage call: `<out>/<stage>/<n>.npz`
holds exactly what the gateway would send (no batch dimension; streaming token2wav chunks with the
vocoder cache of the previous chunk). With `--manifest` the prompt is the manifest's first item, else
a synthetic 3 s prompt.

`run` drives the stage through the gateway's own `StageClient` (tritonclient gRPC aio; the llm stage
as a decoupled stream, timed to its final response and to its first response): `--concurrency`
workers, each sending the recorded inputs round-robin back to back for `--duration-s` after one
warm-up pass. Reports calls, errors, calls/s, latency avg/p50/p90/p99, (llm) tokens/s and first
response, (token2wav) audio seconds per second, and the server's own Triton statistics for the
interval (queue, compute input/infer/output, average batch).

Alternative: Triton's `perf_analyzer` (tritonclient[all] / the SDK container) can load the same models
with `--input-data` JSON made from these .npz files, e.g.
`perf_analyzer -m token2wav -u 127.0.0.1:8401 -i grpc --concurrency-range 1:16:2 --input-data t2w.json`
(and `--streaming` for the decoupled llm); this tool needs no SDK and uses the gateway's tensor handling.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from cosyvoice_common.constants import OUTPUT_SAMPLE_RATE_HZ
from cosyvoice_common.contracts import TOKEN2WAV_CACHE, LLMOut, SpeakerOut, Token2WavIn, Token2WavOut, TokenizerOut
from cosyvoice_common.stages import LLM, SPEAKER, STAGE_NAMES, TOKEN2WAV, TOKENIZER

from cosyvoice_tools.bench import settled
from cosyvoice_tools.profile import ModelStats, stack_addresses, triton_stage_stats

STAGES = STAGE_NAMES
STAGE_OUTPUTS = {
    TOKENIZER: [TokenizerOut.PROMPT_SPEECH_TOKENS],
    SPEAKER: [SpeakerOut.PROMPT_SPK_EMBEDDING, SpeakerOut.PROMPT_SPEECH_FEAT],
    LLM: [LLMOut.OUTPUT_IDS],
    TOKEN2WAV: [Token2WavOut.WAVEFORM, *TOKEN2WAV_CACHE],
}
MS_PER_S = 1000.0


# --- record -------------------------------------------------------------------------------------------
def synthetic_prompt() -> tuple[bytes, str]:
    from cosyvoice_gateway.testing import prompt_wav_bytes

    return prompt_wav_bytes(3.0), "This is a short prompt."


async def record(model_dir: pathlib.Path, device: str, out: pathlib.Path, tokens: int,
                 manifest: pathlib.Path | None, text: str) -> dict[str, int]:
    from cosyvoice_gateway.pipeline import SynthesisRequest

    from cosyvoice_tools.local import LocalPipeline

    if manifest is not None:
        from cosyvoice_tools.bench import load_manifest

        item = load_manifest(manifest)[0]
        audio, prompt_text, text = item.prompt_audio, item.prompt_text, item.target_text
    else:
        audio, prompt_text = synthetic_prompt()
    local = LocalPipeline.create(model_dir, device, record_dir=out)
    try:
        for streaming in (True, False):
            request = SynthesisRequest(text=text, prompt_audio=audio, prompt_text=prompt_text, seed=1,
                                       min_speech_tokens=tokens, max_speech_tokens=tokens, skip_cache=True,
                                       request_id=f"record-{'stream' if streaming else 'offline'}")
            await local.synthesize(request, streaming=streaming)
    finally:
        await local.close()
    return {stage: len(list((out / stage).glob("*.npz"))) for stage in STAGES}


def load_inputs(directory: pathlib.Path) -> list[dict[str, np.ndarray]]:
    files = sorted(directory.glob("*.npz"))
    if not files:
        raise SystemExit(f"no recorded inputs in {directory} (run `stage_load record` first)")
    inputs = []
    for path in files:
        with np.load(path) as data:
            inputs.append({name: data[name] for name in data.files})
    return inputs


# --- run ----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Sample:
    latency_s: float
    first_s: float = 0.0       # llm: first response
    tokens: int = 0            # llm: generated tokens
    audio_s: float = 0.0       # token2wav: seconds of audio


@dataclass(slots=True)
class LoadResult:
    stage: str
    concurrency: int
    duration_s: float
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    triton: ModelStats | None = None

    def summary(self) -> dict:
        lat = [s.latency_s * MS_PER_S for s in self.samples]
        pct = lambda values, q: float(np.percentile(values, q)) if values else float("nan")  # noqa: E731
        out = {
            "stage": self.stage, "concurrency": self.concurrency, "duration_s": self.duration_s,
            "calls": len(self.samples), "errors": len(self.errors), "first_errors": sorted(set(self.errors))[:3],
            "calls_per_s": len(self.samples) / self.duration_s if self.duration_s else float("nan"),
            "latency_ms": {"avg": statistics.fmean(lat) if lat else float("nan"), "p50": pct(lat, 50),
                           "p90": pct(lat, 90), "p99": pct(lat, 99)},
        }
        if self.stage == "llm":
            first = [s.first_s * MS_PER_S for s in self.samples]
            out["first_response_ms"] = {"avg": statistics.fmean(first) if first else float("nan"),
                                        "p50": pct(first, 50), "p90": pct(first, 90), "p99": pct(first, 99)}
            out["tokens_per_s"] = sum(s.tokens for s in self.samples) / self.duration_s
        if self.stage == "token2wav":
            out["audio_s_per_s"] = sum(s.audio_s for s in self.samples) / self.duration_s
        if self.triton is not None and self.triton.requests:
            t = self.triton
            out["triton"] = {"requests": t.requests, "queue_ms": t.per_request_ms(t.queue_ns),
                             "input_ms": t.per_request_ms(t.input_ns), "infer_ms": t.per_request_ms(t.infer_ns),
                             "output_ms": t.per_request_ms(t.output_ns), "avg_batch": t.avg_batch,
                             "batch_sizes": dict(sorted(t.batch_sizes.items()))}
        return out


async def one_call(client, stage: str, tensors: dict[str, np.ndarray], index: int) -> Sample:
    request_id = f"stage-load-{index}"
    start = time.perf_counter()
    if stage == LLM:
        first, tokens = 0.0, 0
        async for out in client.stream(tensors, STAGE_OUTPUTS[stage], request_id):
            if not first:
                first = time.perf_counter() - start
            tokens += int(out[LLMOut.OUTPUT_IDS].size)
        return Sample(time.perf_counter() - start, first, tokens)
    streaming_chunk = stage != TOKEN2WAV or Token2WavIn.TOKEN_OFFSET in tensors
    outputs = STAGE_OUTPUTS[stage] if streaming_chunk else [Token2WavOut.WAVEFORM]
    out, _ = await client.infer(tensors, outputs, request_id)
    latency = time.perf_counter() - start
    audio_s = out[Token2WavOut.WAVEFORM].size / OUTPUT_SAMPLE_RATE_HZ if stage == TOKEN2WAV else 0.0
    return Sample(latency, audio_s=audio_s)


async def run_load(stage: str, grpc_url: str, inputs: list[dict[str, np.ndarray]], concurrency: int,
                   duration_s: float, http_url: str = "", warmup: bool = True, timeout_s: float = 300.0
                   ) -> LoadResult:
    from cosyvoice_gateway.stage_client import StageClient, stage_config

    client = StageClient(stage_config(stage, grpc_url, timeout_s))
    try:
        if not await client.check_ready():
            raise SystemExit(f"stage {stage} at {grpc_url} is not ready")
        if warmup:
            for i, tensors in enumerate(inputs):
                await one_call(client, stage, tensors, -1 - i)
        before = await settled(lambda: triton_stage_stats([http_url])) if http_url else {}
        result = LoadResult(stage, concurrency, duration_s)
        counter = iter(range(1 << 62))
        start = time.perf_counter()
        deadline = start + duration_s

        async def worker(offset: int) -> None:
            position = offset
            while time.perf_counter() < deadline:
                tensors = inputs[position % len(inputs)]
                position += 1
                try:
                    result.samples.append(await one_call(client, stage, tensors, next(counter)))
                except Exception as exc:  # noqa: BLE001 - an error is counted, the load goes on
                    result.errors.append(f"{type(exc).__name__}: {exc}"[:200])

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        result.duration_s = time.perf_counter() - start
        if http_url:
            after = await settled(lambda: triton_stage_stats([http_url]))
            result.triton = after.get(stage, ModelStats()).minus(before.get(stage))
        return result
    finally:
        await client.close()


def format_summary(s: dict) -> str:
    lat = s["latency_ms"]
    lines = [f"## stage {s['stage']}: concurrency {s['concurrency']}, {s['duration_s']:.1f} s", "",
             "| calls | errors | calls/s | latency avg / p50 / p90 / p99 (ms) | extra |", "|---|---|---|---|---|"]
    extra = []
    if "tokens_per_s" in s:
        f = s["first_response_ms"]
        extra.append(f"{s['tokens_per_s']:.1f} tokens/s, first response p50 {f['p50']:.1f} / p90 {f['p90']:.1f} ms")
    if "audio_s_per_s" in s:
        extra.append(f"{s['audio_s_per_s']:.2f} audio s/s")
    lines.append(f"| {s['calls']} | {s['errors']} | {s['calls_per_s']:.2f} | {lat['avg']:.1f} / {lat['p50']:.1f} / "
                 f"{lat['p90']:.1f} / {lat['p99']:.1f} | {'; '.join(extra) or '-'} |")
    if "triton" in s:
        t = s["triton"]
        sizes = " ".join(f"{k}:{v}" for k, v in t["batch_sizes"].items()) or "-"
        lines += ["", f"Triton: {t['requests']} requests, queue {t['queue_ms']:.1f} ms, input + infer + output "
                      f"{t['input_ms']:.1f} + {t['infer_ms']:.1f} + {t['output_ms']:.1f} ms, avg batch "
                      f"{t['avg_batch']:.2f} (sizes {sizes})"]
    if s["first_errors"]:
        lines += ["", "errors: " + " | ".join(s["first_errors"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record every stage's inputs of two requests as .npz")
    rec.add_argument("--model-dir", default="models/cosyvoice2-tiny")
    rec.add_argument("--device", default="cpu")
    rec.add_argument("--out", default="stage_inputs")
    rec.add_argument("--tokens", type=int, default=100, help="forced speech tokens per request (25 = 1 s)")
    rec.add_argument("--manifest", default="", help="take the prompt and text of this manifest's first item")
    rec.add_argument("--text", default="The quick brown fox jumps over the lazy dog, again and again.")
    run = sub.add_parser("run", help="replay recorded inputs against one stage server")
    run.add_argument("--stage", required=True, choices=STAGES)
    run.add_argument("--inputs", default="stage_inputs", help="directory from `record` (uses <inputs>/<stage>)")
    run.add_argument("--url", default="", help="stage server gRPC host:port (default: run/stack.json)")
    run.add_argument("--http-url", default="", help="its HTTP host:port for Triton statistics (default: stack.json)")
    run.add_argument("--run-dir", default="run")
    run.add_argument("--concurrency", type=int, default=4)
    run.add_argument("--duration-s", type=float, default=10.0)
    run.add_argument("--no-warmup", action="store_true")
    run.add_argument("--out", default="", help="write the summary JSON here")
    args = parser.parse_args(argv)

    if args.command == "record":
        counts = asyncio.run(record(pathlib.Path(args.model_dir), args.device, pathlib.Path(args.out), args.tokens,
                                    pathlib.Path(args.manifest) if args.manifest else None, args.text))
        print(f"recorded into {args.out}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
        return 0

    grpc_url, http_url = args.url, args.http_url
    if not grpc_url:
        addresses = stack_addresses(pathlib.Path(args.run_dir))
        if not addresses.stage_grpc.get(args.stage):
            raise SystemExit(f"stage {args.stage} is not in {args.run_dir}/stack.json")
        grpc_url = addresses.stage_grpc[args.stage][0]
        http_url = http_url or addresses.stage_http[args.stage][0]
    inputs = load_inputs(pathlib.Path(args.inputs) / args.stage)
    result = asyncio.run(run_load(args.stage, grpc_url, inputs, args.concurrency, args.duration_s, http_url,
                                  warmup=not args.no_warmup))
    summary = result.summary()
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
    print(format_summary(summary))
    return 1 if result.errors or not result.samples else 0


if __name__ == "__main__":
    sys.exit(main())
