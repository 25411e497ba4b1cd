#!/usr/bin/env python
"""token2wav alone: the work and the time of streams, this tree beside a baseline tree, in one run.

Self-contained: a random flow + HiFT built in memory (cosyvoice_tools.modelgen's builder, same seed in both
trees), requests made here; no servers. Streams are chunked as the gateway chunks them (cosyvoice_gateway.schedule:
15 + 3 tokens, then hops of 25, 50, 100, ...), each chunk call made when the previous one answered.

Scenarios:
  streams   S streams (T tokens on a P-token prompt) one after another, per configuration:
              recompute     every call computes its whole prefix (the state cache off: the reference's work)
              new voice     state cache on, the prompt prefilled first (the gateway sends it while the LLM decodes)
              cached voice  state cache on, the voice's prompt blocks left by an earlier stream
            reported: flow frames computed per frame of audio, ms per stream (chunk calls, prefill apart),
            first chunk ms
  mix       16 calls at once (4 first chunks, 8 middle chunks, 4 final chunks): ms until the first chunks are
            answered, and until all are; the first chunk alone at B=1 (--mix-streams to change 16)

With --baseline-dir DIR (a checkout of another commit, e.g. `git worktree add /tmp/base 5f4333b`) the same
scenarios run there too, in a subprocess that imports that tree's token2wav (Token2WavRunner or
Token2WavEngine, whichever it has), and the tables put the two side by side.

CPU (issue 20's table):
  python tools/gpu/token2wav_speed.py --device cpu --size full --streams 3 --baseline-dir /tmp/base
GPU:
  python tools/gpu/token2wav_speed.py --device cuda --size full --dtype bfloat16 --baseline-dir /tmp/base
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
_PACKAGES = ("common", "services/token2wav", "services/gateway", "tools")


def _use_tree(root: Path) -> None:
    for sub in reversed(_PACKAGES):
        path = str(root / sub)
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


if __name__ == "__main__":
    _tree = Path(sys.argv[sys.argv.index("--tree") + 1]) if "--tree" in sys.argv else _REPO
    _use_tree(_tree)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cosyvoice_common.constants import MEL_BINS, SPEAKER_EMBEDDING_DIM, SPEECH_CODEBOOK_SIZE  # noqa: E402
try:
    from cosyvoice_gateway.schedule import plan  # noqa: E402
except ImportError:        # a tree from before the chunk schedule moved to the gateway
    from cosyvoice_common.schedule import plan  # noqa: E402
from cosyvoice_tools.modelgen import random_flow_and_hift  # noqa: E402

try:
    from cosyvoice_token2wav.engine import Token2WavEngine
    from cosyvoice_token2wav.sequence import ChunkRequest
    API = "engine"
except ImportError:        # a tree from before the engine
    from cosyvoice_token2wav.runner import ChunkRequest, Token2WavRunner
    API = "runner"

_MS = 1000.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Backend:
    """One tree's token2wav: `run(requests)` -> (results, ms at which each request was answered)."""

    def __init__(self, models, device: torch.device, dtype: torch.dtype, cache_bytes: int, max_batch: int,
                 graphs: bool) -> None:
        self.device = device
        sync(device)
        t0 = time.perf_counter()
        if API == "engine":
            self.impl = Token2WavEngine(models, device, dtype, cache_bytes=cache_bytes, max_batch=max_batch,
                                        use_cuda_graphs=graphs)
            self.impl.capture_graphs()
        else:
            # no Inductor compile: the baseline stack ran with TOKEN2WAV_COMPILE=off, and it costs minutes of start-up
            self.impl = Token2WavRunner(models, device, dtype, use_cuda_graphs=graphs, max_batch=max_batch,
                                        compile_estimator=False, capture_on_demand=False)
            self.impl.capture_all()
        sync(device)
        self.startup_s = time.perf_counter() - t0
        print(f"{API}: start-up (graph capture) {self.startup_s:.1f} s, cache {cache_bytes / (1 << 30):.1f} GiB, "
              f"graphs {graphs}", file=sys.stderr)

    @property
    def frames(self) -> tuple[int, int]:
        """(flow frames computed, frames read from the state cache) so far; None for a tree that does not count."""
        return (self.impl.frames_computed, self.impl.frames_reused) if API == "engine" else (None, None)

    def run(self, requests: list) -> tuple[list, list[float]]:
        sync(self.device)
        t0 = time.perf_counter()
        done_ms = [0.0] * len(requests)
        if API == "engine":
            results = [None] * len(requests)

            def on_done(i):
                def answer(result, stats):
                    results[i] = result
                    done_ms[i] = (time.perf_counter() - t0) * _MS
                return answer
            for i, r in enumerate(requests):
                self.impl.submit(r, on_done(i))
            while any(r is None for r in results):
                self.impl.step()
        else:
            def on_group(indices, group_results, timing):
                for i in indices:
                    done_ms[i] = (time.perf_counter() - t0) * _MS
            results = self.impl.run_chunks(requests, on_group=on_group)
        for r in results:
            if r.error is not None:
                raise RuntimeError(f"a call failed: {r.error}")
        return results, done_ms


