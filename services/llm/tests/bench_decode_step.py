"""Decode-step latency of LLMEngine on a random model of CosyVoice2-0.5B's shape (run by hand on a GPU machine).

    PYTHONPATH=common:services/llm python services/llm/tests/bench_decode_step.py
Prints ms per batched decode step (eager and CUDA graph) per batch size. Random weights: timing only.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from cosyvoice_llm.engine import EngineConfig, LLMEngine, LLMRequest
from cosyvoice_llm.model import Qwen2LM, build_prompt_flat_ids
from cosyvoice_llm.sampling import SamplingParams

QWEN2_0_5B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    hidden = QWEN2_0_5B["hidden_size"]
    model = Qwen2LM.from_config({"llm_input_size": hidden, "llm_output_size": hidden}, QWEN2_0_5B)
    model = model.to("cuda", dtype).eval()
    prompt = tuple(build_prompt_flat_ids(list(range(1, 40)), [], list(range(75))))
    for b in (int(x) for x in args.batches.split(",")):
        for graphs in (False, True):
            engine = LLMEngine(model, EngineConfig(max_batch_slots=b, max_seq_len=args.max_seq_len,
                                                   use_cuda_graphs=graphs))
            if graphs:
                engine.capture_graphs()
            for i in range(b):
                engine.submit(LLMRequest(f"r{i}", prompt, max_new_tokens=args.steps * 3 + 20,
                                         min_new_tokens=args.steps * 3 + 20, sampling=SamplingParams(), seed=i))
            for _ in range(10):   # admit everyone, warm up
                engine.step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / args.steps * 1e3
            print(f"batch {b:3d} graphs={graphs!s:5} {ms:7.2f} ms/step ({b / ms * 1e3:8.0f} tokens/s)", flush=True)
            del engine


if __name__ == "__main__":
    main()
