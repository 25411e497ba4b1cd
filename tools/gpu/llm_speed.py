#!/usr/bin/env python
"""LLM engine speed per variant in one run, + quality checks.

Self-contained: builds a random Qwen2LM of CosyVoice2-0.5B's shape in memory (no files), then
  1. checks: per-step log-probs of the engine's model path (fused projections, kv-bounded attention, fresh prefill)
     in fp32 and bf16, and of the plain path (unfused, per-slot prefill and decode_step) in bf16, against a
     cache-free fp32 forward (teacher forcing, same tokens): max |dlogp|, argmax agreement, NaN count; greedy tokens
     of each engine variant against the first variant run (agreement % and first divergence);
  2. per variant: start-up seconds (engine build + CUDA-graph capture, + compile), the decode step at each batch
     with CUDA events (warm-up, median): 'dev ms' = the captured graph's replay (or the eager step), 'eng ms' = a
     whole engine.step() (host bookkeeping + the D2H copy, while the step launched ahead runs);
  3. end to end: C concurrent requests (100-token prompt, 150 forced tokens, RAS sampling) through the engine's
     loop thread: time to first token (p50/max) and tokens/s.
The last lines printed are the tables (a compact one last). Full results go to $OUT/llm_speed.json when $OUT is set.

GPU:  python tools/gpu/llm_speed.py                                   (engine; batches 1,16,32,64; c=1,16,32)
      python tools/gpu/llm_speed.py --variants engine,engine-compiled (compile: minutes of start-up)
CPU:  python tools/gpu/llm_speed.py --device cpu --tiny --dtype float32   (smoke: tiny shapes, no graphs)

Variants: engine (what the llm stage runs: prefill graphs per (rows, length) bucket - the same padded shapes
eagerly on CPU -, one prefill group per step, top-k sampling, the next step launched before this one's ids are
read), engine-compiled (the same + torch.compile of the decode step, then graphs).
Against an earlier commit: check it out beside this tree (`git worktree add /tmp/old <commit>`) and run both
scripts in one command, each from its own tree, e.g. `python /tmp/old/tools/gpu/llm_speed.py --variants new ...;
python tools/gpu/llm_speed.py ...` (its variant names are those of its own docstring).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
for _sub in ("common", "services/llm"):
    _p = str(_REPO / _sub)
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from cosyvoice_common.constants import SPEECH_EOS, SPEECH_ID_OFFSET  # noqa: E402
from cosyvoice_common.stage_params import LLMParams  # noqa: E402
from cosyvoice_llm.engine import LLMEngine  # noqa: E402
from cosyvoice_llm.model import Qwen2LM, build_prompt_flat_ids  # noqa: E402
from cosyvoice_llm.sampling import SamplingParams  # noqa: E402
from cosyvoice_llm.sequence import LLMRequest  # noqa: E402

QWEN2_0_5B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True}
TINY_QWEN2 = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True}
GREEDY = SamplingParams.greedy()
RAS = SamplingParams()


def log(msg: str) -> None:
    print(msg, flush=True)


def qwen_cfg(tiny: bool) -> dict:
    return dict(TINY_QWEN2 if tiny else QWEN2_0_5B)


def build_state(tiny: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random fp32 weights (default init; speech head x4 for clearer greedy margins), on the CPU."""
    cfg = qwen_cfg(tiny)
    torch.manual_seed(seed)
    h = cfg["hidden_size"]
    model = Qwen2LM.from_config({"llm_input_size": h, "llm_output_size": h}, cfg)
    with torch.no_grad():
        model.llm_decoder.weight.mul_(4.0)
    return model.state_dict()


def make_model(cls, tiny: bool, state: dict, device: str, dtype: torch.dtype):
    cfg = qwen_cfg(tiny)
    h = cfg["hidden_size"]
    with torch.device("meta"):
        model = cls.from_config({"llm_input_size": h, "llm_output_size": h}, cfg)
    model.load_state_dict(state, assign=True)
    if cfg["tie_word_embeddings"]:
        model.llm.model.lm_head.weight = model.llm.backbone.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


