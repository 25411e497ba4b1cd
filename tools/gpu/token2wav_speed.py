#!/usr/bin/env python
"""token2wav speed + quality: the stage's serving configurations side by side, in one process.

Self-contained: builds a random flow + HiFT in memory (cosyvoice_tools.modelgen's builders, no model dir).

Serving comparison (default), each configuration against a float32 eager runner on the same inputs (the
quality gate of cosyvoice_token2wav.quality: mel relative L2, waveform log-spectral distance):
  old   bf16 flow, CUDA graphs captured lazily inside calls, no compile, one padded batch per call
  new   bf16 flow, each Euler step compiled (Inductor), every graph captured at start-up, nothing captured
        or compiled inside a call, length-grouped scheduling with first chunks first (what the stage runs)
measured: start-up seconds (compile + capture; old: the captures its first calls paid), a first chunk at
B=1, the first-chunk latency inside a 16-stream mixed batch (4 first, 8 middle, 4 final chunks: the time
until the first chunks' results are on the host), offline B=16 (6 s utterances) in audio-s/s.

GPU:  python tools/gpu/token2wav_speed.py --device cuda --size full
CPU:  python tools/gpu/token2wav_speed.py --device cpu --size tiny --streams 4 --final-tokens 100 --warmup 0 --repeats 1
      (smoke: no graphs, no compile)

Legacy grid (--variants, e.g. fp32-graphs,bf16-graphs): plain Token2Wav.chunk (fp32, one request at a time)
vs Token2WavRunner variants per scenario and batch size (first/middle/offline/mixed, prompt 3 s).
Times are per batch of B requests (ms); 'per req' = batch time / B. The baseline runs the B requests one by one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
for _sub in ("common", "services/token2wav", "tools"):
    _p = str(_REPO / _sub)
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from cosyvoice_common.constants import (  # noqa: E402
    MEL_BINS,
    SPEAKER_EMBEDDING_DIM,
    SPEECH_CODEBOOK_SIZE,
)
from cosyvoice_token2wav.quality import (  # noqa: E402
    BF16_BOUNDS,
    FLOAT32_BOUNDS,
    quality_gate,
    rel_l2,
    spec_db,
)
from cosyvoice_token2wav.runner import ChunkRequest, Token2WavRunner  # noqa: E402
from cosyvoice_token2wav.token2wav import Token2Wav  # noqa: E402
from cosyvoice_tools.modelgen import random_flow_and_hift  # noqa: E402

PROMPT_TOKENS = 75
FIRST_TOKENS, LOOKAHEAD, SECOND_HOP = 15, 3, 25
OFFLINE_TOKENS = 150
SCENARIOS = ("first", "middle", "offline", "mixed")
# quality gates for the reduced-precision variants (fp32 variants must match to rounding)
MEL_REL_L2_MAX = {"float32": 1e-4, "reduced": 2e-2}
SPEC_DB_MAX = {"float32": 0.05, "reduced": 2.0}


def log(msg: str) -> None:
    print(msg, flush=True)




def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn, warmup: int, repeats: int) -> tuple[float, list[float]]:
        for _ in range(warmup):
            fn()
        sync(self.device)
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), times


def make_prompt(g: torch.Generator) -> dict:
    return dict(prompt_tokens=torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, PROMPT_TOKENS), generator=g),
                prompt_feat=torch.randn(1, 2 * PROMPT_TOKENS, MEL_BINS, generator=g) * 2.0 - 5.0,
                embedding=torch.randn(1, SPEAKER_EMBEDDING_DIM, generator=g))


def make_requests(kind: str, n: int, t2w: Token2Wav, device: torch.device, seed0: int = 100) -> list[ChunkRequest]:
    """n CPU-side requests of one scenario (each its own prompt/tokens/seed)."""
    out = []
    for i in range(n):
        k = kind if kind != "mixed" else ("first", "middle", "offline")[i % 3]
        g = torch.Generator().manual_seed(seed0 + i)
        p = make_prompt(g)
        seed = seed0 + 1000 + i
        if k == "first":
            toks = torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, FIRST_TOKENS + LOOKAHEAD), generator=g)
            out.append(ChunkRequest(tokens=toks, token_offset=0, finalize=False, streaming=True, seed=seed, **p))
        elif k == "middle":
            toks = torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, FIRST_TOKENS + SECOND_HOP + LOOKAHEAD), generator=g)
            _, cache = t2w.chunk(toks[:, :FIRST_TOKENS + LOOKAHEAD], token_offset=0, finalize=False, streaming=True,
                                 cache=None, generator=torch.Generator(device).manual_seed(seed + 7), **p)
            cache = type(cache)(mel=cache.mel.cpu(), source=cache.source.cpu(), speech=cache.speech.cpu())
            out.append(ChunkRequest(tokens=toks, token_offset=FIRST_TOKENS, finalize=False, streaming=True,
                                    cache=cache, seed=seed, **p))
        else:
            toks = torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, OFFLINE_TOKENS), generator=g)
            out.append(ChunkRequest(tokens=toks, token_offset=0, finalize=True, streaming=False, seed=seed, **p))
    return out


def baseline_chunk(t2w: Token2Wav, r: ChunkRequest, device: torch.device, keep_mel: bool = False):
    gen = torch.Generator(device).manual_seed(r.seed)
    mel = None
    if keep_mel:
        mel = t2w.flow_mel(r.tokens, r.prompt_tokens, r.prompt_feat, r.embedding, streaming=r.streaming,
                           finalize=r.finalize)[:, :, 2 * r.token_offset:]
        wav, cache = t2w.vocode(mel, r.finalize, r.cache, generator=gen)
    else:
        wav, cache = t2w.chunk(r.tokens, r.prompt_tokens, r.prompt_feat, r.embedding, token_offset=r.token_offset,
                               finalize=r.finalize, streaming=r.streaming, cache=r.cache, generator=gen)
    return wav.cpu(), cache, (None if mel is None else mel.cpu())


def baseline_refs(t2w: Token2Wav, reqs: list[ChunkRequest], device: torch.device) -> list:
    """Plain fp32 (wav, cache, mel) per request, computed once and shared by every variant's check."""
    return [baseline_chunk(t2w, r, device, keep_mel=True) for r in reqs]


