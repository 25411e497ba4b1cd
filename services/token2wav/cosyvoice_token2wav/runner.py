"""Token2WavRunner: many token2wav chunk calls (streaming and offline mixed) as one padded batch.

Each :class:`ChunkRequest` means exactly what one ``Token2Wav.chunk`` call means (spec 7.2) and its
:class:`ChunkResult` holds the same waveform and next :class:`VocoderCache`. Rows of different lengths
share one batch without changing any row's output:

- flow encoder: tokens right-padded; the pre-look-ahead conv sees, after each row's tokens, its own 3
  look-ahead embeddings (non-final) or zeros (final), as the unbatched call does; attention keys past a
  row's length are masked (rel-pos scores depend only on i - j, so padding leaves them alone); the
  up-sampler and all other convs are causal. Streaming rows add the block-causal chunk mask, per row.
- CFM: 2B estimator rows with a frame mask (the estimator is causal/per-frame apart from masked
  attention); the Euler state stays float32 whatever the estimator dtype.
- HiFT (not causal): every conv input is zeroed past the row's valid length (what the unpadded call's
  zero padding gives), the STFT reflects each row at its own end, the phase is held at the row's last
  frame before the linear up-sampling, and the iSTFT overlap-adds only the row's frames and divides by
  the row's own window envelope.

Weights are converted once at load (HiFT weight norm folded; flow cast to the fast dtype; estimator
q/k/v fused; each resnet's time bias per Euler step precomputed). With ``use_cuda_graphs`` the whole
flow (encoder + 10 Euler steps) is one CUDA graph per (batch bucket, token bucket) and HiFT one per
(batch bucket, mel-frame bucket), replayed from static buffers. Per call: one upload per input kind,
per-request source-noise draws (each request's own generator), one download of all outputs.

Serving (the stage): ``compile_estimator`` runs each Euler step (estimator + CFG update) through
torch.compile (Inductor, dynamic shapes); ``capture_all`` compiles and captures every graph bucket at
start-up, and with ``capture_on_demand=False`` nothing is ever captured or compiled inside a call (a call
outside the captured buckets runs eagerly). The estimator's attention mask is an additive mask in the compute
dtype, built once per call. ``run_chunks`` splits a dynamic batch into length groups under a padding budget,
streams' first chunks in groups of their own that run first, and reports each group as soon as it is done.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cosyvoice_common.constants import MAX_SPEED, MEL_BINS, MIN_SPEED, SPEAKER_EMBEDDING_DIM, SPEED_NEUTRAL

from .flow import CausalMaskedDiffWithXvec
from .graphs import CapturedGraph, GraphCache
from .hift import POST_LRELU_SLOPE, ISTFT_MAX_MAGNITUDE, HiFTGenerator
from .token2wav import Token2WavConfig, VocoderCache, stretched_frames

# Length buckets (a length is padded to the first bucket >= it; past the last, to a multiple of the last
# step). Token buckets are encoder frames (prompt + chunk tokens, 3 look-ahead excluded): 3-10 s prompts are
# 75-250 tokens, a first chunk adds 15, the gateway allows prompts up to 750 tokens. Mel buckets are HiFT input
# frames (8 cached + new): first chunk 30, a 25-token hop 58, an offline call 2 x its tokens.
TOKEN_BUCKETS = (48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024)
MEL_FRAME_BUCKETS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
_BUCKET_TAIL_STEP = 128
# Graphs exist for batch bucket x length bucket up to these sizes (rows x length); a larger call is
# compute-bound, gains nothing from a graph and would only grow the graph pool: it runs eagerly.
MAX_GRAPH_TOKEN_ROWS = 16 * 512
MAX_GRAPH_MEL_ROWS = 16 * 512
# A group of chunk calls may pad its rows' lengths (tokens, mel frames) to at most this times their sum.
DEFAULT_PADDING_BUDGET = 2.0
# torch.compile modes for the estimator step: the runner captures CUDA graphs itself, so none that adds its own
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
_ISTFT_MIN_ENVELOPE = 1e-11   # torch.istft's own validity bound on the window envelope

# meta columns (int64 per row)
_M_TENC, _M_NVALID, _M_STREAM, _M_START, _M_CACHE, _M_MEL = range(6)
_META_COLS = 6


_SEED_MASK = (1 << 64) - 1
_SEED_MODULUS = 1 << 63             # torch.Generator.manual_seed takes any int64/uint64; stay positive
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64


def chunk_seed(request_seed: int, token_offset: int) -> int:
    """The source-noise seed of one chunk: the request's seed mixed with the chunk's `token_offset` (which
    identifies the chunk within its stream; 0 for an offline call) by splitmix64. Chunks of a stream draw
    different noise; the same request replayed draws the same, on whichever replica serves each chunk."""
    z = (int(request_seed) + (int(token_offset) + 1) * _GOLDEN_GAMMA) & _SEED_MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _SEED_MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _SEED_MASK
    return (z ^ (z >> 31)) % _SEED_MODULUS


class ChunkRequestError(ValueError):
    """A request that cannot be run (answers only that request)."""


@dataclass(slots=True)
class ChunkRequest:
    """One ``Token2Wav.chunk`` call. Tensors may be on any device (CPU expected: what Triton hands over)."""
    tokens: torch.Tensor              # [1, T] speech codes, the whole prefix
    prompt_tokens: torch.Tensor       # [1, Tp]
    prompt_feat: torch.Tensor         # [1, Fp, 80]
    embedding: torch.Tensor           # [1, 192]
    token_offset: int = 0
    finalize: bool = True
    streaming: bool = False
    cache: VocoderCache | None = None
    generator: torch.Generator | None = None   # HiFT source noise; else `seed`; else the global RNG
    seed: int | None = None
    speed: float = SPEED_NEUTRAL      # offline calls only: the mel is stretched to int(frames / speed) for HiFT

    @property
    def kind(self) -> str:
        """first | middle | final (chunks of a stream) | offline (one pass): what scheduling and metrics use."""
        if not self.finalize:
            return "first" if self.token_offset == 0 else "middle"
        return "final" if self.token_offset > 0 else "offline"


@dataclass(slots=True)
class ChunkResult:
    waveform: torch.Tensor | None         # [1, N] float32
    cache: VocoderCache | None            # for the next chunk; None after the final one (or on error)
    error: Exception | None = None
    mel: torch.Tensor | None = None       # [1, 80, F] this chunk's new flow mel (only with keep_mel)


CHUNK_KINDS = ("first", "middle", "final", "offline")


@dataclass(frozen=True, slots=True)
class GroupTiming:
    """One scheduled group of a ``run_chunks`` call."""
    wait_ms: float        # from the start of run_chunks to the start of this group
    compute_ms: float     # this group's run, results on the output device
    rows: int             # requests in the group (0 for the requests that failed validation)
    padded: tuple[int, int, int] = (0, 0, 0)   # (batch, tokens, mel frames) it ran at


def compile_step(fn: Callable, mode: str) -> Callable:
    """``fn`` through torch.compile (Inductor) with dynamic shapes, so one compilation serves every
    (rows, frames) bucket; the runner's CUDA graphs capture the compiled kernels."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    import torch._dynamo
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, limit, max(getattr(cfg, limit), 64))
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=True)