def prompt_ids(n_tokens: int, seed: int, text_vocab: int) -> tuple[int, ...]:
    """A flat prompt of exactly n_tokens: sos, text, task, prompt speech (about a third text)."""
    gen = torch.Generator().manual_seed(seed)
    n_text = max(1, n_tokens // 3)
    n_speech = max(0, n_tokens - n_text - 2)
    text = torch.randint(0, text_vocab, (n_text,), generator=gen).tolist()
    speech = torch.randint(0, 6561, (n_speech,), generator=gen).tolist()
    return tuple(build_prompt_flat_ids(text, [], speech))


# --- variants ---------------------------------------------------------------------------------------------------

def variant_specs(args) -> dict[str, dict]:
    """Variant name -> LLMParams fields beyond the run's slots and positions."""
    engine = dict(cuda_graphs=args.device == "cuda")
    if args.tiny and args.device == "cpu":
        engine["kv_buckets"] = (16, 32)
    specs = {"engine": engine, "engine-compiled": dict(engine, compile_decode=True)}
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in specs]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(specs)}")
    return {k: specs[k] for k in chosen}


def make_engine(fields: dict, model: Qwen2LM, args) -> tuple[LLMEngine, float]:
    t0 = time.perf_counter()
    eng = LLMEngine(model, LLMParams(max_seq_len=args.max_seq_len, **fields), batch_slots=args.slots)
    if eng.runner.use_graphs:
        eng.runner.capture_graphs()
    return eng, time.perf_counter() - t0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_step_fn(eng: LLMEngine):
    """A callable running one decode step over the running slots exactly as engine.step() would (graph or
    eager); its batch bucket and kv bucket."""
    runner = eng.runner
    n, kv = runner.decode_shape(eng.scheduler.running())
    graph = runner._decode_graphs.get(n, {}).get(kv)
    return (graph.replay if graph is not None else (lambda: runner._step_fn(n, kv))), n, kv


def time_ms(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def time_decode(eng: LLMEngine, b: int, args) -> dict:
    """b requests with a `context`-token prompt; times the device step and the whole engine step."""
    text_vocab = min(qwen_cfg(args.tiny)["vocab_size"], SPEECH_ID_OFFSET)   # text ids sit below the speech ids
    long = args.warmup * 2 + args.repeats * 2 + 10
    for i in range(b):
        eng.submit(LLMRequest(f"t{b}-{i}", prompt_ids(args.context, 1000 + i, text_vocab), max_new_tokens=long,
                              min_new_tokens=long, sampling=RAS, seed=i))
    eng.step()
    while eng.num_waiting:
        eng.step()
    fn, n, kv = device_step_fn(eng)
    dev_ms = time_ms(fn, args.device, args.warmup, args.repeats)
    for seq in eng.scheduler.running():   # the device positions moved without the host loop: keep the mirror in step
        seq.next_position += args.warmup + args.repeats
    eng_ms = time_ms(eng.step, args.device, args.warmup, args.repeats)
    for i in range(b):
        eng.cancel(f"t{b}-{i}")
    eng.step()
    assert eng.num_running == 0, "decode timing left requests running"
    return {"batch": b, "bucket": n, "kv_len": kv, "dev_ms": dev_ms, "eng_ms": eng_ms,
            "tok_s": b / eng_ms * 1e3}


def run_e2e(eng: LLMEngine, concurrency: int, args, sampling=RAS, tag: str = "e") -> dict:
    """`concurrency` requests submitted at once to the running loop thread; forced length."""
    text_vocab = min(qwen_cfg(args.tiny)["vocab_size"], SPEECH_ID_OFFSET)   # text ids sit below the speech ids
    reqs = [LLMRequest(f"{tag}{concurrency}-{i}", prompt_ids(args.prompt_tokens, 2000 + i, text_vocab),
                       max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, sampling=sampling,
                       seed=i) for i in range(concurrency)]
    first: dict[str, float] = {}
    done = threading.Event()
    lock = threading.Lock()
    finished = [0]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}

    def cb(out) -> None:
        now = time.perf_counter()
        with lock:
            if out.tokens and out.request_id not in first:
                first[out.request_id] = now
            tokens[out.request_id].extend(out.tokens)
            if out.finished:
                finished[0] += 1
                if finished[0] == len(reqs):
                    done.set()

    eng.start()
    try:
        t0 = time.perf_counter()
        for r in reqs:
            eng.submit(r, cb)
        if not done.wait(timeout=args.e2e_timeout_s):
            raise TimeoutError(f"e2e c={concurrency} did not finish in {args.e2e_timeout_s} s")
        wall = time.perf_counter() - t0
    finally:
        eng.stop()
    ttft = sorted((first[r.request_id] - t0) * 1e3 for r in reqs if r.request_id in first)
    n_tok = sum(len(v) for v in tokens.values())
    return {"concurrency": concurrency, "wall_s": wall, "tokens": n_tok, "tok_s": n_tok / wall,
            "ttft_ms_p50": statistics.median(ttft), "ttft_ms_max": ttft[-1], "ttft_ms_min": ttft[0],
            "tokens_by_request": [tokens[r.request_id] for r in reqs]}