def quality(runner: Token2WavRunner, refs: list, reqs: list[ChunkRequest]) -> dict:
    got = runner.run_chunks(reqs, keep_mel=True)
    rows = []
    for r, res, (wav, cache, mel) in zip(reqs, got, refs):
        if res.error is not None:
            raise RuntimeError(f"runner request failed: {res.error}")
        if res.waveform.shape != wav.shape or res.mel.shape != mel.shape:
            raise RuntimeError(f"shape mismatch: wav {tuple(res.waveform.shape)} vs {tuple(wav.shape)}, "
                               f"mel {tuple(res.mel.shape)} vs {tuple(mel.shape)}")
        if (cache is None) != (res.cache is None):
            raise RuntimeError("cache presence differs from the baseline")
        rows.append(dict(mel_max_abs=float((res.mel - mel).abs().max()), mel_rel_l2=rel_l2(res.mel, mel),
                         wav_max_abs=float((res.waveform - wav).abs().max()), wav_rel_l2=rel_l2(res.waveform, wav),
                         spec_db=spec_db(res.waveform, wav), finite=bool(torch.isfinite(res.waveform).all())))
    return {k: (max(r[k] for r in rows) if k != "finite" else all(r[k] for r in rows)) for k in rows[0]}


# ---- serving comparison --------------------------------------------------------------------------------
SERVING = {
    "old": "graphs captured lazily, no compile, one padded batch",
    "new": "compiled step, graphs captured at start-up, first chunks first in their own groups",
}


def stream_mix(t2w: Token2Wav, device: torch.device, n: int, final_tokens: int, seed0: int = 900
               ) -> list[ChunkRequest]:
    """n chunk calls of n streams in different phases: n/4 first chunks, n/2 middle chunks (hops of 25 at
    growing offsets), n/4 final chunks of 10 s streams. Caches come from a real first chunk (only their
    shapes matter for timing)."""
    out: list[ChunkRequest] = []
    cache = None
    for i in range(n):
        g = torch.Generator().manual_seed(seed0 + i)
        p = make_prompt(g)
        toks = torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, final_tokens), generator=g)
        if cache is None:
            _, cache = t2w.chunk(toks[:, :FIRST_TOKENS + LOOKAHEAD], token_offset=0, finalize=False, streaming=True,
                                 cache=None, generator=torch.Generator(device).manual_seed(1), **p)
            cache = type(cache)(mel=cache.mel.cpu(), source=cache.source.cpu(), speech=cache.speech.cpu())
        phase = i % 4
        if phase == 0:
            out.append(ChunkRequest(tokens=toks[:, :FIRST_TOKENS + LOOKAHEAD], token_offset=0, finalize=False,
                                    streaming=True, seed=seed0 + i, **p))
        elif phase == 3:
            out.append(ChunkRequest(tokens=toks, token_offset=final_tokens - SECOND_HOP, finalize=True,
                                    streaming=False, cache=cache, seed=seed0 + i, **p))
        else:
            offset = min(FIRST_TOKENS + SECOND_HOP * (i % 8), final_tokens - 2 * SECOND_HOP - LOOKAHEAD)
            out.append(ChunkRequest(tokens=toks[:, :offset + SECOND_HOP + LOOKAHEAD], token_offset=offset,
                                    finalize=False, streaming=True, cache=cache, seed=seed0 + i, **p))
    return out


