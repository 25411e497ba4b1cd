"""Qwen2 decoder in plain PyTorch over a preallocated static KV cache (spec 4.1).

Module attribute names mirror Hugging Face's `Qwen2ForCausalLM` (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
..., `model.norm`, `lm_head`) so that `Qwen2LM.llm.model` loads the keys of the real `llm.pt` unchanged. We do not use
transformers' modeling code: its masking and dtype defaults changed in 5.x (spec 10).

One `forward` serves both phases:
* prefill: `inputs_embeds [1, T, H]`, `positions [1, T]` (0..T-1), `slot_ids [1]`;
* batched decode: `inputs_embeds [B, 1, H]`, `positions [B, 1]` (each slot's current length), `slot_ids [B]`.
A query at position p in slot s attends to cache entries 0..p of slot s, so slots with different lengths share one
static-shaped step (no `.item()`, no data-dependent branching) that can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class Qwen2Config:
    """The fields of `CosyVoice-BlankEN/config.json` that change computation."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Qwen2Config.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("head_dim must be even for rotate-half RoPE")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) and rms_norm_eps ({self.rms_norm_eps}) must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "Qwen2Config":
        """Reads a Hugging Face Qwen2 config dict; rejects features this decoder does not implement."""
        if cfg.get("rope_scaling") not in (None, {}):
            raise ValueError(f"rope_scaling {cfg['rope_scaling']!r} is not supported (CosyVoice2 uses plain RoPE)")
        if cfg.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported (CosyVoice2 never enables it)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (expected silu)")
        if "head_dim" in cfg and cfg["head_dim"] not in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
            raise ValueError(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads is not supported")
        try:
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=int(cfg["num_attention_heads"]),
                num_key_value_heads=int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            )
        except KeyError as e:
            raise ValueError(f"Qwen2 config lacks required field {e.args[0]!r}") from None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics as the reference does, even when the model runs in half precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] in fp32, built like HF's default rotary embedding."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_seq_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache(nn.Module):
    """Per-layer static cache [max_batch_slots, kv_heads, max_seq_len, head_dim], written by index."""

    def __init__(self, max_batch_slots: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 device: torch.device | str | None, dtype: torch.dtype) -> None:
        super().__init__()
        # Zero-filled, never empty: masked positions still enter `attn @ v` with weight 0, and 0 * NaN = NaN.
        shape = (max_batch_slots, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, slot_ids: torch.Tensor | slice, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k/v [B, Hkv, T, D] at `positions` [B, T] of `slot_ids` ([B] tensor, or a slice of B consecutive
        slots); returns the slots' full caches [B, Hkv, max_seq_len, D]."""
        if isinstance(slot_ids, slice):
            # Consecutive slots (the engine's decode step): read through a view, no gather copy of the cache.
            k_all, v_all = self.k_cache[slot_ids], self.v_cache[slot_ids]
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
        else:
            k_all, v_all = self.k_cache, self.v_cache
            rows = slot_ids[:, None]
        # Advanced indices around a slice put the broadcast [B, T] dims first: target view is [B, T, Hkv, D].
        k_all[rows, :, positions] = k.transpose(1, 2)
        v_all[rows, :, positions] = v.transpose(1, 2)
        if isinstance(slot_ids, slice):
            return k_all, v_all
        return self.k_cache[slot_ids], self.v_cache[slot_ids]


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                slot_ids: torch.Tensor | slice | None, attn_mask: torch.Tensor | None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        q = self.q_proj(x).view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # cos/sin: [B, 1, T, D], already in the activation dtype.
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.kv_cache is not None and slot_ids is not None:
            k, v = self.kv_cache.update(slot_ids, positions, k, v)
        # GQA: each KV head serves `group` consecutive query heads.
        group = self.num_heads // self.num_kv_heads
        if attn_mask is None:
            if group > 1:
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq_len > 1)
        else:
            # Fold each KV head's query heads into the query-length axis instead of copying the (max_seq_len long)
            # cache `group` times: q [B, H, T, D] -> [B, Hkv, group*T, D]; the mask repeats per head of the group.
            q = q.reshape(bsz, self.num_kv_heads, group * seq_len, self.head_dim)
            mask = attn_mask.expand(bsz, group, seq_len, attn_mask.shape[-1])
            mask = mask.reshape(bsz, 1, group * seq_len, attn_mask.shape[-1])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = out.reshape(bsz, self.num_heads, seq_len, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq_len, self.num_heads * self.head_dim))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                slot_ids: torch.Tensor | slice | None, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, slot_ids, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embeddings + decoder layers + final norm (HF `Qwen2Model`); called with `inputs_embeds` only."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.max_seq_len = 0
        self.max_batch_slots = 0
        # Plain attributes, not buffers: `model.to(bfloat16)` must not round the fp32 RoPE tables.
        self.rope_cos, self.rope_sin = rope_tables(cfg.head_dim, 1, cfg.rope_theta)

    def setup_caches(self, max_batch_slots: int, max_seq_len: int,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocates the static KV cache and RoPE tables; a no-op when the existing ones are big enough."""
        if max_batch_slots <= 0 or max_seq_len <= 0:
            raise ValueError(f"max_batch_slots ({max_batch_slots}) and max_seq_len ({max_seq_len}) must be positive")
        ref = self.embed_tokens.weight
        device = ref.device if device is None else torch.device(device)
        dtype = ref.dtype if dtype is None else dtype
        first = self.layers[0].self_attn.kv_cache
        if (first is not None and self.max_batch_slots >= max_batch_slots and self.max_seq_len >= max_seq_len
                and first.k_cache.dtype == dtype and first.k_cache.device == device):
            return
        cfg = self.config
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch_slots, cfg.num_key_value_heads, max_seq_len, cfg.head_dim,
                                               device, dtype)
        cos, sin = rope_tables(cfg.head_dim, max_seq_len, cfg.rope_theta)
        self.rope_cos = cos.to(device)
        self.rope_sin = sin.to(device)
        self.max_batch_slots = max_batch_slots
        self.max_seq_len = max_seq_len

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                slot_ids: torch.Tensor | slice | None = None) -> torch.Tensor:
        """inputs_embeds [B, T, H], positions [B, T] (int64) -> hidden after the final norm [B, T, H].

        With `slot_ids` ([B] tensor, or a slice of B consecutive slots) the KV cache is read and written (caches must be set up). Without it the call is a
        plain causal pass over the given tokens only (positions must then be 0..T-1), e.g. for teacher forcing.
        """
        needed = max(positions.shape[-1], self.max_seq_len)
        if needed > self.rope_cos.shape[0] or self.rope_cos.device != inputs_embeds.device:
            # Host-side shape/device check only (no device sync); grows or moves the tables.
            cos, sin = rope_tables(self.config.head_dim, needed, self.config.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(inputs_embeds.device), sin.to(inputs_embeds.device)
        dtype = inputs_embeds.dtype
        cos = self.rope_cos[positions].to(dtype)[:, None]   # [B, 1, T, D]
        sin = self.rope_sin[positions].to(dtype)[:, None]
        attn_mask = None
        if slot_ids is not None:
            if self.max_seq_len == 0:
                raise RuntimeError("setup_caches() must be called before a cached forward")
            key_pos = torch.arange(self.max_seq_len, device=positions.device)
            # [B, 1, T, max_seq_len]: key j is visible to the query at position p iff j <= p.
            attn_mask = (key_pos[None, None, None, :] <= positions[:, None, :, None])
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, positions, slot_ids, attn_mask)
        return self.norm(h)


class Qwen2ForCausalLM(nn.Module):
    """Holds `model` and the (tied, unused at inference) `lm_head` so the checkpoint keys match."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                slot_ids: torch.Tensor | slice | None = None) -> torch.Tensor:
        # The text lm_head is never needed by CosyVoice2 (speech logits come from llm_decoder): skip it.
        return self.model(inputs_embeds, positions, slot_ids)
