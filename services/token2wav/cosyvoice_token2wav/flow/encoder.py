"""UpsampleConformerEncoder: token embeddings -> 2x up-sampled hidden frames (spec 5.2).

Attribute names mirror the reference state_dict (`embed.out.0`, `encoders.{i}.self_attn.linear_pos`, ...).
Inputs are full-length sequences (no padding inside a request); masks are only the static block-causal chunk
masks of streaming mode, built once per length and cached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .masks import ChunkMaskCache
from .window import FlowCache

_EMBED_LN_EPS = 1e-5          # LinearNoSubsampling's LayerNorm and the encoder's after_norm
_LAYER_LN_EPS = 1e-12         # ConformerEncoderLayer's norm_mha / norm_ff
_POS_ENC_BASE = 10000.0


class RelPositionTable:
    """ESPnet relative-position table: row k of a length-T slice is the encoding of distance r = T-1-k.

    Computed once on the CPU in float32 (as the reference does), moved to each device/dtype once, and grown
    only when a longer input arrives.
    """

    def __init__(self, d_model: int, max_len: int) -> None:
        self.d_model = d_model
        self._max_len = max_len
        self._cpu = self._build(max_len)
        self._by_device: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _build(self, max_len: int) -> torch.Tensor:
        pos = torch.arange(max_len, dtype=torch.float32, device="cpu").unsqueeze(1)
        div = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32, device="cpu")
                        * -(math.log(_POS_ENC_BASE) / self.d_model))
        ang = pos * div                                                   # [L, d/2], distances 0..L-1
        ang = torch.cat([ang.flip(0), -ang[1:]], dim=0)                   # distances L-1 .. -(L-1)
        return torch.stack([ang.sin(), ang.cos()], dim=-1).reshape(2 * max_len - 1, self.d_model)

    def get(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[1, 2*length-1, d_model] for distances length-1 .. -(length-1)."""
        if length > self._max_len:
            self._max_len = length
            self._cpu = self._build(length)
            self._by_device.clear()
        table = self._by_device.get((device, dtype))
        if table is None:
            table = self._cpu.to(device=device, dtype=dtype)
            self._by_device[(device, dtype)] = table
        center = self._max_len - 1
        return table[center - length + 1:center + length].unsqueeze(0)


