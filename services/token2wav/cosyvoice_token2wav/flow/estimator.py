"""CausalConditionalDecoder: the CFM's vector-field estimator, a one-level causal 1-D U-Net (spec 5.4).

Batch-agnostic: any number of rows N (the CFG pair is 2 rows per request; B requests -> 2B rows). `mask` [N, 1, F]
marks valid frames per row, so rows of different lengths can share a padded batch.
Attribute names mirror the reference state_dict (`down_blocks.0.0.block1.block.0`, `attn1.to_out.0`, ...).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import EstimatorConfig
from .masks import ChunkMaskCache
from .window import FlowCache

_TIME_EMB_MAX_PERIOD = 10000.0
_TIME_EMB_SCALE = 1000.0      # t in [0, 1] is scaled to [0, 1000] before the sinusoid
_FF_MULT = 4                  # transformer feed-forward inner width = 4 x dim
_CAUSAL_KERNEL = 3


class SinusoidalTimeEmbedding(nn.Module):
    """[N] -> [N, dim]: [sin(1000 t f_k), cos(1000 t f_k)], f_k = exp(-k ln(1e4) / (dim/2 - 1)).

    The frequencies stay float32 whatever the module dtype (a plain per-device cache, not a buffer that
    `.half()` would round); the result is cast to t's dtype as the reference does.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        self._freqs_cpu = torch.exp(torch.arange(half, device="cpu").float()
                                    * -(math.log(_TIME_EMB_MAX_PERIOD) / (half - 1)))
        self._freqs: dict[torch.device, torch.Tensor] = {}

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self._freqs.get(t.device)
        if freqs is None:
            freqs = self._freqs_cpu.to(t.device)
            self._freqs[t.device] = freqs
        arg = _TIME_EMB_SCALE * t.float().unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat([arg.sin(), arg.cos()], dim=-1).to(t.dtype)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dims: int, time_embed_dims: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dims, time_embed_dims)
        self.linear_2 = nn.Linear(time_embed_dims, time_embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConv1d(nn.Conv1d):
    """Conv1d with kernel_size-1 zeros on the left only: output frame t sees inputs <= t. With a cache, the
    left context is the inputs of the frames before the window (`FlowCache.left_context`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.causal_padding = kernel_size - 1
        self.cache_index = -1          # set by the owning estimator

    def forward(self, x: torch.Tensor, cache: FlowCache | None = None) -> torch.Tensor:
        if cache is None:
            return super().forward(F.pad(x, (self.causal_padding, 0)))
        return super().forward(cache.left_context(self.cache_index, x, self.causal_padding))


class CausalBlock1D(nn.Module):
    """y = Mish(LayerNorm_channels(causal_conv(x * mask))) * mask. Index 1 is a parameter-free slot so the
    LayerNorm keeps the reference's key `block.2`."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([CausalConv1d(dim, dim_out, _CAUSAL_KERNEL), nn.Identity(), nn.LayerNorm(dim_out)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: FlowCache | None = None) -> torch.Tensor:
        conv, _, norm = self.block
        h = norm(conv(x * mask, cache).transpose(1, 2)).transpose(1, 2)
        return F.mish(h) * mask


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dims: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dims, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, temb: torch.Tensor,
                cache: FlowCache | None = None) -> torch.Tensor:
        h = self.block1(x, mask, cache) + self.mlp(temb).unsqueeze(-1)
        h = self.block2(h, mask, cache)
        return h + self.res_conv(x * mask)


