"""Frozen copy of cosyvoice_llm (qwen2, model, sampling, engine) at commit 1d22b37, before the speed work: the
baseline that tools/gpu/llm_speed.py times on the same machine. Benchmark reference only; never imported by services."""