@dataclass(frozen=True, slots=True)
class _Plan:
    """Host-side sizes of one request."""
    index: int
    ids: torch.Tensor          # [N] int64 prompt + target codes
    t_enc: int                 # encoder frames before up-sampling (N, or N - look-ahead when not final)
    prompt_frames: int
    start_frame: int           # first flow frame of this chunk's new mel (prompt + offset)
    cache_frames: int          # 0 or HIFT_MEL_CACHE_FRAMES
    mel_frames: int            # HiFT input frames (cache + new; new stretched by speed)
    new_frames: int            # flow frames of this chunk (before any speed stretch)
    finalize: bool
    streaming: bool
    first: bool                # a stream's first chunk: scheduled ahead of the rest
    speed: float = SPEED_NEUTRAL


@dataclass(slots=True)
class _Staged:
    """A group's padded inputs (host or device)."""
    ids: torch.Tensor
    meta: torch.Tensor
    cond: torch.Tensor
    embedding: torch.Tensor
    cache_mel: torch.Tensor
    cache_source: torch.Tensor
    cache_speech: torch.Tensor
    extra: dict = field(default_factory=dict)


def bucket(n: int, table: tuple[int, ...]) -> int:
    for size in table:
        if n <= size:
            return size
    return math.ceil(n / _BUCKET_TAIL_STEP) * _BUCKET_TAIL_STEP


def batch_bucket(n: int, max_batch: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, max_batch)