def make_voice(seed: int, n_prompt: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_tokens=torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, n_prompt), generator=g),
                prompt_feat=torch.randn(1, 2 * n_prompt, MEL_BINS, generator=g) * 2.0 - 5.0,
                embedding=torch.randn(1, SPEAKER_EMBEDDING_DIM, generator=g))


def make_tokens(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, n), generator=torch.Generator().manual_seed(10_000 + seed))


def prefill_request(voice: dict) -> "ChunkRequest":
    return ChunkRequest(tokens=torch.zeros(1, 0, dtype=torch.long), prefill=True, finalize=False, streaming=True,
                        **voice)


def run_stream(backend: Backend, voice: dict, tokens: torch.Tensor, seed: int) -> tuple[list[float], int]:
    """One stream, chunk after chunk; per-chunk ms and the audio frames it made."""
    cache, times, frames = None, [], 0
    for c in plan(tokens.size(1)):
        req = ChunkRequest(tokens=tokens[:, :c.end], token_offset=c.token_offset, finalize=c.finalize,
                           streaming=not c.finalize, cache=cache, seed=seed + c.index, **voice)
        (result,), (ms,) = backend.run([req])
        times.append(ms)
        cache = result.cache
        frames += 2 * (c.end - c.token_offset - (0 if c.finalize else 3))
    return times, frames


_BACKENDS: dict = {}


def backend_for(models, device, dtype, cache_gib: float, max_batch: int, graphs: bool) -> Backend:
    """One engine per (cache budget, batch): graph capture costs start-up time, so configurations that differ only
    in their voices share it (each configuration draws its own voices and tokens: no content is shared)."""
    key = (cache_gib, max_batch)
    if key not in _BACKENDS:
        _BACKENDS[key] = Backend(models, device, dtype, int(cache_gib * (1 << 30)), max_batch, graphs)
    return _BACKENDS[key]


