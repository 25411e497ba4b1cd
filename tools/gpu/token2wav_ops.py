#!/usr/bin/env python
"""Operations per token2wav chunk call, state cache off and on: the launch count a GPU pays at a few rows.

Counts the aten operations (views and other metadata-only ops skipped) that one stream's chunk calls dispatch, on
the CPU, with the graph-bucket padding the GPU path uses. At one to four rows an Euler step on a GPU is
launch-bound, so this count predicts its cost better than the flow frames do (docs/BENCHMARKS.md, H100 section).

    python tools/gpu/token2wav_ops.py --size full          # per call kind: operations (flow frames)
    python tools/gpu/token2wav_ops.py --size tiny --by-op  # + which operations the cache adds to a first chunk
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
for _sub in ("tools", "services/gateway", "services/token2wav", "common"):
    if str(_REPO / _sub) not in sys.path:
        sys.path.insert(0, str(_REPO / _sub))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from cosyvoice_common.constants import MEL_BINS, SPEAKER_EMBEDDING_DIM, SPEECH_CODEBOOK_SIZE  # noqa: E402
from cosyvoice_gateway.schedule import plan  # noqa: E402
from cosyvoice_token2wav.engine import Token2WavEngine  # noqa: E402
from cosyvoice_token2wav.sequence import ChunkRequest  # noqa: E402
from cosyvoice_tools.modelgen import random_flow_and_hift  # noqa: E402

METADATA_OPS = {"aten.view", "aten._unsafe_view", "aten.as_strided", "aten.t", "aten.transpose", "aten.permute",
                "aten.expand", "aten.unsqueeze", "aten.squeeze", "aten.slice", "aten.select", "aten.detach",
                "aten.alias", "aten.split", "aten.reshape", "aten.lift_fresh", "aten.empty", "aten.unbind",
                "aten.split_with_sizes", "aten._reshape_alias"}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name not in METADATA_OPS and not name.startswith("aten.sym"):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def stream_calls(engine: Token2WavEngine, voice: dict, tokens: torch.Tensor, prefill: bool) -> list[tuple]:
    """(kind, operations, flow frames, per-op counter) of each chunk call of one stream."""
    if prefill:
        engine.run_chunks([ChunkRequest(tokens=torch.zeros(1, 0, dtype=torch.long), prefill=True, finalize=False,
                                        streaming=True, **voice)])
    cache, rows = None, []
    for c in plan(tokens.size(1)):
        req = ChunkRequest(tokens=tokens[:, :c.end], token_offset=c.token_offset, finalize=c.finalize,
                           streaming=not c.finalize, cache=cache, seed=c.index, **voice)
        before = engine.frames_computed
        with OpCounter() as counter:
            (result,) = engine.run_chunks([req])
        cache = result.cache
        kind = "final" if c.finalize else ("first" if c.index == 0 else "middle")
        rows.append((kind, sum(counter.ops.values()), engine.frames_computed - before, counter.ops))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny", choices=("tiny", "full"))
    ap.add_argument("--prompt-tokens", type=int, default=150)
    ap.add_argument("--tokens", type=int, default=163)
    ap.add_argument("--by-op", action="store_true", help="the operations the cache adds to the first chunk")
    args = ap.parse_args()
    flow, hift = random_flow_and_hift(args.size, seed=1)
    g = torch.Generator().manual_seed(0)
    voice = dict(prompt_tokens=torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, args.prompt_tokens), generator=g),
                 prompt_feat=torch.randn(1, 2 * args.prompt_tokens, MEL_BINS, generator=g) - 4.0,
                 embedding=torch.randn(1, SPEAKER_EMBEDDING_DIM, generator=g))
    tokens = torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, args.tokens), generator=g)
    results = {}
    for label, cache_bytes in (("cache off", 0), ("cache on", 1 << 30)):
        engine = Token2WavEngine((flow, hift), "cpu", cache_bytes=cache_bytes)
        engine.runner.pad_to_buckets = True          # the GPU path's bucket padding
        results[label] = stream_calls(engine, voice, tokens, prefill=cache_bytes > 0)
    print(f"| state cache | {' | '.join(kind for kind, *_ in results['cache off'])} |")
    print(f"|---|{'---|' * len(results['cache off'])}")
    for label, rows in results.items():
        print(f"| {label}: operations (flow frames) | " + " | ".join(f"{n:,} ({f})" for _, n, f, _ in rows) + " |")
    if args.by_op:
        off, on = results["cache off"][0][3], results["cache on"][0][3]
        for name in sorted(set(off) | set(on), key=lambda k: off[k] - on[k]):
            if on[name] != off[name]:
                print(f"{name}: {off[name]} -> {on[name]}")


if __name__ == "__main__":
    main()