class LinearEmbed(nn.Module):
    """Linear + LayerNorm, scaled by sqrt(d) (the positional table is produced separately, never added)."""

    def __init__(self, in_dims: int, out_dims: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_dims, out_dims), nn.LayerNorm(out_dims, eps=_EMBED_LN_EPS))
        self.xscale = math.sqrt(out_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale


class RelPositionMultiHeadedAttention(nn.Module):
    def __init__(self, n_heads: int, d_model: int) -> None:
        super().__init__()
        self.h = n_heads
        self.d_k = d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.d_k))
        self.cache_index = -1          # set by the owning encoder

    @staticmethod
    def _rel_shift(bd: torch.Tensor, n_queries: int) -> torch.Tensor:
        """[B, H, Q, 2L-1] scores over distances L-1..-(L-1) -> [B, H, Q, L] with entry (i, j) for r = (L-Q+i) - j.

        The Q queries are the last Q of the L key positions (all of them without a cache). The column for distance
        r is (L-1) - r = (Q-1) - i + j, so the result is a strided view: row stride 2L-2, offset Q-1.
        """
        bd = bd.contiguous()
        b, h, q, width = bd.shape
        keys = (width + 1) // 2
        s0, s1 = bd.stride(0), bd.stride(1)
        return bd.as_strided((b, h, q, keys), (s0, s1, 2 * keys - 2, 1), bd.storage_offset() + n_queries - 1)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor | None,
                cache: FlowCache | None = None) -> torch.Tensor:
        """pos_emb: the table for as many positions as there are keys (the window's own plus, with a cache, the
        earlier blocks'); mask: boolean [B, 1, queries, keys] or None."""
        b, t, d = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        if cache is not None:
            k, v = cache.attend(self.cache_index, k, v)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        scale = 1.0 / math.sqrt(self.d_k)
        # (q+u)k^T/sqrt(dk) is SDPA's own product; the positional term rides in as an additive bias.
        bias = self._rel_shift(torch.matmul(q_v, p.transpose(-2, -1)), t) * scale
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q_u, k, v, attn_mask=bias)
        return self.linear_out(out.transpose(1, 2).reshape(b, t, d))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_model: int, hidden_dims: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, hidden_dims)
        self.w_2 = nn.Linear(hidden_dims, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerEncoderLayer(nn.Module):
    """Pre-norm: x += MHSA(LN(x)); x += FFN(LN(x)). No macaron FFN, no conv module, no final norm."""

    def __init__(self, d_model: int, n_heads: int, hidden_dims: int) -> None:
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(n_heads, d_model)
        self.feed_forward = PositionwiseFeedForward(d_model, hidden_dims)
        self.norm_ff = nn.LayerNorm(d_model, eps=_LAYER_LN_EPS)
        self.norm_mha = nn.LayerNorm(d_model, eps=_LAYER_LN_EPS)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor | None,
                cache: FlowCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos_emb, mask, cache)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """Frame t sees tokens t..t+L: right-pad with L look-ahead frames (real context or zeros), conv k=L+1,
    LeakyReLU, causal conv k=3, residual."""

    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int) -> None:
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, in_channels, kernel_size=3)

    @property
    def halo_tokens(self) -> int:
        """Tokens before a window whose conv1 outputs conv2 reads (its causal left context)."""
        return self.conv2.kernel_size[0] - 1

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                halo: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C]; context [B, L, C] (the look-ahead tokens' embeddings) or None (zeros).

        halo [B, 1, 1] (0/1) or None: with it, x starts with `halo_tokens` tokens before a window, recomputed so
        that conv2 reads their conv1 outputs (scaled by halo: 0 where the window starts at the first token, which
        is the causal zero padding); the result covers the window only, [B, T - halo_tokens, C]."""
        h = x.transpose(1, 2)
        if context is None:
            h = F.pad(h, (0, self.pre_lookahead_len))
        else:
            if context.size(1) != self.pre_lookahead_len:
                raise ValueError(f"look-ahead context must be {self.pre_lookahead_len} frames, got {context.size(1)}")
            h = torch.cat([h, context.transpose(1, 2)], dim=2)
        h = F.leaky_relu(self.conv1(h))
        if halo is None:
            h = self.conv2(F.pad(h, (self.halo_tokens, 0)))
            return h.transpose(1, 2) + x
        n = self.halo_tokens
        h = self.conv2(torch.cat([h[:, :, :n] * halo, h[:, :, n:]], dim=2))
        return h.transpose(1, 2) + x[:, n:]


class Upsample1D(nn.Module):
    """Nearest-neighbour x stride, left-pad 2*stride zeros, conv k=2*stride+1: causal, T -> stride*T frames."""

    def __init__(self, channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, out_channels, kernel_size=stride * 2 + 1)

    # The left padding is 2 * stride up-sampled frames: 2 input frames before a window are read by its first outputs.
    context_tokens = 2

    def forward(self, x: torch.Tensor, with_context: bool = False) -> torch.Tensor:
        """x [B, C, T] -> [B, C_out, stride*T]. with_context: x starts with `context_tokens` frames before a
        window (real frames, or zeros before the first), and the result covers the window only."""
        h = torch.repeat_interleave(x, self.stride, dim=2)
        if with_context:
            return self.conv(h)
        return self.conv(F.pad(h, (self.stride * self.context_tokens, 0)))


@dataclass(slots=True)
class EncoderWindow:
    """A serving batch's window layout (see `window.py`): each row's tokens start `halo_tokens` before its window
    and end with its look-ahead (real tokens, or zeros for a final call), zero-padded to a common length.

    Attention masks are boolean [B, 1, window, keys], keys = the earlier blocks' (left-padded) then the window's;
    the cache numbers the first-stack layers 0.., the up-stack layers after them, and the up-sampler's left
    context as convolution 0."""
    cache: FlowCache
    embed_valid: torch.Tensor     # [B, halo + window + look-ahead, 1]: 1 where a row has a real token
    halo: torch.Tensor            # [B, 1, 1]: 0 where the window starts at the first token
    token_mask: torch.Tensor      # first stack (tokens)
    frame_mask: torch.Tensor      # up stack (frames)


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.output_size_dims
        # registration order reproduces the reference state_dict order
        self.embed = LinearEmbed(cfg.input_size_dims, d)
        self.after_norm = nn.LayerNorm(d, eps=_EMBED_LN_EPS)
        self.pre_lookahead_layer = PreLookaheadLayer(cfg.pre_lookahead_channels, cfg.pre_lookahead_channels,
                                                     cfg.pre_lookahead_len_tokens)
        self.encoders = nn.ModuleList(
            [ConformerEncoderLayer(d, cfg.attention_heads, cfg.linear_units_dims) for _ in range(cfg.num_blocks)])
        self.up_layer = Upsample1D(cfg.up_channels, cfg.up_channels, cfg.up_stride)
        self.up_embed = LinearEmbed(cfg.input_size_dims, d)
        self.up_encoders = nn.ModuleList(
            [ConformerEncoderLayer(d, cfg.attention_heads, cfg.linear_units_dims) for _ in range(cfg.num_up_blocks)])
        self._pos_table = RelPositionTable(d, cfg.pos_enc_max_len)
        self._chunk_masks = ChunkMaskCache()
        for i, layer in enumerate([*self.encoders, *self.up_encoders]):
            layer.self_attn.cache_index = i

    def output_size(self) -> int:
        return self.cfg.output_size_dims

    UP_CONTEXT_CONV = 0      # the up-sampler's left context, as a FlowCache convolution number

    def forward(self, xs: torch.Tensor, context: torch.Tensor | None = None,
                streaming: bool = False, window: EncoderWindow | None = None) -> torch.Tensor:
        """xs [B, T, D] token embeddings; context [B, L, D] look-ahead embeddings (non-final calls) or None.

        Returns [B, stride*T, D] after `after_norm`. streaming=True applies block-causal chunk attention
        (static_chunk_size tokens before the up-sampler, stride times that after).

        window: xs holds a serving batch laid out as `EncoderWindow` says (context must be None); the result
        covers each row's window, [B, stride * window tokens, D].
        """
        if window is not None:
            return self._forward_window(xs, window)
        t = xs.size(1)
        xs = self.embed(xs)
        if context is not None and context.size(1) > 0:
            context = self.embed(context)
        else:
            context = None
        pos = self._pos_table.get(t, xs.device, xs.dtype)
        mask = self._chunk_masks.get(t, self.cfg.static_chunk_size_tokens, xs.device) if streaming else None
        xs = self.pre_lookahead_layer(xs, context)
        for layer in self.encoders:
            xs = layer(xs, pos, mask)

        xs = self.up_layer(xs.transpose(1, 2)).transpose(1, 2)
        t2 = xs.size(1)
        xs = self.up_embed(xs)
        pos = self._pos_table.get(t2, xs.device, xs.dtype)
        mask = self._chunk_masks.get(t2, self.cfg.up_static_chunk_size_frames, xs.device) if streaming else None
        for layer in self.up_encoders:
            xs = layer(xs, pos, mask)
        return self.after_norm(xs)

    def _forward_window(self, xs: torch.Tensor, window: EncoderWindow) -> torch.Tensor:
        lookahead = self.pre_lookahead_layer.pre_lookahead_len
        cache = window.cache
        xs = self.embed(xs) * window.embed_valid
        xs = self.pre_lookahead_layer(xs[:, :-lookahead], context=xs[:, -lookahead:], halo=window.halo)
        pos = self._pos_table.get(window.token_mask.size(-1), xs.device, xs.dtype)
        for layer in self.encoders:
            xs = layer(xs, pos, window.token_mask, cache)
        width = self.up_layer.context_tokens
        xs = cache.left_context(self.UP_CONTEXT_CONV, xs.transpose(1, 2), width)
        xs = self.up_layer(xs, with_context=True).transpose(1, 2)
        xs = self.up_embed(xs)
        pos = self._pos_table.get(window.frame_mask.size(-1), xs.device, xs.dtype)
        for layer in self.up_encoders:
            xs = layer(xs, pos, window.frame_mask, cache)
        return self.after_norm(xs)