def scenario_streams(args, models, device, dtype) -> dict:
    configs = [("recompute", 0, False, False)]
    if API == "engine":
        configs += [("new voice", args.cache_gib, True, False), ("cached voice", args.cache_gib, True, True)]
    out = {}
    bar = tqdm(total=len(configs) * args.streams, desc=f"streams ({API})", unit="stream", file=sys.stderr)
    for n_config, (name, cache_gib, prefill, warm_voice) in enumerate(configs):
        backend = backend_for(models, device, dtype, cache_gib, max(16, args.max_batch), args.graphs)
        first_computed = backend.frames[0]
        first_reused = backend.frames[1]
        per_stream, prefill_ms, first_ms, audio_frames, not_counted, cpu_s = [], [], [], 0, 0, []
        for s in range(args.streams):
            s += 1000 * n_config     # this configuration's own voices and tokens
            voice = make_voice(s, args.prompt_tokens)
            if warm_voice:     # an earlier stream of this voice left its prompt blocks: not this stream's work
                before = backend.frames[0]
                backend.run([prefill_request(voice)])
                not_counted += backend.frames[0] - before
            if prefill and not warm_voice:
                _, (ms,) = backend.run([prefill_request(voice)])
                prefill_ms.append(ms)
            cpu0 = time.process_time()
            times, frames = run_stream(backend, voice, make_tokens(s, args.tokens), 1000 * s)
            cpu_s.append(time.process_time() - cpu0)
            per_stream.append(sum(times))
            first_ms.append(times[0])
            audio_frames += frames
            bar.update()
        computed, reused = backend.frames
        if computed is not None:
            computed, reused = computed - first_computed, reused - first_reused
        # CPU seconds of the process (all threads) per stream: on a shared machine, what the work costs
        row = {"ms_per_stream": statistics.median(per_stream), "first_chunk_ms": statistics.median(first_ms),
               "cpu_s_per_stream": statistics.median(cpu_s),
               "prefill_ms": statistics.median(prefill_ms) if prefill_ms else None, "audio_frames": audio_frames}
        if computed is not None:
            computed -= not_counted
            row.update(frames_computed=computed, frames_reused=reused,
                       computed_per_audio_frame=computed / audio_frames)
        else:       # a tree that does not count: the frames the reference's way computes
            row.update(frames_computed=_recompute_frames(args), computed_per_audio_frame=_recompute_frames(args)
                       / audio_frames)
        out[name] = row
    bar.close()
    return out


def _recompute_frames(args) -> int:
    per = sum(2 * (args.prompt_tokens + c.end - (0 if c.finalize else 3)) for c in plan(args.tokens))
    return per * args.streams