def first_chunk_latency(runner: Token2WavRunner, reqs: list[ChunkRequest], device: torch.device) -> tuple[float, float]:
    """(ms until every first chunk of `reqs` is on the host, ms for the whole call), one call."""
    firsts = {i for i, r in enumerate(reqs) if r.kind == "first"}
    sync(device)
    t0 = time.perf_counter()
    seen: list[float] = []

    def on_group(indices, results, timing):
        if firsts & set(indices):
            seen.append(time.perf_counter())
            firsts.difference_update(indices)
            if not firsts:
                seen.append(seen[-1])
    runner.run_chunks(reqs, on_group=on_group)
    end = time.perf_counter()
    return (seen[-1] - t0) * 1e3, (end - t0) * 1e3


def serving_runner(name: str, flow, hift, device: torch.device, dtype: torch.dtype, compile_mode: str | None,
                   max_batch: int) -> tuple[Token2WavRunner, float]:
    graphs = device.type == "cuda"
    if name == "old":
        runner = Token2WavRunner((flow, hift), device, dtype, use_cuda_graphs=graphs, max_batch=max_batch,
                                 capture_on_demand=True, padding_budget=1e9,
                                 first_chunks_apart=False)   # one padded batch per call, as before
        return runner, 0.0
    runner = Token2WavRunner((flow, hift), device, dtype, use_cuda_graphs=graphs, max_batch=max_batch,
                             compile_estimator=compile_mode is not None, compile_mode=compile_mode or "default",
                             capture_on_demand=False)
    return runner, runner.capture_all(log=log)


