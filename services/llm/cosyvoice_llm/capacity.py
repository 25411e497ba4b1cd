"""How many engine slots (KV cache rows) fit: sized from the GPU memory measured after a warm-up forward.

The static KV cache costs `layers x 2 (k, v) x kv_heads x max_seq_len x head_dim x dtype bytes` per slot. On CUDA,
`plan_batch_slots` runs the largest prefill shape once on a one-slot cache (the activation peak of a step), then
gives the cache `memory_fraction` of the device's total memory, or what is free less twice that peak if less, capped
at `max_slots`. CPU keeps the caller's explicit count.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cosyvoice_common.constants import FLAT_SOS_ID

from .model import Qwen2LM

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Capacity:
    batch_slots: int          # requests decoding at once (engine slots)
    max_seq_len: int          # prompt + generated tokens per request
    kv_cache_bytes: int       # the static KV cache, all slots

    def describe(self) -> str:
        return (f"{self.batch_slots} slots x {self.max_seq_len} positions, KV cache "
                f"{self.kv_cache_bytes / 2**30:.2f} GiB")


def kv_bytes_per_slot(model: Qwen2LM, max_seq_len: int, dtype: torch.dtype | None = None) -> int:
    cfg = model.qwen2_config
    dtype = dtype or model.llm_decoder.weight.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * max_seq_len * cfg.head_dim * elem


@torch.inference_mode()
def plan_batch_slots(model: Qwen2LM, max_seq_len: int, memory_fraction: float, max_slots: int,
                     warmup_rows: int, warmup_len: int) -> int:
    """Slots that fit on the model's CUDA device (at least 1; raises if not even one fits)."""
    if not 0.0 < memory_fraction <= 1.0:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    dev = model.llm_decoder.weight.device
    if dev.type != "cuda":
        raise ValueError("plan_batch_slots measures CUDA memory; give CPU an explicit slot count")
    backbone = model.llm.backbone
    model.setup_caches(1, max_seq_len)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    length = min(warmup_len, max_seq_len)
    ids = torch.full((warmup_rows, length), FLAT_SOS_ID, dtype=torch.int64, device=dev)
    positions = torch.arange(length, device=dev).expand(warmup_rows, length)
    slots = torch.zeros(warmup_rows, dtype=torch.int64, device=dev)
    model.speech_logp(backbone(model.embed_flat(ids), positions, slots, fresh=True)[:, -1])
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - before
    free, total = torch.cuda.mem_get_info(dev)
    per_slot = kv_bytes_per_slot(model, max_seq_len)
    budget = min(int(total * memory_fraction), free - 2 * peak)
    slots_fit = min(max_slots, budget // per_slot - 1)   # one row is the engine's scratch slot
    log.info("llm capacity: %.1f GiB free of %.1f GiB after warm-up (activation peak %.2f GiB); %.1f MiB KV per "
             "slot at %d positions -> %d slots", free / 2**30, total / 2**30, peak / 2**30, per_slot / 2**20,
             max_seq_len, slots_fit)
    if slots_fit < 1:
        raise RuntimeError(f"no KV slot of {per_slot / 2**20:.1f} MiB fits: {free / 2**30:.2f} GiB free, "
                           f"memory_fraction {memory_fraction}")
    return int(slots_fit)