# --- checks -----------------------------------------------------------------------------------------------------

@torch.inference_mode()
def logits_checks(models_by_name: dict, args) -> list[dict]:
    """Teacher-forced per-step log-probs over the cached paths against a cache-free fp32 forward."""
    text_vocab = min(qwen_cfg(args.tiny)["vocab_size"], SPEECH_ID_OFFSET)   # text ids sit below the speech ids
    dev = args.device
    b, steps = 4, 8
    prompts = [prompt_ids(max(4, args.prompt_tokens - 7 * i), 3000 + i, text_vocab) for i in range(b)]
    gen = torch.Generator().manual_seed(7)
    fed = torch.randint(0, 6561, (b, steps), generator=gen)
    ref_model = models_by_name["ref-fp32"][0]
    ref = []
    for i, p in enumerate(prompts):
        ids = list(p) + [SPEECH_ID_OFFSET + int(c) for c in fed[i]]
        hidden = ref_model.forward_hidden(torch.tensor([ids], device=dev))[0]
        ref.append(ref_model.speech_logp(hidden[len(p) - 1:]))          # [steps + 1, V]
    ref = torch.stack(ref)                                               # [b, steps + 1, V]
    results = []
    for name, (model, path) in models_by_name.items():
        if name == "ref-fp32":
            continue
        got = torch.empty_like(ref)
        backbone = model.llm.backbone
        slots = torch.arange(b, device=dev)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        if path == "fast":
            longest = int(lens.max())
            ids = torch.tensor([list(p) + [p[0]] * (longest - len(p)) for p in prompts], device=dev)
            pos = torch.arange(longest, device=dev).expand(b, -1)
            hidden = backbone(model.embed_flat(ids), pos, slots, fresh=True)
            got[:, 0] = model.speech_logp(hidden[torch.arange(b, device=dev), lens - 1]).float()
            kv = 1 << (longest + steps).bit_length()     # a power of two above every position fed
            kv = min(kv, backbone.max_seq_len)
            for t in range(steps):
                emb = model.speech_embedding(fed[:, t].to(dev))[:, None]
                hidden = backbone(emb, (lens + t)[:, None], slice(0, b), kv_len=kv)
                got[:, t + 1] = model.speech_logp(hidden[:, 0]).float()
        else:
            for i, p in enumerate(prompts):
                got[i, 0] = model.prefill(torch.tensor(p, device=dev), slots[i:i + 1]).float()
            for t in range(steps):
                got[:, t + 1] = model.decode_step(fed[:, t].to(dev), lens + t, slots).float()
        finite = torch.isfinite(ref)
        diff = (got - ref).abs()[finite]
        nan = int(torch.isnan(got).sum())
        mask = torch.ones(ref.shape[-1], dtype=torch.bool, device=dev)
        mask[SPEECH_EOS:] = False
        ra, ga = ref[..., :SPEECH_EOS].argmax(-1), got[..., :SPEECH_EOS].argmax(-1)
        top2 = ref[..., :SPEECH_EOS].topk(2, dim=-1).values
        margin = (top2[..., 0] - top2[..., 1])
        clear = margin > 2 * float(diff.max())
        results.append({"check": name, "max_abs_dlogp": float(diff.max()), "mean_abs_dlogp": float(diff.mean()),
                        "argmax_agree": float((ra == ga).float().mean()),
                        "argmax_agree_clear_margin": float((ra == ga)[clear].float().mean()) if clear.any() else None,
                        "nan": nan})
    return results