class Token2WavRunner:
    """Batched, graph-captured token2wav. ``run_chunks`` is the only call a server needs."""

    def __init__(self, model: str | Path | tuple[CausalMaskedDiffWithXvec, HiFTGenerator],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 use_cuda_graphs: bool = False, max_batch: int = 16, hift_dtype: torch.dtype = torch.float32,
                 config: Token2WavConfig = Token2WavConfig(), compile_estimator: bool = False,
                 compile_mode: str = "default", capture_on_demand: bool = True,
                 padding_budget: float = DEFAULT_PADDING_BUDGET, first_chunks_apart: bool = True) -> None:
        """compile_estimator: one Euler step of the estimator goes through torch.compile (Inductor, dynamic
        shapes: one compilation serves every bucket). capture_on_demand: a graph bucket is captured the first
        time a call needs it (inside that call); False: only what ``capture_all`` captured replays, anything
        else runs eagerly. padding_budget, first_chunks_apart: see ``schedule``."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if use_cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if padding_budget < 1.0:
            raise ValueError("padding_budget must be >= 1")
        self.dtype = dtype
        self.hift_dtype = hift_dtype
        self.use_cuda_graphs = use_cuda_graphs
        self.capture_on_demand = capture_on_demand
        self.padding_budget = padding_budget
        self.first_chunks_apart = first_chunks_apart
        self.compile_mode = compile_mode if compile_estimator else None
        # pad to the graph buckets (batch rows and lengths) even when eager: lets CPU tests cover that padding
        self.pad_to_buckets = use_cuda_graphs
        self.max_batch = max_batch
        self.config = config
        if isinstance(model, (str, Path)):
            from .flow import load_flow
            from .hift import load_hift
            flow, hift = load_flow(model, "cpu", torch.float32), load_hift(model, "cpu", fold=True)
            owned = True
        else:
            flow, hift = model
            owned = False
        self.flow = self._prepare_flow(flow, owned)
        self.hift = self._prepare_hift(hift, owned)
        if self.hift.cfg.samples_per_frame != config.samples_per_frame:
            raise ValueError("HiFT samples per frame differ from the token2wav config")
        self._lookahead = self.flow.cfg.pre_lookahead_len_tokens
        self._ratio = self.flow.cfg.token_mel_ratio
        self._n_cache = config.source_cache_samples
        window = torch.from_numpy(np.hamming(2 * self._n_cache))
        self._fade_in = window[:self._n_cache].to(self.device)
        self._fade_out = window[self._n_cache:].to(self.device)
        self._chunk_masks: dict[tuple[int, int], torch.Tensor] = {}
        self._aranges: dict[int, torch.Tensor] = {}
        self._cfg_pairs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._flow_graphs = GraphCache()
        self._hift_graphs = GraphCache()
        self._pinned: dict[tuple, _Staged] = {}
        self._graph_keys = tuple(set(keys) for keys in self.graph_keys())   # (flow, HiFT)
        self._step = self._estimator_step
        if compile_estimator:
            self._step = compile_step(self._estimator_step, compile_mode)
        self.startup_s = 0.0

    # ------------------------------------------------------------------------------------------------
    # load-time conversion
    # ------------------------------------------------------------------------------------------------
    def _prepare_flow(self, flow: CausalMaskedDiffWithXvec, owned: bool) -> CausalMaskedDiffWithXvec:
        flow = flow.eval()
        noise = flow.decoder.rand_noise.detach().float()
        if not owned and (next(flow.parameters()).dtype != self.dtype or next(flow.parameters()).device != self.device):
            flow = copy.deepcopy(flow)
        flow = flow.to(device=self.device, dtype=self.dtype).requires_grad_(False)
        self._noise = noise.to(self.device)                                  # [1, 80, frames] float32
        cfm = flow.decoder
        est = cfm.estimator
        t_sched, dt_sched = cfm.t_schedule(cfm.cfg.n_timesteps, self.device, torch.float32)
        self._dt = [float(v) for v in dt_sched.cpu()]                         # Python floats: baked into graphs
        self._n_steps = cfm.cfg.n_timesteps
        self._cfg_guided = 1.0 + cfm.cfg.inference_cfg_rate
        self._cfg_unguided = cfm.cfg.inference_cfg_rate
        with torch.inference_mode():
            # The time embedding is the same for every row: its MLP, and each resnet's projection of it,
            # are per-step constants.
            temb = est.time_mlp(est.time_embeddings(t_sched).to(self.dtype))   # [steps, temb]
            resnets = [est.down_blocks[0][0], *[m[0] for m in est.mid_blocks], est.up_blocks[0][0]]
            biases = [r.mlp(temb).unsqueeze(-1) for r in resnets]              # [steps, C, 1] each
            # per step, one [C, 1] bias per resnet (down, mids, up): tensors, so a compiled step serves every step
            self._step_biases = [tuple(b[step].contiguous() for b in biases) for step in range(self._n_steps)]
            self._dt_tensors = [torch.tensor(dt, dtype=torch.float32, device=self.device) for dt in self._dt]
            stacks = [est.down_blocks[0][1], *[m[1] for m in est.mid_blocks], est.up_blocks[0][1]]
            self._stack_qkv = [[torch.cat([b.attn1.to_q.weight, b.attn1.to_k.weight, b.attn1.to_v.weight],
                                          dim=0).contiguous() for b in blocks] for blocks in stacks]
        return flow

    def _prepare_hift(self, hift: HiFTGenerator, owned: bool) -> HiFTGenerator:
        from torch.nn.utils import parametrize
        needs_fold = any(parametrize.is_parametrized(m, "weight") for m in hift.modules())
        moved = next(hift.parameters()).device != self.device or next(hift.parameters()).dtype != self.hift_dtype
        if not owned and (needs_fold or moved):
            hift = copy.deepcopy(hift)
        if needs_fold:
            hift.fold_weight_norm()
        return hift.to(device=self.device, dtype=self.hift_dtype).eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------------
    # small cached constants (filled eagerly before any graph capture)
    # ------------------------------------------------------------------------------------------------
    def _arange(self, n: int) -> torch.Tensor:
        a = self._aranges.get(n)
        if a is None:
            a = torch.arange(n, device=self.device)
            self._aranges[n] = a
        return a

    def _chunk_mask(self, length: int, chunk: int) -> torch.Tensor:
        key = (length, chunk)
        m = self._chunk_masks.get(key)
        if m is None:
            pos = torch.arange(length, device=self.device)
            m = pos[None, :] < ((pos // chunk + 1) * chunk)[:, None]
            self._chunk_masks[key] = m
        return m

    def _attn_mask(self, length: int, valid: torch.Tensor, streaming: torch.Tensor, chunk: int) -> torch.Tensor:
        """valid [B, 1] lengths, streaming [B, 1] bool -> [B, 1, T, T] bool (keys valid; chunk-causal if streaming)."""
        key_valid = self._arange(length)[None, :] < valid                       # [B, T]
        chunked = self._chunk_mask(length, chunk)[None, None] | ~streaming[:, :, None, None]
        return key_valid[:, None, None, :] & chunked

    # ------------------------------------------------------------------------------------------------
    # flow: encoder + CFM on a padded batch
    # ------------------------------------------------------------------------------------------------
    def _flow_core(self, ids: torch.Tensor, meta: torch.Tensor, cond: torch.Tensor,
                   embedding: torch.Tensor) -> tuple[torch.Tensor]:
        """ids [B, Tk + L]; meta [B, 6]; cond [B, 80, ratio*Tk]; embedding [B, 192] -> mel [B, 80, ratio*Tk] f32."""
        flow, enc = self.flow, self.flow.encoder
        tk = ids.size(1) - self._lookahead
        t_enc = meta[:, _M_TENC:_M_TENC + 1]
        streaming = meta[:, _M_STREAM:_M_STREAM + 1].bool()
        x = enc.embed(flow.input_embedding(ids))
        x = x * (self._arange(ids.size(1))[None, :] < meta[:, _M_NVALID:_M_NVALID + 1]).unsqueeze(-1).to(x.dtype)
        x = enc.pre_lookahead_layer(x[:, :tk], context=x[:, tk:])
        mask = self._attn_mask(tk, t_enc, streaming, enc.cfg.static_chunk_size_tokens)
        pos = enc._pos_table.get(tk, x.device, x.dtype)
        for layer in enc.encoders:
            x = layer(x, pos, mask)
        x = enc.up_layer(x.transpose(1, 2)).transpose(1, 2)
        t2 = x.size(1)
        x = enc.up_embed(x)
        mask = self._attn_mask(t2, t_enc * enc.cfg.up_stride, streaming, enc.cfg.up_static_chunk_size_frames)
        pos = enc._pos_table.get(t2, x.device, x.dtype)
        for layer in enc.up_encoders:
            x = layer(x, pos, mask)
        mu = flow.encoder_proj(enc.after_norm(x)).transpose(1, 2)             # [B, 80, F]
        spks = flow.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        frames = mu.size(2)
        valid = t_enc * self._ratio
        frame_mask = (self._arange(frames)[None, :] < valid).unsqueeze(1).to(self.dtype)    # [B, 1, F]
        attn = self._attn_mask(frames, valid, streaming, flow.decoder.estimator.cfg.static_chunk_size_frames)
        # additive (0 / -inf) in the compute dtype, built once per call: SDPA would otherwise convert a boolean
        # mask in each of the estimator's attention layers at every step
        bias = torch.zeros(attn.shape, dtype=self.dtype, device=attn.device).masked_fill_(~attn, float("-inf"))
        return (self._cfm(mu, frame_mask, spks, cond, bias),)

    def _cfm(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
             attn_bias: torch.Tensor) -> torch.Tensor:
        b, _, frames = mu.shape
        const = torch.cat([mu, spks.unsqueeze(-1).expand(-1, -1, frames), cond], dim=1)
        const_in = torch.cat([const, torch.zeros_like(const)], dim=0)
        mask_in = torch.cat([mask, mask], dim=0)
        bias_in = torch.cat([attn_bias, attn_bias], dim=0)
        # the Euler state is held twice ([2B] rows, both halves equal: the CFG pair), so the step never sees a
        # batch of 1 (a compiled step then serves B = 1 and B > 1 with one compilation)
        x = self._noise[:, :, :frames].expand(2 * b, -1, -1).contiguous()
        cfg = self._cfg_pairing(b)
        for step in range(self._n_steps):
            x = self._step(x, const_in, mask_in, bias_in, self._step_biases[step], self._dt_tensors[step], cfg)
        return x[:b]

    def _cfg_pairing(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row CFG weights [2B, 1, 1] (own row, paired row) and the pairing index [2B] (cached per B)."""
        entry = self._cfg_pairs.get(b)
        if entry is None:
            g, u = self._cfg_guided, self._cfg_unguided
            w_self = torch.tensor([g] * b + [-u] * b, dtype=torch.float32, device=self.device).view(-1, 1, 1)
            w_pair = torch.tensor([-u] * b + [g] * b, dtype=torch.float32, device=self.device).view(-1, 1, 1)
            pair = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(self.device)
            entry = self._cfg_pairs[b] = (w_self, w_pair, pair)
        return entry

    def _estimator_step(self, x: torch.Tensor, const: torch.Tensor, mask: torch.Tensor, attn_bias: torch.Tensor,
                        time_bias: tuple[torch.Tensor, ...], dt: torch.Tensor,
                        cfg: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One Euler step with CFG on the doubled state x [2B, 80, F] float32:
        x + dt * ((1 + r) v_cond - r v_uncond) in both halves."""
        v = self._estimator(x.to(self.dtype), const, mask, attn_bias, time_bias).float()
        # row i pairs with row (i + B) mod 2B; weights (1 + r, -r) in the cond half and (-r, 1 + r) in the
        # uncond half give (1 + r) v_cond - r v_uncond in both (no slicing by B, which may be 1)
        w_self, w_pair, pair = cfg
        return x + dt * (w_self * v + w_pair * v.index_select(0, pair))

    def _estimator(self, x: torch.Tensor, const: torch.Tensor, mask: torch.Tensor, attn_bias: torch.Tensor,
                   time_bias: tuple[torch.Tensor, ...]) -> torch.Tensor:
        est = self.flow.decoder.estimator
        qkv = self._stack_qkv
        h = torch.cat([x, const], dim=1)
        resnet, blocks, down = est.down_blocks[0]
        h = self._transformers(blocks, qkv[0], self._resnet(resnet, h, mask, time_bias[0]), attn_bias)
        skip = h
        h = down(h * mask)
        for i, (resnet, blocks) in enumerate(est.mid_blocks, start=1):
            h = self._transformers(blocks, qkv[i], self._resnet(resnet, h, mask, time_bias[i]), attn_bias)
        resnet, blocks, up = est.up_blocks[0]
        h = torch.cat([h[:, :, :skip.size(-1)], skip], dim=1)
        h = self._transformers(blocks, qkv[-1], self._resnet(resnet, h, mask, time_bias[-1]), attn_bias)
        h = up(h * mask)
        h = est.final_block(h, mask)
        return est.final_proj(h * mask) * mask

    @staticmethod
    def _resnet(rb, x: torch.Tensor, mask: torch.Tensor, time_bias: torch.Tensor) -> torch.Tensor:
        h = rb.block1(x, mask) + time_bias
        h = rb.block2(h, mask)
        return h + rb.res_conv(x * mask)

    @staticmethod
    def _transformers(blocks, qkv_weights: list[torch.Tensor], x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)
        for blk, w in zip(blocks, qkv_weights):
            a = blk.attn1
            n, f, _ = h.shape
            qkv = F.linear(blk.norm1(h), w).view(n, f, 3, a.heads, a.head_dim).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_bias)
            h = h + a.to_out[0](out.transpose(1, 2).reshape(n, f, a.heads * a.head_dim))
            h = h + blk.ff(blk.norm3(h))
        return h.transpose(1, 2)

    # ------------------------------------------------------------------------------------------------
    # HiFT on a padded batch
    # ------------------------------------------------------------------------------------------------
    def _length_mask(self, n: int, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self._arange(n)[None, :] < valid).unsqueeze(1).to(dtype)     # [B, 1, n]

    def _resblock(self, rb, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(rb.convs1, rb.convs2, rb.activations1, rb.activations2):
            x = x + conv2(act2(conv1(act1(x) * mask)) * mask)
        return x

    def _hift_core(self, mel: torch.Tensor, hmeta: torch.Tensor, cache_source: torch.Tensor,
                   cache_speech: torch.Tensor, rand_ini: torch.Tensor,
                   noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, 80, M] (zero past each row's frames); hmeta [B, 2] (frames, cache samples);
        cache_* [B, K]; rand_ini [B, H]; noise [B, L, H] -> (joined speech [B, L], excitation [B, L])."""
        hift, cfg = self.hift, self.hift.cfg
        dt = mel.dtype
        b, _, m = mel.shape
        spf = cfg.samples_per_frame
        m_len = hmeta[:, 0:1]
        c_len = hmeta[:, 1:2]
        fmask = self._length_mask(m, m_len, dt)
        # F0 predictor: five convs, each input zeroed past the row's frames.
        h = mel
        condnet = hift.f0_predictor.condnet
        for i in range(0, len(condnet), 2):
            h = condnet[i + 1](condnet[i](h * fmask))
        f0 = hift.f0_predictor.classifier(h.transpose(1, 2)).squeeze(-1).abs()      # [B, M]
        # Source (SineGen2), as SourceModuleHnNSF.forward, holding the phase past each row's last frame.
        ms = hift.m_source
        f0_up = torch.repeat_interleave(f0, spf, dim=1).unsqueeze(-1)               # [B, L, 1]
        fn = f0_up * ms.harmonic_multipliers.to(dt)
        rad = torch.remainder(fn / ms.sampling_rate_hz, 1.0)
        rad[:, 0, :] = rad[:, 0, :] + rand_ini
        rad_frames = F.interpolate(rad.transpose(1, 2), scale_factor=1.0 / spf, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad_frames, dim=1) * 2 * math.pi
        n_fr = phase.size(1)
        hold = torch.minimum(self._arange(n_fr)[None, :], m_len.clamp(max=n_fr) - 1)
        phase = phase.gather(1, hold.unsqueeze(-1).expand(-1, -1, phase.size(2)))
        phase = F.interpolate(phase.transpose(1, 2) * spf, scale_factor=float(spf), mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * ms.sine_amp
        uv = (f0_up > ms.voiced_threshold_hz).to(dt)
        noise_amp = uv * ms.voiced_noise_std + (1 - uv) * ms.unvoiced_noise_std
        sine_waves = sines * uv + noise_amp * noise
        s = torch.tanh(ms.l_linear(sine_waves)).squeeze(-1)                          # [B, L]
        n_len = s.size(1)
        k = cache_source.size(1)
        s = torch.cat([torch.where(self._arange(k)[None, :] < c_len, cache_source.to(dt), s[:, :k]), s[:, k:]], 1)
        # STFT, centred, each row reflected at its own end.
        n_fft, hop = cfg.istft_n_fft, cfg.istft_hop_len_samples
        half = n_fft // 2
        l_len = m_len * spf
        q = (self._arange(n_len + n_fft) - half).abs()[None, :]
        q = torch.where(q >= l_len, 2 * (l_len - 1) - q, q).clamp(0, n_len - 1)
        window = hift.stft_window.to(dt)
        spec = torch.stft(s.gather(1, q), n_fft, hop, n_fft, window=window, center=False, return_complex=True)
        n_frames = spec.size(-1)
        smask = self._length_mask(n_frames, l_len // hop + 1, dt)
        s_stft = torch.cat([spec.real, spec.imag], dim=1) * smask
        # Generator.
        x = hift.conv_pre(mel)
        valid = m_len
        n_up = len(hift.ups)
        nk = hift.num_kernels
        for i in range(n_up):
            x = F.leaky_relu(x, cfg.lrelu_slope)
            x = hift.ups[i](x * self._length_mask(x.size(2), valid, dt))
            valid = valid * cfg.upsample_rates[i]
            if i == n_up - 1:
                x = F.pad(x, (1, 0), mode="reflect")
                valid = valid + 1
            xmask = self._length_mask(x.size(2), valid, dt)
            x = x + self._resblock(hift.source_resblocks[i], hift.source_downs[i](s_stft), xmask)
            xs = self._resblock(hift.resblocks[i * nk], x, xmask)
            for j in range(1, nk):
                xs = xs + self._resblock(hift.resblocks[i * nk + j], x, xmask)
            x = xs / nk
        x = hift.conv_post(F.leaky_relu(x, POST_LRELU_SLOPE) * xmask)
        n_bins = n_fft // 2 + 1
        magnitude = torch.clamp(torch.exp(x[:, :n_bins, :]), max=ISTFT_MAX_MAGNITUDE)
        ph = torch.sin(x[:, n_bins:, :])
        frames = torch.fft.irfft(torch.complex(magnitude * torch.cos(ph), magnitude * torch.sin(ph)).transpose(1, 2),
                                 n=n_fft, dim=-1)                                    # [B, N, n_fft]
        fr_mask = xmask.transpose(1, 2)                                              # [B, N, 1]
        n_out = n_fft + hop * (frames.size(1) - 1)
        y = F.fold((frames * window * fr_mask).transpose(1, 2), (1, n_out), (1, n_fft), stride=(1, hop))
        env = F.fold((window * window * fr_mask).transpose(1, 2), (1, n_out), (1, n_fft), stride=(1, hop))
        y, env = y.flatten(1)[:, half:n_out - half], env.flatten(1)[:, half:n_out - half]
        speech = torch.where(env > _ISTFT_MIN_ENVELOPE, y / torch.where(env > _ISTFT_MIN_ENVELOPE, env, 1.0), 0.0)
        speech = torch.clamp(speech, -cfg.audio_limit, cfg.audio_limit).float()
        # Cross-fade the head with the previous chunk's withheld tail (float64, as Token2Wav).
        head = (speech[:, :k].double() * self._fade_in + cache_speech.double() * self._fade_out).float()
        speech = torch.cat([torch.where(c_len > 0, head, speech[:, :k]), speech[:, k:]], dim=1)
        return speech, s.float()

    # ------------------------------------------------------------------------------------------------
    # host side
    # ------------------------------------------------------------------------------------------------
    def _plan(self, index: int, r: ChunkRequest) -> _Plan:
        if r.tokens.dim() != 2 or r.tokens.size(0) != 1 or r.prompt_tokens.dim() != 2 or r.prompt_tokens.size(0) != 1:
            raise ChunkRequestError("tokens and prompt_tokens must be [1, T]")
        if r.prompt_feat.dim() != 3 or r.prompt_feat.size(0) != 1 or r.prompt_feat.size(2) != MEL_BINS:
            raise ChunkRequestError(f"prompt_feat must be [1, frames, {MEL_BINS}]")
        if r.embedding.numel() != SPEAKER_EMBEDDING_DIM:
            raise ChunkRequestError(f"embedding must have {SPEAKER_EMBEDDING_DIM} values")
        n_target = r.tokens.size(1)
        if r.token_offset < 0 or r.token_offset > n_target:
            raise ChunkRequestError(f"token_offset {r.token_offset} outside [0, {n_target}]")
        if (r.cache is None) != (r.token_offset == 0):
            raise ChunkRequestError("a cache is required exactly for chunks after the first (token_offset > 0)")
        ids = torch.cat([r.prompt_tokens.reshape(-1), r.tokens.reshape(-1)]).to("cpu", torch.int64).clamp(min=0)
        if ids.numel() and int(ids.max()) >= self.flow.cfg.vocab_size:
            raise ChunkRequestError(f"speech codes must be < {self.flow.cfg.vocab_size}")
        n = ids.numel()
        if r.finalize:
            t_enc = n
        else:
            if n <= self._lookahead:
                raise ChunkRequestError(f"a non-final call needs more than {self._lookahead} tokens")
            t_enc = n - self._lookahead
        if t_enc < 1:
            raise ChunkRequestError("no tokens")
        frames = t_enc * self._ratio
        prompt_frames = r.prompt_feat.size(1)
        if prompt_frames > frames:
            raise ChunkRequestError(f"prompt_feat has {prompt_frames} frames but the tokens give only {frames}")
        start = prompt_frames + r.token_offset * self.config.token_mel_ratio
        new = max(0, frames - start)
        cache_frames = 0 if r.cache is None else self.config.mel_cache_frames
        if r.cache is not None and (tuple(r.cache.mel.shape) != (1, MEL_BINS, cache_frames)
                                    or r.cache.source.numel() != self._n_cache or r.cache.speech.numel() != self._n_cache):
            raise ChunkRequestError("cache shapes do not match this model's vocoder cache")
        speed = float(r.speed)
        if speed != SPEED_NEUTRAL:
            if not (r.finalize and r.token_offset == 0):
                raise ChunkRequestError("speed applies to offline calls only (no token_offset, finalize)")
            if not MIN_SPEED <= speed <= MAX_SPEED:   # also bounds the stretched mel's memory
                raise ChunkRequestError(f"speed {speed} outside [{MIN_SPEED}, {MAX_SPEED}]")
            mel_frames = stretched_frames(new, speed)
        else:
            mel_frames = cache_frames + new
        if not r.finalize and mel_frames < self.config.mel_cache_frames:
            raise ChunkRequestError(f"a non-final chunk needs at least {self.config.mel_cache_frames} mel frames, "
                                    f"got {mel_frames}")
        if mel_frames < 1:
            raise ChunkRequestError("the chunk has no mel frames to vocode")
        return _Plan(index, ids, t_enc, prompt_frames, start, cache_frames, mel_frames, new, r.finalize, r.streaming,
                     r.kind == "first", speed)

    def _sizes(self, plans: list[_Plan]) -> tuple[int, int, int]:
        n = len(plans)
        tk = max(p.t_enc for p in plans)
        # at least the cache length: the cross-fade and the cache overwrite read the first K samples
        mk = max(self.config.mel_cache_frames, max(p.mel_frames for p in plans))
        if not self.pad_to_buckets:
            return n, tk, mk
        return batch_bucket(n, self.max_batch), bucket(tk, TOKEN_BUCKETS), bucket(mk, MEL_FRAME_BUCKETS)

    def _stage(self, plans: list[_Plan], requests: list[ChunkRequest], bb: int, tk: int) -> _Staged:
        """Padded host tensors for the group (pinned and reused when graphs are on)."""
        la, k = self._lookahead, self._n_cache
        key = (bb, tk)
        st = self._pinned.get(key) if self.use_cuda_graphs else None
        if st is None:
            pin = self.use_cuda_graphs
            st = _Staged(ids=torch.zeros(bb, tk + la, dtype=torch.int64, pin_memory=pin),
                         meta=torch.zeros(bb, _META_COLS, dtype=torch.int64, pin_memory=pin),
                         cond=torch.zeros(bb, MEL_BINS, self._ratio * tk, dtype=self.dtype, pin_memory=pin),
                         embedding=torch.zeros(bb, SPEAKER_EMBEDDING_DIM, dtype=self.dtype, pin_memory=pin),
                         cache_mel=torch.zeros(bb, MEL_BINS, self.config.mel_cache_frames, dtype=torch.float32,
                                               pin_memory=pin),
                         cache_source=torch.zeros(bb, k, dtype=torch.float32, pin_memory=pin),
                         cache_speech=torch.zeros(bb, k, dtype=torch.float32, pin_memory=pin))
            if self.use_cuda_graphs:
                self._pinned[key] = st
        else:
            if "uploaded" in st.extra:
                st.extra["uploaded"].synchronize()   # the previous call's async uploads have read this buffer
            for t in (st.ids, st.cond, st.embedding, st.cache_mel, st.cache_source, st.cache_speech):
                t.zero_()
        meta = st.meta
        meta.zero_()
        meta[:, _M_TENC] = 1      # padding rows: one valid frame, final, not streaming
        meta[:, _M_NVALID] = 1
        meta[:, _M_MEL] = 1
        for row, (p, r) in enumerate(zip(plans, requests)):
            st.ids[row, :p.ids.numel()] = p.ids
            meta[row, _M_TENC] = p.t_enc
            meta[row, _M_NVALID] = p.ids.numel()
            meta[row, _M_STREAM] = int(p.streaming)
            meta[row, _M_START] = p.start_frame
            meta[row, _M_CACHE] = p.cache_frames
            meta[row, _M_MEL] = p.mel_frames
            st.cond[row, :, :p.prompt_frames] = r.prompt_feat[0].to("cpu").t().to(self.dtype)
            st.embedding[row] = r.embedding.reshape(-1).to("cpu", self.dtype)
            if r.cache is not None:
                st.cache_mel[row] = r.cache.mel[0].to("cpu", torch.float32)
                st.cache_source[row] = r.cache.source.reshape(-1).to("cpu", torch.float32)
                st.cache_speech[row] = r.cache.speech.reshape(-1).to("cpu", torch.float32)
        return st

    def _draw(self, plans: list[_Plan], requests: list[ChunkRequest], bb: int, mk: int,
              rand_ini: torch.Tensor | None = None, noise: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's own source draws (Token2Wav's order and shapes) into [bb, H] / [bb, mk*spf, H] rows."""
        spf = self.hift.cfg.samples_per_frame
        n_h = self.hift.cfg.n_harmonic_channels
        if rand_ini is None:
            rand_ini = torch.zeros(bb, n_h, device=self.device, dtype=self.hift_dtype)
            noise = torch.zeros(bb, mk * spf, n_h, device=self.device, dtype=self.hift_dtype)
        for row, (p, r) in enumerate(zip(plans, requests)):
            gen = r.generator
            if gen is None and r.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(int(r.seed))
            dev = gen.device if gen is not None else self.device
            draws = self.hift.m_source.draw(1, p.mel_frames * spf, dev, gen)
            rand_ini[row].copy_(draws.rand_ini[0], non_blocking=True)
            rand_ini[row, 0] = 0
            noise[row, :p.mel_frames * spf].copy_(draws.noise_randn[0], non_blocking=True)
        return rand_ini, noise

    def _hift_input(self, feat: torch.Tensor, meta: torch.Tensor, cache_mel: torch.Tensor, mk: int,
                    plans: list[_Plan]) -> torch.Tensor:
        """[cache mel | flow mel from start] per row, left-aligned and zero-padded to mk frames; a row with a
        speed gets its new mel stretched linearly in time instead (offline rows, no cache)."""
        c = cache_mel.size(2)
        src = torch.cat([cache_mel.to(feat.dtype), feat], dim=2)                    # [B, 80, c + F]
        m = self._arange(mk)[None, :]
        c_len, start, m_len = (meta[:, i:i + 1] for i in (_M_CACHE, _M_START, _M_MEL))
        idx = torch.where(m < c_len, m, c + start + m - c_len).clamp(0, src.size(2) - 1)
        out = src.gather(2, idx.unsqueeze(1).expand(-1, src.size(1), -1))
        out = torch.where((m < m_len).unsqueeze(1), out, 0.0)
        for row, p in enumerate(plans):   # rare (offline requests with a speed): one interpolation per such row
            if p.speed != SPEED_NEUTRAL:
                new_mel = feat[row:row + 1, :, p.start_frame:p.start_frame + p.new_frames]
                out[row, :, :p.mel_frames] = F.interpolate(new_mel, size=p.mel_frames, mode="linear")[0]
        return out.to(self.hift_dtype)

    # ------------------------------------------------------------------------------------------------
    # graphs
    # ------------------------------------------------------------------------------------------------
    def _flow_graph_inputs(self, bb: int, tk: int) -> tuple[torch.Tensor, ...]:
        dev = self.device
        meta = torch.zeros(bb, _META_COLS, dtype=torch.int64)
        meta[:, [_M_TENC, _M_NVALID, _M_MEL]] = 1   # padding rows: a valid (if trivial) call for the warm-up runs
        return (torch.zeros(bb, tk + self._lookahead, dtype=torch.int64, device=dev), meta.to(dev),
                torch.zeros(bb, MEL_BINS, self._ratio * tk, dtype=self.dtype, device=dev),
                torch.ones(bb, SPEAKER_EMBEDDING_DIM, dtype=self.dtype, device=dev))

    def _hift_graph_inputs(self, bb: int, mk: int) -> tuple[torch.Tensor, ...]:
        dev, k = self.device, self._n_cache
        spf, n_h = self.hift.cfg.samples_per_frame, self.hift.cfg.n_harmonic_channels
        return (torch.zeros(bb, MEL_BINS, mk, dtype=self.hift_dtype, device=dev),
                torch.ones(bb, 2, dtype=torch.int64, device=dev),
                torch.zeros(bb, k, dtype=torch.float32, device=dev),
                torch.zeros(bb, k, dtype=torch.float32, device=dev),
                torch.zeros(bb, n_h, dtype=self.hift_dtype, device=dev),
                torch.zeros(bb, mk * spf, n_h, dtype=self.hift_dtype, device=dev))

    def graph_keys(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(flow (batch, token) keys, HiFT (batch, mel frame) keys) that get graphs: every batch bucket x
        length bucket within MAX_GRAPH_*_ROWS."""
        batches = sorted({batch_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})
        flow = [(b, t) for b in batches for t in TOKEN_BUCKETS if b * t <= MAX_GRAPH_TOKEN_ROWS]
        hift = [(b, m) for b in batches for m in MEL_FRAME_BUCKETS if b * m <= MAX_GRAPH_MEL_ROWS]
        return flow, hift

    @torch.inference_mode()
    def capture_all(self, log: Callable[[str], None] | None = None) -> float:
        """Compile (when on) and capture every graph bucket now, largest first (the pool is sized by the
        first capture); returns the seconds it took (also in ``startup_s``). Without CUDA graphs it runs
        the compiled step once per bucket, so no compilation is left for a request."""
        t0 = time.perf_counter()
        flow_keys, hift_keys = self.graph_keys()
        if self.use_cuda_graphs:
            for bb, tk in sorted(flow_keys, key=lambda k: -k[0] * k[1]):
                self._flow_graphs.get((bb, tk), self._flow_core, lambda: self._flow_graph_inputs(bb, tk))
            for bb, mk in sorted(hift_keys, key=lambda k: -k[0] * k[1]):
                self._hift_graphs.get((bb, mk), self._hift_core, lambda: self._hift_graph_inputs(bb, mk))
            torch.cuda.synchronize(self.device)
        elif self.compile_mode is not None:
            for bb, tk in flow_keys:
                self._flow_core(*self._flow_graph_inputs(bb, tk))
        self.startup_s = time.perf_counter() - t0
        if log is not None:
            log(f"token2wav: {self.graph_count} graphs ({len(flow_keys)} flow, {len(hift_keys)} HiFT"
                f"{', estimator compiled: ' + self.compile_mode if self.compile_mode else ''}) ready in "
                f"{self.startup_s:.1f} s")
        return self.startup_s

    def _graph(self, cache: GraphCache, key: tuple[int, int], fn, make_inputs) -> CapturedGraph | None:
        """The captured graph of `key`; None = run eagerly (no graphs, or not captured and not capturing now)."""
        if not self.use_cuda_graphs:
            return None
        graph = cache.lookup(key)
        if graph is None and self.capture_on_demand and key in self._graph_keys[cache is self._hift_graphs]:
            graph = cache.get(key, fn, make_inputs)
        return graph

    def _run_group(self, plans: list[_Plan], requests: list[ChunkRequest], keep_mel: bool,
                   output_device: torch.device) -> list[ChunkResult]:
        bb, tk, mk = self._sizes(plans)
        st = self._stage(plans, requests, bb, tk)
        dev = self.device
        fg = self._graph(self._flow_graphs, (bb, tk), self._flow_core, lambda: self._flow_graph_inputs(bb, tk))
        if fg is not None:
            ids, meta, cond, emb = fg.inputs
            ids.copy_(st.ids, non_blocking=True)
            meta.copy_(st.meta, non_blocking=True)
            cond.copy_(st.cond, non_blocking=True)
            emb.copy_(st.embedding, non_blocking=True)
            (feat,) = fg.replay()
            if keep_mel:   # graphs share a pool: the HiFT replay may reuse this output's memory
                feat = feat.clone()
        else:
            meta = st.meta.to(dev)
            (feat,) = self._flow_core(st.ids.to(dev), meta, st.cond.to(dev), st.embedding.to(dev))
        cache_mel = st.cache_mel.to(dev, non_blocking=True)
        hmel = self._hift_input(feat, meta, cache_mel, mk, plans)
        hmeta = torch.stack([meta[:, _M_MEL], meta[:, _M_CACHE] * self.config.samples_per_frame], dim=1)
        hg = self._graph(self._hift_graphs, (bb, mk), self._hift_core, lambda: self._hift_graph_inputs(bb, mk))
        if hg is not None:
            g_mel, g_meta, g_src, g_sp, g_ri, g_noise = hg.inputs
            g_mel.copy_(hmel)
            g_meta.copy_(hmeta)
            g_src.copy_(st.cache_source, non_blocking=True)
            g_sp.copy_(st.cache_speech, non_blocking=True)
            self._draw(plans, requests, bb, mk, g_ri, g_noise)
            speech, source = hg.replay()
            hmel = g_mel
        else:
            rand_ini, noise = self._draw(plans, requests, bb, mk)
            speech, source = self._hift_core(hmel, hmeta, st.cache_source.to(dev), st.cache_speech.to(dev),
                                             rand_ini, noise)
        if self.use_cuda_graphs:   # every upload from the pinned staging buffers is enqueued by now
            event = torch.cuda.Event()
            event.record()
            st.extra["uploaded"] = event
        return self._collect(plans, feat, hmel, speech, source, keep_mel, output_device)

    def _collect(self, plans: list[_Plan], feat: torch.Tensor, hmel: torch.Tensor, speech: torch.Tensor,
                 source: torch.Tensor, keep_mel: bool, output_device: torch.device) -> list[ChunkResult]:
        """Slice each row back; one packed copy to output_device."""
        spf, k, c = self.config.samples_per_frame, self._n_cache, self.config.mel_cache_frames
        pieces: list[torch.Tensor] = []
        layout: list[list[tuple[int, ...]]] = []
        for row, p in enumerate(plans):
            n = p.mel_frames * spf
            shapes = []
            wav = speech[row, :n] if p.finalize else speech[row, :n - k]
            pieces.append(wav)
            shapes.append((1, wav.numel()))
            if not p.finalize:
                pieces += [hmel[row, :, p.mel_frames - c:p.mel_frames].float().reshape(-1),
                           source[row, n - k:n], speech[row, n - k:n]]
                shapes += [(1, MEL_BINS, c), (1, 1, k), (1, k)]
            if keep_mel:
                mel = feat[row, :, p.start_frame:p.start_frame + p.new_frames]
                pieces.append(mel.reshape(-1))
                shapes.append((1, MEL_BINS, p.new_frames))
            layout.append(shapes)
        flat = torch.cat(pieces).to(output_device)
        results, pos = [], 0
        for p, shapes in zip(plans, layout):
            parts = []
            for shape in shapes:
                size = math.prod(shape)
                parts.append(flat[pos:pos + size].view(shape).clone())
                pos += size
            wav = parts.pop(0)
            cache = None if p.finalize else VocoderCache(mel=parts.pop(0), source=parts.pop(0), speech=parts.pop(0))
            results.append(ChunkResult(waveform=wav, cache=cache, mel=parts.pop(0) if keep_mel else None))
        return results

    def schedule(self, plans: list[_Plan]) -> list[list[_Plan]]:
        """Groups to run, in order. Streams' first chunks and the other calls never share a group (unless
        ``first_chunks_apart`` is off); within each,
        rows are sorted by length and cut into groups of at most max_batch whose padded lengths (tokens and mel
        frames, each row padded to the group's bucket) stay within ``padding_budget`` x their real lengths,
        so a long final chunk or offline call never pads short chunks to its size. The first chunks' groups
        run first, then the cheapest."""
        groups: list[list[_Plan]] = []
        classes = (True, False) if self.first_chunks_apart else (None,)
        for first in classes:
            cur: list[_Plan] = []
            members = (p for p in plans if first is None or p.first == first)
            for p in sorted(members, key=lambda p: (p.t_enc, p.mel_frames, p.index)):
                if cur and (len(cur) >= self.max_batch or not self._within_budget(cur + [p])):
                    groups.append(cur)
                    cur = []
                cur.append(p)
            if cur:
                groups.append(cur)

        def cost(g: list[_Plan]) -> int:
            bb, tk, _ = self._sizes(g)
            return bb * tk
        return sorted(groups, key=lambda g: (not any(p.first for p in g), cost(g), g[0].index))

    def _within_budget(self, group: list[_Plan]) -> bool:
        _, tk, mk = self._sizes(group)
        n = len(group)
        return (n * tk <= self.padding_budget * sum(p.t_enc for p in group)
                and n * mk <= self.padding_budget * sum(max(p.mel_frames, self.config.mel_cache_frames) for p in group))

    @torch.inference_mode()
    def run_chunks(self, requests: list[ChunkRequest], keep_mel: bool = False,
                   output_device: torch.device | str = "cpu",
                   on_group: Callable[[list[int], list[ChunkResult], GroupTiming], None] | None = None
                   ) -> list[ChunkResult]:
        """Run every request (any mix of first/middle/final streaming chunks and offline calls) batched.

        Results are in request order; a request that fails validation gets ``error`` set and the rest run.
        Requests run in the groups of ``schedule``; ``on_group(indices, results, timing)`` is called as soon
        as each group's results are on the output device (first with the requests that failed validation),
        so a caller can answer them before the next group runs.
        """
        t0 = time.perf_counter()
        results: list[ChunkResult | None] = [None] * len(requests)
        plans: list[_Plan] = []
        for i, r in enumerate(requests):
            try:
                plans.append(self._plan(i, r))
            except ChunkRequestError as exc:
                results[i] = ChunkResult(waveform=None, cache=None, error=exc)
        if on_group is not None and len(plans) < len(requests):
            failed = [i for i, res in enumerate(results) if res is not None]
            on_group(failed, [results[i] for i in failed], GroupTiming(0.0, 0.0, 0))
        out_dev = torch.device(output_device)
        for group in self.schedule(plans):
            start = time.perf_counter()
            group_results = self._run_group(group, [requests[p.index] for p in group], keep_mel, out_dev)
            done = time.perf_counter()
            for p, res in zip(group, group_results):
                results[p.index] = res
            if on_group is not None:
                on_group([p.index for p in group], group_results,
                         GroupTiming((start - t0) * 1e3, (done - start) * 1e3, len(group), self._sizes(group)))
        return results  # type: ignore[return-value]

    @property
    def graph_count(self) -> int:
        return len(self._flow_graphs) + len(self._hift_graphs)
