"""CUDA-graph capture helpers: one graph per static-shape key, all graphs on one memory pool.

A graph reads only its static input tensors and writes its static outputs; callers copy new data into
the inputs, ``replay()``, and consume the outputs before the next replay of any graph on the same pool
(graphs on one pool may reuse each other's temporaries).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch

_WARMUP_RUNS = 2   # eager runs on a side stream before capture (fills lazy caches, picks kernels)


@dataclass(slots=True)
class CapturedGraph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]

    def replay(self) -> tuple[torch.Tensor, ...]:
        self.graph.replay()
        return self.outputs


def capture(fn: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...],
            pool: tuple | None) -> CapturedGraph:
    """Warm ``fn(*inputs)`` up on a side stream, then capture it into a graph on ``pool``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(_WARMUP_RUNS):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: capture is lazy (first call of a shape), so other threads of the process (the LLM
    # engine's loop in the in-process pipeline) may be synchronizing or allocating meanwhile; the default
    # "global" mode turns their calls into cudaErrorStreamCaptureUnsupported.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        outputs = fn(*inputs)
    return CapturedGraph(graph, inputs, tuple(outputs))


class GraphCache:
    """Graphs keyed by shape bucket, sharing one memory pool; ``get`` captures a missing one."""

    def __init__(self) -> None:
        self._graphs: dict[Hashable, CapturedGraph] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def lookup(self, key: Hashable) -> CapturedGraph | None:
        return self._graphs.get(key)

    def get(self, key: Hashable, fn: Callable[..., tuple[torch.Tensor, ...]],
            make_inputs: Callable[[], tuple[torch.Tensor, ...]]) -> CapturedGraph:
        entry = self._graphs.get(key)
        if entry is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            entry = capture(fn, make_inputs(), self._pool)
            self._graphs[key] = entry
        return entry