def token_agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = total = 0
    first_div = []
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        same += sum(1 for i in range(n) if x[i] == y[i])
        total += max(len(x), len(y))
        if x != y:
            first_div.append(next((i for i in range(n) if x[i] != y[i]), n))
    return {"agree": same / max(total, 1), "identical_requests": sum(1 for x, y in zip(a, b) if x == y),
            "requests": len(a), "min_first_divergence": min(first_div) if first_div else None}   # None: all identical


def summary_table(report: dict, batches: list[int], args) -> None:
    """One line per variant: start-up, TTFT p50 per concurrency, decode step per batch, tokens/s per concurrency."""
    concs = [int(c) for c in args.e2e.split(",")]
    log(f"SUMMARY ({args.device}, {args.dtype}{', tiny' if args.tiny else ''}; TTFT p50 ms; decode dev/eng ms; "
        f"tok/s end to end)")
    head = (f"  {'variant':<13}{'start s':>8}" + "".join(f"{'ttft c=' + str(c):>11}" for c in concs)
            + "".join(f"{'B=' + str(b):>14}" for b in batches) + "".join(f"{'tok/s c=' + str(c):>12}" for c in concs))
    log(head)
    for name in report["setup_s"]:
        es = {e["concurrency"]: e for e in report["e2e"].get(name, [])}
        rows = {r["batch"]: r for r in report["decode"].get(name, [])}
        line = f"  {name:<13}{report['setup_s'][name]:8.1f}"
        line += "".join(f"{es[c]['ttft_ms_p50']:11.1f}" if c in es else f"{'-':>11}" for c in concs)
        line += "".join(f"{rows[b]['dev_ms']:7.3f}/{rows[b]['eng_ms']:6.3f}" if b in rows else f"{'-':>14}"
                        for b in batches)
        line += "".join(f"{es[c]['tok_s']:12.0f}" if c in es else f"{'-':>12}" for c in concs)
        log(line)