def scenario_mix(args, models, device, dtype) -> dict:
    """16 calls at once: 4 first chunks, 8 middle chunks (second chunk, 25 + 3 tokens), 4 final chunks (the rest of
    a T-token stream); every stream's earlier chunks ran first, so the state cache holds what it would."""
    n = args.mix_streams
    backend = backend_for(models, device, dtype, args.cache_gib if API == "engine" else 0, max(16, n, args.max_batch),
                          args.graphs)
    kinds = ["first"] * (n // 4) + ["middle"] * (n // 2) + ["final"] * (n - n // 4 - n // 2)
    requests = []
    for i, kind in enumerate(kinds):
        voice, tokens, seed = make_voice(100 + i, args.prompt_tokens), make_tokens(100 + i, args.tokens), 7 * i
        chunks = plan(tokens.size(1))
        want = {"first": 0, "middle": 1, "final": len(chunks) - 1}[kind]
        cache = None
        if API == "engine" and args.cache_gib > 0:
            backend.run([prefill_request(voice)])
        for c in chunks[:want + 1]:
            req = ChunkRequest(tokens=tokens[:, :c.end], token_offset=c.token_offset, finalize=c.finalize,
                               streaming=not c.finalize, cache=cache, seed=seed + c.index, **voice)
            if c.index == want:
                requests.append(req)
            else:
                (res,), _ = backend.run([req])
                cache = res.cache
    first_alone = []
    for _ in range(args.repeats):
        _, (ms,) = backend.run([requests[0]])
        first_alone.append(ms)

    def mix(label: str) -> tuple[float, float]:
        firsts, alls = [], []
        for _ in tqdm(range(args.repeats), desc=f"mix ({API}{label})", unit="run", file=sys.stderr):
            _, done = backend.run(requests)
            firsts.append(max(ms for ms, k in zip(done, kinds) if k == "first"))
            alls.append(max(done))
        return statistics.median(firsts), statistics.median(alls)
    firsts, alls = mix("")
    out = {"first_chunk_alone_ms": statistics.median(first_alone), "first_chunks_in_mix_ms": firsts,
           "all_in_mix_ms": alls, "calls": dict((k, kinds.count(k)) for k in set(kinds))}
    if API == "engine" and hasattr(backend.impl.scheduler.config, "later_max_wait_s"):
        # the same mix with no priority: every running call steps every iteration (TOKEN2WAV_LATER_MAX_WAIT_MS=0)
        sched = backend.impl.scheduler
        default = sched.config
        sched.config = dataclasses.replace(default, later_max_wait_s=0.0)
        out["no_priority"] = dict(zip(("first_chunks_in_mix_ms", "all_in_mix_ms"), mix(", no priority")))
        sched.config = default
    return out


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    torch.manual_seed(0)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    flow, hift = random_flow_and_hift(args.size, seed=1)
    models = (flow, hift)
    out = {"api": API, "tree": str(Path(sys.path[0]).parent)}
    _BACKENDS.clear()
    if "streams" in args.scenarios:
        out["streams"] = scenario_streams(args, models, device, dtype)
    if "mix" in args.scenarios:
        out["mix"] = scenario_mix(args, models, device, dtype)
    out["startup_s"] = {f"cache {k[0]:g} GiB": round(b.startup_s, 1) for k, b in _BACKENDS.items()}
    return out


def table(new: dict, base: dict | None) -> str:
    lines = []
    if "streams" in new:
        lines += ["| tree | configuration | flow frames / audio frame | ms per stream | CPU s per stream | first chunk ms "
                  "| prefill ms |", "|---|---|---|---|---|---|---|"]
        for label, result in (("baseline", base), ("this tree", new)):
            if not result or "streams" not in result:
                continue
            for name, row in result["streams"].items():
                prefill = f"{row['prefill_ms']:.0f}" if row.get("prefill_ms") else ""
                cpu = f"{row['cpu_s_per_stream']:.1f}" if "cpu_s_per_stream" in row else ""
                lines.append(f"| {label} ({result['api']}) | {name} | {row['computed_per_audio_frame']:.2f} | "
                             f"{row['ms_per_stream']:.0f} | {cpu} | {row['first_chunk_ms']:.0f} | {prefill} |")
    if "mix" in new:
        lines += ["", "| tree | first chunk alone ms | first chunks in the mix ms | all calls ms |", "|---|---|---|---|"]
        for label, result in (("baseline", base), ("this tree", new)):
            if result and "mix" in result:
                m = result["mix"]
                lines.append(f"| {label} ({result['api']}) | {m['first_chunk_alone_ms']:.0f} | "
                             f"{m['first_chunks_in_mix_ms']:.0f} | {m['all_in_mix_ms']:.0f} |")
                if "no_priority" in m:
                    lines.append(f"| {label} ({result['api']}), no priority | | "
                                 f"{m['no_priority']['first_chunks_in_mix_ms']:.0f} | "
                                 f"{m['no_priority']['all_in_mix_ms']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="default: bfloat16 on cuda, else float32")
    ap.add_argument("--scenarios", default="streams,mix")
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=150)
    ap.add_argument("--tokens", type=int, default=163)
    ap.add_argument("--mix-streams", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--cache-gib", type=float, default=8.0, help="state cache budget of the new tree")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs (cuda only)")
    ap.add_argument("--baseline-dir", type=Path, default=None)
    ap.add_argument("--tree", type=Path, default=None, help=argparse.SUPPRESS)   # set by the baseline subprocess
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.tree is not None:          # the baseline subprocess: measure, print JSON, done
        print(json.dumps(measure(args)))
        return
    base = None
    if args.baseline_dir is not None:
        argv = [a for a in sys.argv[1:]]
        i = argv.index("--baseline-dir")
        del argv[i:i + 2]
        proc = subprocess.run([sys.executable, __file__, *argv, "--tree", str(args.baseline_dir.resolve())],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode:
            sys.exit(f"baseline run failed ({proc.returncode})")
        base = json.loads(proc.stdout.strip().splitlines()[-1])
    new = measure(args)
    report = {"device": args.device, "size": args.size, "dtype": args.dtype, "streams": args.streams,
              "prompt_tokens": args.prompt_tokens, "tokens": args.tokens, "new": new, "baseline": base,
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv)}
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    print(table(new, base))


if __name__ == "__main__":
    main()
