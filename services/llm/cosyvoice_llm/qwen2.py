"""Qwen2 decoder in plain PyTorch over a preallocated static KV cache (spec 4.1).

Module attribute names mirror Hugging Face's `Qwen2ForCausalLM` (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
..., `model.norm`, `lm_head`) so that `Qwen2LM.llm.model` loads the keys of the real `llm.pt` unchanged. We do not use
transformers' modeling code: its masking and dtype defaults changed in 5.x (spec 10).

One `forward` serves both phases:
* prefill: `inputs_embeds [1, T, H]`, `positions [1, T]` (0..T-1), `slot_ids [1]`;
* batched decode: `inputs_embeds [B, 1, H]`, `positions [B, 1]` (each slot's current length), `slot_ids [B]`.
A query at position p in slot s attends to cache entries 0..p of slot s, so slots with different lengths share one
static-shaped step (no `.item()`, no data-dependent branching) that can be captured in a CUDA graph.

Speed paths (same function, fewer kernels; see docs in services/llm/README or tools/gpu/llm_speed.py):
* `Qwen2Model.fuse_projections()` concatenates q/k/v and gate/up weights into one matrix each and rebinds the
  original parameters as views into it (state_dict keys and memory unchanged; re-fused after `.to()`).
* `kv_len` reads only cache positions [0, kv_len) (the caller guarantees every live query position < kv_len), so a
  step costs attention over the live prefix, not the whole preallocated `max_seq_len`.
* `fresh=True` (prefill from position 0): causal attention over the new keys only, the cache is just written.
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
        # fp32 statistics as the reference does, even when the model runs in half precision: F.rms_norm computes
        # in fp32 (opmath) and rounds once to x's dtype, like `(x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] in fp32, built like HF's default rotary embedding."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_seq_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """[-sin_lo, sin_hi]: `rotate_half(x) * sin == x.roll(D/2, -1) * signed_sin(sin)` (exactly, sign flips only)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [..., D] with cos/sin_signed broadcastable: x * cos + rotate_half(x) * sin in three kernels."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class KVCache(nn.Module):
    """Per-layer static cache [max_batch_slots, kv_heads, max_seq_len, head_dim], written by index."""

    def __init__(self, max_batch_slots: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 device: torch.device | str | None, dtype: torch.dtype) -> None:
        super().__init__()
        # Zero-filled, never empty: masked positions still enter `attn @ v` with weight 0, and 0 * NaN = NaN.
        shape = (max_batch_slots, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        # Slot index column [max_batch_slots, 1]: a slice of it addresses consecutive slots without a kernel.
        self.register_buffer("slot_rows", torch.arange(max_batch_slots, device=device)[:, None], persistent=False)

    def update(self, slot_ids: torch.Tensor | slice, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, kv_len: int | None = None,
               read: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Writes k/v [B, T, Hkv, D] at `positions` [B, T] of `slot_ids` ([B] tensor, or a slice of B consecutive
        slots); returns the slots' caches [B, Hkv, kv_len or max_seq_len, D] (views for a slice), unless not
        `read` (prefill from position 0 attends over the new keys only: no gather of the slots' caches)."""
        # Writes index the whole buffer (no view in between, so torch.compile keeps them in place). Advanced indices
        # around a slice put the broadcast [B, T] dims first: the target is [B, T, Hkv, D].
        rows = self.slot_rows[slot_ids] if isinstance(slot_ids, slice) else slot_ids[:, None]
        self.k_cache[rows, :, positions] = k
        self.v_cache[rows, :, positions] = v
        if not read:
            return None
        # Consecutive slots (the engine's decode step) are read through a view, no gather copy of the cache.
        k_all, v_all = self.k_cache[slot_ids], self.v_cache[slot_ids]
        if kv_len is not None:
            k_all, v_all = k_all[:, :, :kv_len], v_all[:, :, :kv_len]
        return k_all, v_all


def _fuse_rows(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenates the linears' weights (and biases) along the output axis into one new tensor each and rebinds
    every original parameter's `.data` as a view into it: one matrix product instead of several, no extra memory,
    state_dict keys and in-place loading unchanged."""
    weight = torch.cat([m.weight.detach() for m in linears], dim=0)
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([m.bias.detach() for m in linears], dim=0)
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start:start + rows]
        if bias is not None:
            m.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias


class _Fusable(nn.Module):
    """A module whose projections can be fused; `_apply` (`.to()`, `.half()`, ...) converts parameters one by
    one, which breaks the views, so it re-fuses afterwards."""

    _fused_from: tuple[nn.Parameter, ...] | None = None

    def _linears(self) -> tuple[nn.Linear, ...]:
        raise NotImplementedError

    def fuse_projections(self) -> None:
        with torch.no_grad():
            self._fused = _fuse_rows(*self._linears())
        self._fused_from = tuple(m.weight for m in self._linears())

    def _fused_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The fused (weight, bias) while they still alias the parameters (a `load_state_dict(assign=True)` swaps
        parameter objects: then the plain path runs)."""
        src = self._fused_from
        if src is None or any(a is not m.weight for a, m in zip(src, self._linears())):
            return None
        return self._fused

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self._fused_from is not None:
            self.fuse_projections()
        return out


class Qwen2Attention(_Fusable):
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

    def _linears(self) -> tuple[nn.Linear, ...]:
        return (self.q_proj, self.k_proj, self.v_proj)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused_weights()
        if fused is not None:
            return F.linear(x, *fused)
        return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                slot_ids: torch.Tensor | slice | None, attn_mask: torch.Tensor | None, kv_len: int | None = None,
                fresh: bool = False) -> torch.Tensor:
        """cos/sin_signed [B, T, 1, D] in x's dtype; attn_mask: additive [B, 1, group * T, L] (see Qwen2Model)."""
        bsz, seq_len, _ = x.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._qkv(x).view(bsz, seq_len, heads + 2 * kv_heads, dim)
        # RoPE once over q and k together ([B, T, H + Hkv, D]); v passes through.
        qk = apply_rope(qkv[:, :, :heads + kv_heads], cos, sin_signed)
        q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads:]
        group = heads // kv_heads
        if self.kv_cache is not None and slot_ids is not None:
            cached = self.kv_cache.update(slot_ids, positions, k, v, kv_len, read=not fresh)
            if cached is not None:
                k_all, v_all = cached
        if attn_mask is None or fresh:
            # Cache-free or prefill from position 0: causal attention over the new keys only.
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq_len > 1, enable_gqa=group > 1)
            out = out.transpose(1, 2)
        else:
            # Fold each KV head's query heads into the query-length axis instead of copying the cache `group`
            # times: q [B, T, H, D] -> [B, Hkv, group*T, D] (a free view when T == 1, the decode step).
            if seq_len == 1:
                qg = q.view(bsz, kv_heads, group, dim)
            else:
                qg = q.transpose(1, 2).reshape(bsz, kv_heads, group * seq_len, dim)
            out = F.scaled_dot_product_attention(qg, k_all, v_all, attn_mask=attn_mask)
            if seq_len > 1:
                out = out.reshape(bsz, heads, seq_len, dim).transpose(1, 2)
        return self.o_proj(out.reshape(bsz, seq_len, heads * dim))


class Qwen2MLP(_Fusable):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def _linears(self) -> tuple[nn.Linear, ...]:
        return (self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused_weights()
        if fused is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, fused[0]).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                slot_ids: torch.Tensor | slice | None, attn_mask: torch.Tensor | None, kv_len: int | None = None,
                fresh: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin_signed, positions, slot_ids, attn_mask, kv_len,
                               fresh)
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
        self.rope_sin_signed = signed_sin(self.rope_sin)

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
        self._set_rope_tables(max_seq_len, device)
        self.max_batch_slots = max_batch_slots
        self.max_seq_len = max_seq_len

    def fuse_projections(self) -> None:
        """Fused q/k/v and gate/up matrices for every layer (idempotent; see `_fuse_rows`). Call after loading."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        needed = max(int(positions.shape[-1]), self.max_seq_len)
        if (needed > self.rope_cos.shape[0] or self.rope_cos.device != positions.device
                or self.rope_sin_signed.shape != self.rope_cos.shape):
            # Host-side shape/device check only (no device sync); grows or moves the tables.
            self._set_rope_tables(max(needed, self.rope_cos.shape[0]), positions.device)
        cos = self.rope_cos[positions].to(dtype)[:, :, None]   # [B, T, 1, D]
        sin = self.rope_sin_signed[positions].to(dtype)[:, :, None]
        return cos, sin

    def _set_rope_tables(self, length: int, device: torch.device | str | None) -> None:
        cos, sin = rope_tables(self.config.head_dim, length, self.config.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        self.rope_sin_signed = signed_sin(self.rope_sin)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                slot_ids: torch.Tensor | slice | None = None, kv_len: int | None = None,
                fresh: bool = False) -> torch.Tensor:
        """inputs_embeds [B, T, H], positions [B, T] (int64) -> hidden after the final norm [B, T, H].

        With `slot_ids` ([B] tensor, or a slice of B consecutive slots) the KV cache is read and written (caches
        must be set up). Without it the call is a plain causal pass over the given tokens only (positions must then
        be 0..T-1), e.g. for teacher forcing. `kv_len` (cached calls): attend over cache positions [0, kv_len) only;
        every query position must be < kv_len. `fresh` (cached calls, positions 0..T-1 in every row): write the
        cache, attend causally over the new keys only (prefill; rows may be right-padded).
        """
        dtype = inputs_embeds.dtype
        cos, sin = self._rope(positions, dtype)
        attn_mask = None
        if slot_ids is not None:
            if self.max_seq_len == 0:
                raise RuntimeError("setup_caches() must be called before a cached forward")
            if kv_len is not None and not 0 < kv_len <= self.max_seq_len:
                raise ValueError(f"kv_len {kv_len} must lie in (0, max_seq_len={self.max_seq_len}]")
            if not fresh:
                attn_mask = self._cache_mask(positions, kv_len or self.max_seq_len, dtype)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, positions, slot_ids, attn_mask, kv_len, fresh)
        return self.norm(h)

    def _cache_mask(self, positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [B, 1, group * T, kv_len] shared by all layers: key j is visible to the query at position p
        iff j <= p; rows repeat per query head of a KV group (queries are folded as [B, Hkv, group * T, D])."""
        cfg = self.config
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        bsz, seq_len = positions.shape
        key_pos = torch.arange(kv_len, device=positions.device)
        visible = key_pos[None, None, None, :] <= positions[:, None, :, None]          # [B, 1, T, L]
        visible = visible.expand(bsz, group, seq_len, kv_len).reshape(bsz, 1, group * seq_len, kv_len)
        zero = torch.zeros((), dtype=dtype, device=positions.device)
        return torch.where(visible, zero, torch.full((), float("-inf"), dtype=dtype, device=positions.device))


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
                slot_ids: torch.Tensor | slice | None = None, kv_len: int | None = None,
                fresh: bool = False) -> torch.Tensor:
        # The text lm_head is never needed by CosyVoice2 (speech logits come from llm_decoder): skip it.
        return self.model(inputs_embeds, positions, slot_ids, kv_len, fresh)