class Attention(nn.Module):
    """Bias-free q/k/v, scaled dot product (1/sqrt(head_dim)), output Linear with bias. With a cache, the keys
    and values of earlier blocks come before the window's own (`FlowCache.attend`)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.cache_index = -1          # set by the owning estimator
        self._qkv_weight: torch.Tensor | None = None

    def fuse_qkv(self) -> None:
        """One [3 inner, dim] product instead of three (same weights); call after the last move/cast."""
        self._qkv_weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight], dim=0).contiguous()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, cache: FlowCache | None = None) -> torch.Tensor:
        n, f, _ = x.shape
        if self._qkv_weight is not None:
            q, k, v = F.linear(x, self._qkv_weight).view(n, f, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            q = self.to_q(x).view(n, f, self.heads, self.head_dim).transpose(1, 2)
            k = self.to_k(x).view(n, f, self.heads, self.head_dim).transpose(1, 2)
            v = self.to_v(x).view(n, f, self.heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.attend(self.cache_index, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out[0](out.transpose(1, 2).reshape(n, f, self.heads * self.head_dim))


class GELUProj(nn.Module):
    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))   # exact (erf) GELU


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        # index 1 is the (inference no-op) dropout slot; keys are net.0.proj.* and net.2.*
        self.net = nn.Sequential(GELUProj(dim, dim * _FF_MULT), nn.Identity(), nn.Linear(dim * _FF_MULT, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Time-major [N, F, dim]: x += Attn(LN1(x)); x += FF(LN3(x)). No cross attention (no norm2/attn2)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, cache: FlowCache | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), attn_mask, cache)
        return x + self.ff(self.norm3(x))


def _transformer_stack(cfg: EstimatorConfig) -> nn.ModuleList:
    return nn.ModuleList([BasicTransformerBlock(cfg.channels, cfg.num_heads, cfg.attention_head_dim)
                          for _ in range(cfg.n_blocks)])


class CausalConditionalDecoder(nn.Module):
    def __init__(self, cfg: EstimatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, temb_dims = cfg.channels, cfg.time_embed_dims
        self.time_embeddings = SinusoidalTimeEmbedding(cfg.in_channels)
        self.time_mlp = TimestepEmbedding(cfg.in_channels, temb_dims)
        self.down_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(cfg.in_channels, c, temb_dims), _transformer_stack(cfg),
            CausalConv1d(c, c, _CAUSAL_KERNEL)])])      # the single level's "downsample" keeps the frame rate
        self.mid_blocks = nn.ModuleList([nn.ModuleList([CausalResnetBlock1D(c, c, temb_dims), _transformer_stack(cfg)])
                                         for _ in range(cfg.num_mid_blocks)])
        self.up_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(2 * c, c, temb_dims), _transformer_stack(cfg), CausalConv1d(c, c, _CAUSAL_KERNEL)])])
        self.final_block = CausalBlock1D(c, c)
        self.final_proj = nn.Conv1d(c, cfg.out_channels, 1)
        self._chunk_masks = ChunkMaskCache()
        # FlowCache numbering, in registration order: one per attention layer, one per causal convolution.
        self.attention_layers = [m for m in self.modules() if isinstance(m, Attention)]
        self.causal_convs = [m for m in self.modules() if isinstance(m, CausalConv1d)]
        for i, m in enumerate(self.attention_layers):
            m.cache_index = i
        for i, m in enumerate(self.causal_convs):
            m.cache_index = i

    def attention_mask(self, mask: torch.Tensor, streaming: bool) -> torch.Tensor:
        """[N, 1, F] frame mask -> boolean [N, 1, F|1, F] attention mask (keys must be valid; chunk-causal when
        streaming)."""
        key_valid = mask.bool().unsqueeze(1)                                   # [N, 1, 1, F]
        if not streaming:
            return key_valid
        chunk = self._chunk_masks.get(mask.size(-1), self.cfg.static_chunk_size_frames, mask.device)
        return key_valid & chunk                                               # [N, 1, F, F]

    def fuse_qkv(self) -> None:
        for attn in self.attention_layers:
            attn.fuse_qkv()

    def _transformers(self, blocks: nn.ModuleList, x: torch.Tensor, attn_mask: torch.Tensor,
                      cache: FlowCache | None) -> torch.Tensor:
        h = x.transpose(1, 2)
        for block in blocks:
            h = block(h, attn_mask, cache)
        return h.transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, streaming: bool = False,
                attn_mask: torch.Tensor | None = None, cache: FlowCache | None = None) -> torch.Tensor:
        """x, mu, cond [N, 80, F]; mask [N, 1, F]; t [N] (any float dtype); spks [N, 80] -> velocity [N, 80, F].

        attn_mask (boolean or additive, [N, 1, F, keys]) replaces the one built from `mask` and `streaming`: a
        serving batch brings its own (per-row padding, per-row streaming, and with a cache the earlier blocks'
        keys first). cache: the window's frames read earlier blocks from it (`FlowCache`)."""
        temb = self.time_mlp(self.time_embeddings(t).to(x.dtype))
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.size(-1)), cond], dim=1)
        if attn_mask is None:
            attn_mask = self.attention_mask(mask, streaming)

        resnet, blocks, down = self.down_blocks[0]
        h = self._transformers(blocks, resnet(h, mask, temb, cache), attn_mask, cache)
        skip = h
        h = down(h * mask, cache)
        for resnet, blocks in self.mid_blocks:
            h = self._transformers(blocks, resnet(h, mask, temb, cache), attn_mask, cache)
        resnet, blocks, up = self.up_blocks[0]
        h = torch.cat([h[:, :, :skip.size(-1)], skip], dim=1)
        h = self._transformers(blocks, resnet(h, mask, temb, cache), attn_mask, cache)
        h = up(h * mask, cache)
        h = self.final_block(h, mask, cache)
        return self.final_proj(h * mask) * mask
