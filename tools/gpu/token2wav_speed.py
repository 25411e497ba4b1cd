#!/usr/bin/env python
"""token2wav speed + quality: plain Token2Wav.chunk (fp32, one request at a time) vs Token2WavRunner variants.

Self-contained: builds a random flow + HiFT in memory (cosyvoice_tools.modelgen's builders, no model dir),
checks every fast variant against the plain fp32 path (mel and waveform per request, for a mixed batch of a
first streaming chunk, a middle chunk with a vocoder cache and an offline call), then times each scenario at
each batch size with CUDA events (warm-up first, median of repeats). The last lines printed are the tables.

GPU:  python tools/gpu/token2wav_speed.py --device cuda --size full
CPU:  python tools/gpu/token2wav_speed.py --device cpu --size tiny --batches 1,2 --repeats 2   (logic check)

Scenarios (prompt: 75 tokens = 3 s, 150 prompt mel frames):
  first   streaming first chunk: 15 + 3 look-ahead tokens, token_offset 0, no cache
  middle  streaming middle chunk: tokens[:15+25+3], token_offset 15, cache from the first chunk
  offline one-pass 6 s utterance: 150 tokens, finalize, not streaming
  mixed   B requests cycling first/middle/offline in one batch
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

from cosyvoice_common.constants import MEL_BINS, SPEAKER_EMBEDDING_DIM, SPEECH_CODEBOOK_SIZE  # noqa: E402
from cosyvoice_common.modelconfig import add_source_defaults  # noqa: E402
from cosyvoice_token2wav.flow import CausalMaskedDiffWithXvec  # noqa: E402
from cosyvoice_token2wav.hift import HiFTGenerator, load_hift_state  # noqa: E402
from cosyvoice_token2wav.runner import ChunkRequest, Token2WavRunner  # noqa: E402
from cosyvoice_token2wav.token2wav import Token2Wav  # noqa: E402

PROMPT_TOKENS = 75
FIRST_TOKENS, LOOKAHEAD, SECOND_HOP = 15, 3, 25
OFFLINE_TOKENS = 150
SCENARIOS = ("first", "middle", "offline", "mixed")
# quality gates for the reduced-precision variants (fp32 variants must match to rounding)
MEL_REL_L2_MAX = {"float32": 1e-4, "reduced": 2e-2}
SPEC_DB_MAX = {"float32": 0.05, "reduced": 2.0}


def log(msg: str) -> None:
    print(msg, flush=True)


def build_models(size: str, seed: int = 1) -> tuple[CausalMaskedDiffWithXvec, HiFTGenerator]:
    from cosyvoice_tools import modelgen as mg
    cfg = add_source_defaults(mg.model_config(size))
    flow = CausalMaskedDiffWithXvec.from_config(cfg["flow"])
    flow.load_state_dict(mg.random_state_dict(mg.flow_param_shapes(cfg["flow"]), mg._generator(seed, "flow")))
    gen = mg._generator(seed, "hift")
    hsd = mg.random_state_dict(mg.hift_param_shapes(cfg["hift"]), gen, mg._hift_strides(cfg["hift"]))
    mg._shape_hift(hsd, cfg["hift"], gen)
    hift = HiFTGenerator.from_config(cfg["hift"])
    load_hift_state(hift, hsd)
    return flow.eval(), hift.fold_weight_norm().eval()


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


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def spec_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |log-magnitude STFT difference| in dB (phase-insensitive audio distance)."""
    n_fft, hop = 512, 128
    if a.numel() < n_fft:
        return 0.0
    win = torch.hann_window(n_fft, dtype=torch.float64)
    sa = torch.stft(a.double().flatten(), n_fft, hop, window=win, return_complex=True).abs()
    sb = torch.stft(b.double().flatten(), n_fft, hop, window=win, return_complex=True).abs()
    floor = float(sb.max()) * 1e-3                     # -60 dB under the loudest bin: quiet bins don't dominate
    return float((20 * (sa + floor).log10() - 20 * (sb + floor).log10()).abs().mean())


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--variants", default="fp32-graphs,bf16-graphs,fp16-graphs,bf16-graphs-tf32hift",
                    help="comma list of: fp32-eager, fp32-graphs, bf16-graphs, fp16-graphs, bf16-graphs-tf32hift, "
                         "bf16-eager (graphs variants fall back to eager on CPU)")
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
    info = dict(torch=torch.__version__, device=str(device), size=args.size,
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    log(f"== token2wav speed: {info}")
    t0 = time.perf_counter()
    flow, hift = build_models(args.size)
    log(f"built random {args.size} flow ({sum(p.numel() for p in flow.parameters()) / 1e6:.1f} M params) + HiFT "
        f"({sum(p.numel() for p in hift.parameters()) / 1e6:.1f} M) in {time.perf_counter() - t0:.1f} s")
    flow, hift = flow.to(device), hift.to(device)
    t2w = Token2Wav(flow, hift)
    timer = Timer(device)
    max_b = max(batches)
    reqs = {s: make_requests(s, max_b, t2w, device) for s in scenarios}
    results: dict = dict(info=info, times={}, quality={}, errors={})

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
    return 0 if not results["errors"] and all(q["pass"] for q in results["quality"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