def serving_comparison(args, flow, hift, t2w: Token2Wav, device: torch.device, timer: "Timer", results: dict) -> None:
    compile_mode = {"auto": "default" if device.type == "cuda" else None, "off": None}.get(args.compile, args.compile)
    n = args.streams
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    bounds = BF16_BOUNDS if dtype != torch.float32 else FLOAT32_BOUNDS
    q_reqs = make_requests("mixed", 3, t2w, device, seed0=500) + make_requests("mixed", n, t2w, device, seed0=700)
    t0 = time.perf_counter()
    fp32 = Token2WavRunner((flow, hift), device, torch.float32, max_batch=n)
    refs = fp32.run_chunks(q_reqs, keep_mel=True)
    del fp32
    log(f"serving: fp32 eager references for {len(q_reqs)} requests in {time.perf_counter() - t0:.1f} s")
    first1 = make_requests("first", 1, t2w, device, seed0=300)
    mix = stream_mix(t2w, device, n, args.final_tokens)
    offline = make_requests("offline", n, t2w, device, seed0=400)
    offline_audio_s = n * OFFLINE_TOKENS / 25.0
    results["serving_load"] = dict(streams=n, final_tokens=args.final_tokens, offline_tokens=OFFLINE_TOKENS,
                                   prompt_tokens=PROMPT_TOKENS)
    for name in args.serving.split(","):
        row: dict = dict(what=f"{SERVING[name]}; flow {str(dtype).removeprefix('torch.')}")
        try:
            t0 = time.perf_counter()
            runner, startup = serving_runner(name, flow, hift, device, dtype, compile_mode if name == "new" else None, n)
            row["startup_s"] = startup
            graphs_before = runner.graph_count
            t0 = time.perf_counter()
            report = quality_gate(runner, refs, q_reqs, bounds)
            row["quality"] = dict(mel_rel_l2=report.mel_rel_l2, spec_db=report.spec_db, wav_rel_l2=report.wav_rel_l2,
                                  passed=report.passed)
            log(f"serving {name}: quality {report.line()} ({time.perf_counter() - t0:.1f} s)")
            # what the old configuration's first calls pay: captures inside requests (first use of each bucket)
            t0 = time.perf_counter()
            for reqs in (first1, mix, offline):
                runner.run_chunks(reqs)
            sync(device)
            row["first_use_s"] = time.perf_counter() - t0
            row["captured_in_calls"] = runner.graph_count - graphs_before if name == "old" else 0
            row["graphs"] = runner.graph_count
            row["first_b1_ms"], runs = timer(lambda: runner.run_chunks(first1), args.warmup, args.repeats)
            log(f"serving {name}: first chunk B=1 {row['first_b1_ms']:.2f} ms (runs {[round(t, 2) for t in runs]})")
            lat = [first_chunk_latency(runner, mix, device) for _ in range(args.warmup + args.repeats)][args.warmup:]
            row["first_at_16_ms"] = statistics.median(x[0] for x in lat)
            row["mix16_ms"] = statistics.median(x[1] for x in lat)
            log(f"serving {name}: {n}-stream mix: first chunks done {row['first_at_16_ms']:.2f} ms, "
                f"all {row['mix16_ms']:.2f} ms")
            row["offline16_ms"], runs = timer(lambda: runner.run_chunks(offline), args.warmup, args.repeats)
            row["audio_s_per_s"] = offline_audio_s / (row["offline16_ms"] / 1e3)
            log(f"serving {name}: offline B={n} {row['offline16_ms']:.2f} ms = {row['audio_s_per_s']:.1f} audio-s/s")
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            del runner
        except Exception as exc:  # noqa: BLE001 - report and go on with the other configuration
            results["errors"][f"serving-{name}"] = f"{type(exc).__name__}: {exc}"
            log(f"!! serving {name} failed:\n{traceback.format_exc()}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results["serving"][name] = row


def serving_table(results: dict, info: dict) -> None:
    load = results["serving_load"]
    n = load["streams"]
    log("")
    log(f"== token2wav serving configurations on {info['gpu']} ({info['size']} random weights, torch {info['torch']})")
    head = (f"{'config':6s} | {'startup s':>9s} | {'graphs':>6s} | {'1st-use s':>9s} | {'first B=1 ms':>12s} | "
            f"{f'first@{n} ms':>11s} | {f'mix{n} ms':>9s} | {f'offl{n} ms':>9s} | {'audio-s/s':>9s} | quality (mel relL2, LSD dB)")
    log(head)
    log("-" * len(head))
    for name, r in results["serving"].items():
        if "audio_s_per_s" not in r:
            log(f"{name:6s} | failed: {results['errors'].get(f'serving-{name}', '?')}")
            continue
        q = r["quality"]
        log(f"{name:6s} | {r['startup_s']:9.1f} | {r['graphs']:6d} | {r['first_use_s']:9.2f} | {r['first_b1_ms']:12.2f} | "
            f"{r['first_at_16_ms']:11.2f} | {r['mix16_ms']:9.2f} | {r['offline16_ms']:9.2f} | {r['audio_s_per_s']:9.1f} | "
            f"{q['mel_rel_l2']:.2e}, {q['spec_db']:.2f} {'PASS' if q['passed'] else 'FAIL'}")
    for name, r in results["serving"].items():
        log(f"  {name}: {r['what']}" + (f"; {r['captured_in_calls']} graphs captured inside calls"
                                         if r.get("captured_in_calls") else ""))
    log(f"  first@{n} = a {n}-stream mixed batch ({n // 4} first, {n - 2 * (n // 4)} middle, {n // 4} final chunks of "
        f"{load['final_tokens']}-token streams, {load['prompt_tokens']}-token prompts): ms until its first chunks are on "
        f"the host; offl{n} = {n} offline {load['offline_tokens']}-token calls; 1st-use = the first call of each timed "
        f"load (old: incl. lazy captures)")
    log("  targets (H200): first B=1 <= 10 ms, first@16 <= 30 ms, offline >= 300 audio-s/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--serving", default="old,new", help="serving configurations to compare (old, new; '' = none)")
    ap.add_argument("--streams", type=int, default=16, help="serving loads: streams in the mix, offline batch")
    ap.add_argument("--final-tokens", type=int, default=250, help="serving mix: a stream's length (its final chunk)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="serving flow dtype: auto = bfloat16 on CUDA (the stage's default), float32 on CPU")
    ap.add_argument("--compile", default="auto",
                    help="the new configuration's compile mode: auto (default on CUDA, off on CPU), off, default, "
                         "max-autotune-no-cudagraphs")
    ap.add_argument("--variants", default="",
                    help="legacy grid, comma list of: fp32-eager, fp32-graphs, bf16-graphs, fp16-graphs, "
                         "bf16-graphs-tf32hift, bf16-eager (graphs variants fall back to eager on CPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baseline-repeats", type=int, default=2)
    ap.add_argument("--baseline-max-batch", type=int, default=4,
                    help="time the (sequential) baseline up to this batch; larger B is shown as B x per-request (~)")
    ap.add_argument("--skip-baseline-timing", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for results.json (default $OUT)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("CUDA not available; use --device cpu --size tiny")
        return 2
    batches = [int(b) for b in args.batches.split(",") if b]
    scenarios = [s for s in args.scenarios.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    set_tf32(False)
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(1)   # the smoke shares small CPU machines
    info = dict(torch=torch.__version__, device=str(device), size=args.size,
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    log(f"== token2wav speed: {info}")
    t0 = time.perf_counter()
    flow, hift = random_flow_and_hift(args.size)
    log(f"built random {args.size} flow ({sum(p.numel() for p in flow.parameters()) / 1e6:.1f} M params) + HiFT "
        f"({sum(p.numel() for p in hift.parameters()) / 1e6:.1f} M) in {time.perf_counter() - t0:.1f} s")
    flow, hift = flow.to(device), hift.to(device)
    t2w = Token2Wav(flow, hift)
    timer = Timer(device)
    max_b = max(batches)
    results: dict = dict(info=info, times={}, quality={}, errors={}, serving={})
    if args.serving:
        serving_comparison(args, flow, hift, t2w, device, timer, results)
    if variants:
        reqs = {s: make_requests(s, max_b, t2w, device) for s in scenarios}
        # ---- baseline: Token2Wav.chunk, fp32, TF32 off, requests one by one ----
        if not args.skip_baseline_timing:
            for s in scenarios:
                for b in [b for b in batches if b <= args.baseline_max_batch]:
                    def run_base(rs=reqs[s][:b]):
                        for r in rs:
                            baseline_chunk(t2w, r, device)
                    med, all_t = timer(run_base, 1, args.baseline_repeats)
                    results["times"][f"baseline|{s}|{b}"] = med
                    log(f"baseline   {s:8s} B={b:3d}: {med:9.2f} ms  (runs {[round(t, 1) for t in all_t]})")

            measured = [b for b in batches if b <= args.baseline_max_batch]
            for s in scenarios:
                for b in batches:
                    if b not in measured and measured:
                        ref_b = max(measured)
                        results["times"][f"baseline|{s}|{b}"] = results["times"][f"baseline|{s}|{ref_b}"] / ref_b * b
                        results.setdefault("extrapolated", []).append(f"baseline|{s}|{b}")

        # ---- quality references (plain fp32), once ----
        t0 = time.perf_counter()
        q_sets = [make_requests("mixed", 3, t2w, device, seed0=500), make_requests("mixed", max_b, t2w, device, seed0=700)]
        q_refs = [baseline_refs(t2w, q, device) for q in q_sets]
        log(f"quality references: {sum(len(q) for q in q_sets)} requests in {time.perf_counter() - t0:.1f} s")

        # ---- variants ----
        for v in variants:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[v.split("-")[0]]
            graphs = "graphs" in v and device.type == "cuda"
            tf32_hift = v.endswith("tf32hift")
            try:
                set_tf32(tf32_hift)   # only cuDNN/cuBLAS fp32 kernels (HiFT; flow is bf16/fp16 here) are affected
                t0 = time.perf_counter()
                runner = Token2WavRunner((flow, hift), device, dtype, use_cuda_graphs=graphs, max_batch=max(16, max_b))
                # quality: the mixed batch of 3, plus a full batch of each scenario (captures those graphs too)
                q = quality(runner, q_refs[0], q_sets[0])
                qs = quality(runner, q_refs[1], q_sets[1])
                q = {k: (max(q[k], qs[k]) if k != "finite" else q[k] and qs[k]) for k in q}
                gate = "float32" if dtype == torch.float32 and not tf32_hift else "reduced"
                # gate on the mel (what the flow's precision changes); spec dB is reported, not gated: on random weights
                # HiFT's F0 head turns small mel differences into F0 shifts that move whole harmonic combs
                q["pass"] = bool(q["finite"] and q["mel_rel_l2"] <= MEL_REL_L2_MAX[gate])
                results["quality"][v] = q
                log(f"quality    {v:22s}: mel max|d|={q['mel_max_abs']:.2e} relL2={q['mel_rel_l2']:.2e} | wav max|d|="
                    f"{q['wav_max_abs']:.2e} relL2={q['wav_rel_l2']:.2e} spec={q['spec_db']:.3f} dB | "
                    f"{'PASS' if q['pass'] else 'FAIL'} ({time.perf_counter() - t0:.1f} s incl. capture)")
                for s in scenarios:
                    for b in batches:
                        rs = reqs[s][:b]
                        med, all_t = timer(lambda rs=rs: runner.run_chunks(rs), args.warmup, args.repeats)
                        results["times"][f"{v}|{s}|{b}"] = med
                        log(f"{v:22s} {s:8s} B={b:3d}: {med:9.2f} ms  (runs {[round(t, 2) for t in all_t]})")
                if device.type == "cuda":
                    log(f"  {v}: {runner.graph_count} graphs, peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
                del runner
            except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
                results["errors"][v] = f"{type(exc).__name__}: {exc}"
                log(f"!! variant {v} failed:\n{traceback.format_exc()}")
            finally:
                set_tf32(False)
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "token2wav_speed.json").write_text(json.dumps(results, indent=2))

    if variants:
        # ---- tables ----
        cols = (["baseline"] if not args.skip_baseline_timing else []) + [v for v in variants if v not in results["errors"]]
        log("")
        log(f"== token2wav on {info['gpu']} ({info['size']} random weights, torch {info['torch']}); "
            f"ms per batch (per request), median")
        head = f"{'scenario':8s} {'B':>3s} | " + " | ".join(f"{c:>25s}" for c in cols)
        log(head)
        log("-" * len(head))
        for s in scenarios:
            for b in batches:
                cells = []
                base = results["times"].get(f"baseline|{s}|{b}")
                for c in cols:
                    t = results["times"].get(f"{c}|{s}|{b}")
                    if t is None:
                        cells.append(f"{'-':>25s}")
                        continue
                    sp = f" x{base / t:5.1f}" if base and c != "baseline" else "       "
                    approx = "~" if f"{c}|{s}|{b}" in results.get("extrapolated", []) else " "
                    cells.append(f"{approx}{t:8.2f} ({t / b:7.2f}){sp}")
                log(f"{s:8s} {b:3d} | " + " | ".join(cells))
        log("  ~ = baseline extrapolated (B x its per-request time at the largest measured batch; it runs requests one by one)")
        log("")
        log("quality vs plain fp32 Token2Wav.chunk (worst request; spec = mean |log-STFT diff| dB, phase-insensitive;")
        log(f"  gate: finite and mel relL2 <= {MEL_REL_L2_MAX['float32']} (fp32) / {MEL_REL_L2_MAX['reduced']} (bf16/fp16/TF32); "
            f"waveform and spec are informative: HiFT's phase (float32 cumsum) and random-weight F0 head amplify mel error;")
        log(f"  for reference, fp32 runs land near spec {SPEC_DB_MAX['float32']} dB and the fp32 waveform max|d| near 1e-3)")
        for v, q in results["quality"].items():
            log(f"  {v:24s} mel max|d| {q['mel_max_abs']:.2e} relL2 {q['mel_rel_l2']:.2e} | wav max|d| {q['wav_max_abs']:.2e} "
                f"relL2 {q['wav_rel_l2']:.2e} | spec {q['spec_db']:.3f} dB | {'PASS' if q['pass'] else 'FAIL'}")
        for v, e in results["errors"].items():
            log(f"  {v:24s} ERROR {e}")
    if args.serving:
        serving_table(results, info)
    passed = all(q["pass"] for q in results["quality"].values()) and all(
        r.get("quality", {}).get("passed", False) for r in results["serving"].values())
    return 0 if not results["errors"] and passed else 1


if __name__ == "__main__":
    sys.exit(main())
