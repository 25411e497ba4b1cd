#!/usr/bin/env python
"""Stream a few concurrent requests through a running llm stage server (TensorRT-LLM tensor contract) and
check that each one ends with its forced number of tokens; exit 1 otherwise. The quickest test that the
llm stage's stub survives on a machine before the whole stack is started on it.

Usage (PYTHONPATH as tools/gpu/setup.sh sets it): python3 tools/gpu/llm_stage_probe.py --url 127.0.0.1:8301 [--requests 4] [--tokens 200]
       [--boundaries 18,43,68]   (the optional stream_boundaries input: responses grouped at those token counts)
"""
from __future__ import annotations

import argparse
import queue
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
from cosyvoice_llm.model import build_prompt_flat_ids


def request_inputs(n_text: int, n_speech: int, tokens: int, seed: int, boundaries: list[int] | None = None) -> list:
    rng = np.random.default_rng(seed)
    ids = np.asarray(build_prompt_flat_ids(rng.integers(0, 1000, n_text).tolist(), (),
                                           rng.integers(0, 6561, n_speech).tolist()))
    tensors = {"input_ids": ids.astype(np.int32)[None, :], "input_lengths": np.array([[ids.size]], np.int32),
               "request_output_len": np.array([[tokens]], np.int32), "min_length": np.array([[tokens]], np.int32),
               "streaming": np.array([[True]]), "random_seed": np.array([[seed]], np.uint64)}
    if boundaries:
        tensors["stream_boundaries"] = np.array([boundaries], np.int32)
    inputs = []
    for name, value in tensors.items():
        dtype = {np.int32: "INT32", np.bool_: "BOOL", np.uint64: "UINT64"}[value.dtype.type]
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--timeout-s", type=float, default=60)
    ap.add_argument("--boundaries", default="", help="comma list of cumulative token counts (stream_boundaries)")
    args = ap.parse_args(argv)
    boundaries = [int(b) for b in args.boundaries.split(",") if b.strip()]
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    got = {f"probe-{i}": 0 for i in range(args.requests)}
    finals: set[str] = set()
    start = time.monotonic()
    first_ms = None
    token_responses = 0
    try:
        for i in range(args.requests):
            client.async_stream_infer("llm", request_inputs(30, 75, args.tokens, seed=i + 1, boundaries=boundaries), request_id=f"probe-{i}",
                                      outputs=[grpcclient.InferRequestedOutput("output_ids")],
                                      enable_empty_final_response=True)
        while len(finals) < args.requests:
            try:
                result, error = results.get(timeout=max(0.1, args.timeout_s - (time.monotonic() - start)))
            except queue.Empty:
                print(f"FAIL: {len(finals)}/{args.requests} finished in {args.timeout_s} s; tokens so far {got}")
                return 1
            if error is not None:
                print(f"FAIL: {error}")
                return 1
            response = result.get_response()
            ids = result.as_numpy("output_ids")
            if ids is not None and ids.size:
                got[response.id] += ids.size
                token_responses += 1
                first_ms = first_ms if first_ms is not None else (time.monotonic() - start) * 1000
            if response.parameters["triton_final_response"].bool_param:
                finals.add(response.id)
    finally:
        client.stop_stream()
        client.close()
    wall = time.monotonic() - start
    bad = {k: v for k, v in got.items() if v != args.tokens}
    print(f"{'FAIL' if bad else 'ok'}: {args.requests} streams x {args.tokens} tokens in {wall:.2f} s "
          f"({sum(got.values()) / wall:.0f} tokens/s, first tokens after {first_ms or 0:.0f} ms, "
          f"{sum(got.values()) / max(token_responses, 1):.1f} tokens per response)"
          + (f"; wrong counts {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