# --- main -------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,16,32,64")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--context", type=int, default=140,
                    help="prompt tokens before decode timing (+ 2 x (warmup + repeats) steps stay under 256)")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--gen-tokens", type=int, default=150)
    ap.add_argument("--e2e", default="1,16,32", help="concurrencies of the end-to-end runs")
    ap.add_argument("--e2e-timeout-s", type=float, default=120)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--variants", default="engine", help="comma list (see above)")
    ap.add_argument("--skip-checks", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        args.max_seq_len = min(args.max_seq_len, 64)
        args.context, args.prompt_tokens, args.gen_tokens = 10, 8, 12
        args.slots = min(args.slots, 8)
        args.batches = ",".join(b for b in args.batches.split(",") if int(b) <= args.slots) or "1"
        args.e2e = ",".join(str(c) for c in sorted({min(int(c), args.slots) for c in args.e2e.split(",")}))
        args.warmup, args.repeats = min(args.warmup, 2), min(args.repeats, 3)
    dev, dtype = args.device, getattr(torch, args.dtype)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if dev == "cuda":
        log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    report: dict = {"args": vars(args), "errors": {}}

    t0 = time.perf_counter()
    state = build_state(args.tiny)
    model = make_model(Qwen2LM, args.tiny, state, dev, dtype)
    log(f"models built in {time.perf_counter() - t0:.1f} s")

    # 1. logits checks (separate model objects: the engines' caches stay untouched)
    if not args.skip_checks:
        try:
            ref = make_model(Qwen2LM, args.tiny, state, dev, torch.float32)
            fast32 = make_model(Qwen2LM, args.tiny, state, dev, torch.float32)
            fast16 = make_model(Qwen2LM, args.tiny, state, dev, dtype)
            plain16 = make_model(Qwen2LM, args.tiny, state, dev, dtype)
            for m in (fast32, fast16, plain16):
                m.setup_caches(4, args.max_seq_len)
            for m in (fast32, fast16):
                m.llm.backbone.fuse_projections()
            checks = logits_checks({"ref-fp32": (ref, "ref"), "fast-fp32": (fast32, "fast"),
                                    f"fast-{args.dtype}": (fast16, "fast"),
                                    f"plain-{args.dtype}": (plain16, "plain")}, args)
            report["logits_checks"] = checks
            del ref, fast32, fast16, plain16
        except Exception:
            report["errors"]["logits_checks"] = traceback.format_exc()
            log(report["errors"]["logits_checks"])
        if dev == "cuda":
            torch.cuda.empty_cache()

    # 2. decode step timing + 3. e2e, per variant
    specs = variant_specs(args)
    batches = [int(b) for b in args.batches.split(",")]
    report["decode"], report["e2e"], report["setup_s"], report["greedy"] = {}, {}, {}, {}
    greedy_ref = None
    for name, fields in specs.items():
        try:
            eng, setup_s = make_engine(fields, model, args)
            report["setup_s"][name] = setup_s
            log(f"[{name}] engine ready in {setup_s:.1f} s (graphs/compile included)")
            rows = []
            for b in batches:
                rows.append(time_decode(eng, b, args))
                log(f"[{name}] batch {b}: dev {rows[-1]['dev_ms']:.3f} ms, engine step {rows[-1]['eng_ms']:.3f} ms")
            report["decode"][name] = rows
            # greedy tokens vs the plain engine (8 requests, forced length)
            g = run_e2e(eng, min(8, args.slots), args, sampling=GREEDY, tag="g")["tokens_by_request"]
            if greedy_ref is None:
                greedy_ref = (name, g)
            report["greedy"][name] = {"vs": greedy_ref[0], **token_agreement(greedy_ref[1], g)}
            report["e2e"][name] = []
            for c in (int(x) for x in args.e2e.split(",")):
                e = run_e2e(eng, min(c, args.slots), args)
                e.pop("tokens_by_request")
                report["e2e"][name].append(e)
                log(f"[{name}] e2e c={e['concurrency']}: {e['tok_s']:.0f} tok/s, ttft p50 {e['ttft_ms_p50']:.1f} ms "
                    f"max {e['ttft_ms_max']:.1f} ms")
            del eng
        except Exception:
            report["errors"][name] = traceback.format_exc()
            log(f"[{name}] FAILED:\n{report['errors'][name]}")
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "llm_speed.json").write_text(json.dumps(report, indent=1, default=str))

    # tables last
    log("")
    if report.get("logits_checks"):
        log("checks vs cache-free fp32 forward (teacher forced, 4 seqs x 9 steps): max|dlogp|  argmax-agree  "
            "(on clear margins)  NaN")
        for c in report["logits_checks"]:
            clear = "-" if c["argmax_agree_clear_margin"] is None else f"{c['argmax_agree_clear_margin']:.3f}"
            log(f"  {c['check']:<16} {c['max_abs_dlogp']:10.2e}  {c['argmax_agree']:.3f}  ({clear})  {c['nan']}")
    if report["greedy"]:
        log("greedy tokens (8 req x forced length) vs the first variant run:")
        for name, g in report["greedy"].items():
            log(f"  {name:<15} agree {g['agree']:.3f}  identical {g['identical_requests']}/{g['requests']}  "
                f"first divergence at step {g['min_first_divergence']}")
    log(f"decode step, context {args.context} tokens, max_seq_len {args.max_seq_len}, {args.dtype} "
        f"(dev = graph replay / eager step, CUDA events median; eng = engine.step incl. host + D2H):")
    log("  " + f"{'variant':<15}" + "".join(f"   B={b:<3} dev/eng ms " for b in batches))
    for name, rows in report["decode"].items():
        log("  " + f"{name:<15}" + "".join(f"  {r['dev_ms']:7.3f}/{r['eng_ms']:7.3f}  " for r in rows))
    if report["e2e"]:
        log(f"end to end: {args.prompt_tokens}-token prompts, {args.gen_tokens} forced tokens, RAS:")
        for name, es in report["e2e"].items():
            log(f"  {name:<15} " + "  ".join(
                f"c={e['concurrency']}: {e['tok_s']:7.0f} tok/s ttft p50/max {e['ttft_ms_p50']:6.1f}/"
                f"{e['ttft_ms_max']:6.1f} ms" for e in es))
    if report["setup_s"]:
        log("  setup s (capture/compile): " + ", ".join(f"{k} {v:.1f}" for k, v in report["setup_s"].items()))
    summary_table(report, batches, args)
    if report["errors"]:
        log(f"ERRORS in: {sorted(report['errors'])}")


if __name__ == "__main__":
    main()
