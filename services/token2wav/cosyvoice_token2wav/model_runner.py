"""The model runner: batched forwards of the flow and HiFT for the engine, with the state cache's pages.

Three passes, each over a batch of sequences (`sequence.Sequence`) that may differ in length, cached prefix and
Euler step, each row computed as if alone:

- `encode`: the flow's encoder over each row's window (tokens from its first uncached block on, with the two
  tokens before it and its look-ahead), reading earlier blocks from the cache; sets the row's mu, cond, speaker
  projection and starting noise (fixed per absolute frame).
- `step`: one Euler step of the CFM (estimator on the 2B CFG rows, then the guided update), each row at its own
  step; new chunks join between steps.
- `vocode`: HiFT on each finished row's new mel (the previous chunk's 8 mel frames first), the excitation tail
  and cross-fade of the reference's chunk joining (`token2wav.Token2Wav.vocode`).

Rows are right-padded to a common window of whole blocks; their cached blocks are left-padded with the zero page,
so a query's distance to a key is the same in every row (the encoder's relative positions need that). Each
module runs its own forward (`flow/`), given a `FlowCache` that gathers the pages it reads and writes the window's
complete blocks into the pages the block manager gave the row (the rest go to the trash page).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cosyvoice_common.constants import MEL_BINS, SPEED_NEUTRAL

from .block_manager import NULL_PAGE, PageLayout, PagePool, StateCache
from .flow import CausalMaskedDiffWithXvec
from .flow.encoder import EncoderWindow
from .graphs import GraphCache
from .hift import HiFTGenerator
from .sequence import ChunkResult, Sequence
from .token2wav import Token2WavConfig, VocoderCache

# HiFT input lengths are padded to these buckets when CUDA graphs are on (first chunk 30+8, a 25-token hop 58,
# an offline call 2 x its tokens); past the last, to a multiple of the last step.
MEL_FRAME_BUCKETS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
_BUCKET_TAIL_STEP = 128
MAX_GRAPH_MEL_ROWS = 16 * 512        # rows x frames: larger HiFT calls are compute-bound and run eagerly
# Euler-step graphs: per batch bucket x window blocks x cached blocks (padded up to the bucket: the padding rows
# and blocks are masked). First and middle chunks have windows of 2-4 blocks over 3-30 s prompts (4-30 blocks).
# Final chunks and offline calls read no cached blocks; their windows (the whole utterance with its prompt, up to
# 32 blocks = 32 s) get graphs too: at a few rows a step is still ~1.5k short kernels, launch-bound when eager (an
# H100 stack run of the eager path: 455 ms for a final chunk at c=1). Longer windows run eagerly.
STREAM_WINDOW_BLOCK_BUCKETS = (1, 2, 3, 4, 6, 8)            # with cached blocks
WINDOW_BLOCK_BUCKETS = (*STREAM_WINDOW_BLOCK_BUCKETS, 12, 16, 24, 32)   # without
PAST_BLOCK_BUCKETS = (2, 4, 8, 12, 16, 24, 32)
MAX_GRAPH_STEP_ROW_FRAMES = 16 * 1600   # rows x (window + cached) frames


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


def _blocks(n: int, unit: int) -> int:
    return -(-n // unit)


def key_mask(cached_blocks: torch.Tensor, past_blocks: int, window: torch.Tensor, n_window: int, unit: int,
             streaming: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, n_window, past + n_window]: keys are the cached blocks (left-padded to `past_blocks`),
    then the window's frames. A window frame sees every cached key, and the window's valid keys up to the end of
    its own block when streaming (windows start on a block boundary, so the grid is the window's own)."""
    dev = window.device
    past = past_blocks * unit
    past_valid = torch.arange(past, device=dev)[None, :] >= ((past_blocks - cached_blocks) * unit)[:, None]
    pos = torch.arange(n_window, device=dev)
    same_or_earlier = (pos[None, :] // unit) <= (pos[:, None] // unit)                        # [q, k]
    new_valid = pos[None, :] < window[:, None]                                                 # [B, k]
    new = new_valid[:, None, :] & (same_or_earlier[None] | ~streaming[:, None, None])          # [B, q, k]
    return torch.cat([past_valid[:, None, :].expand(-1, n_window, -1), new], dim=2)[:, None]


@dataclass(slots=True)
class _Pages:
    """A batch's page tables: what each row reads and where its window's blocks go."""
    read: torch.Tensor       # [B, past blocks] cached pages, left-padded with the zero page
    last: torch.Tensor       # [B] the page of the block just before the window (zero page if none)
    write: torch.Tensor      # [B, window blocks] page per window block (trash page: not kept)
    writes: bool             # any page but trash in `write`

    @classmethod
    def of(cls, seqs: list[Sequence], window_blocks: int, trash: int, device: torch.device,
           past_blocks: int | None = None) -> "_Pages":
        """past_blocks: pad the cached pages to this many (default: the most any row has)."""
        past_blocks = max(s.cached_blocks for s in seqs) if past_blocks is None else past_blocks
        read = [[NULL_PAGE] * (past_blocks - s.cached_blocks) + s.cached_pages for s in seqs]
        last = [s.cached_pages[-1] if s.cached_pages else NULL_PAGE for s in seqs]
        write = [(s.write_pages + [trash] * window_blocks)[:window_blocks] for s in seqs]
        as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)  # noqa: E731
        return cls(as_tensor(read).view(len(seqs), past_blocks), as_tensor(last), as_tensor(write),
                   any(s.write_pages for s in seqs))


def _zero_step_inputs(inputs: tuple[torch.Tensor, ...], trash: int) -> None:
    """Back to `_step_inputs`' state (a graph's static inputs keep the last call's values)."""
    x_state, mu, cond, spks, frames, cached, streaming, steps, read, last, write = inputs
    for t in (x_state, mu, cond, spks, cached, streaming, steps):
        t.zero_()
    frames.fill_(1)
    read.fill_(NULL_PAGE)
    last.fill_(NULL_PAGE)
    write.fill_(trash)


class _EncoderCache:
    """FlowCache of the encoder: first-stack layers per token block, up-stack layers per frame block, and the
    up-sampler's left context (the block's last first-stack outputs)."""

    def __init__(self, pool: PagePool, layout: PageLayout, pages: _Pages) -> None:
        self.pool, self.layout, self.pages = pool, layout, pages

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, pages = self.layout, self.pages
        if layer < lo.enc_token_layers:
            store, unit = self.pool.enc_token_kv, lo.block_tokens
        else:
            store, unit, layer = self.pool.enc_frame_kv, lo.block_frames, layer - lo.enc_token_layers
        b, h, n, d = k.shape
        if pages.writes:
            kv = torch.stack([k, v], 1).view(b, 2, h, n // unit, unit, d).permute(0, 3, 1, 2, 4, 5)
            store[pages.write.reshape(-1), layer] = kv.reshape(-1, 2, h, unit, d)
        past_blocks = pages.read.size(1)
        if past_blocks == 0:
            return k, v
        past = store[pages.read, layer].permute(2, 0, 3, 1, 4, 5).reshape(2, b, h, past_blocks * unit, d)
        return torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)

    def left_context(self, conv: int, x: torch.Tensor, width: int) -> torch.Tensor:
        b, c, n = x.shape
        unit = self.layout.block_tokens
        if self.pages.writes:
            tails = x.view(b, c, n // unit, unit)[..., unit - width:].permute(0, 2, 1, 3)
            self.pool.enc_tail[self.pages.write.reshape(-1)] = tails.reshape(-1, c, width)
        return torch.cat([self.pool.enc_tail[self.pages.last], x], dim=2)


class _EstimatorCache:
    """FlowCache of one Euler step: per row its own step's keys/values and convolution tails, both CFG branches
    (rows [0, B) conditional, [B, 2B) unconditional)."""

    def __init__(self, pool: PagePool, layout: PageLayout, pages: _Pages, steps: torch.Tensor) -> None:
        self.pool, self.layout, self.pages = pool, layout, pages
        self.row_steps = steps                              # [B]
        self.steps = steps[:, None]                         # [B, 1]: broadcasts against the [B, blocks] page tables

    # Each attention layer and convolution of each Euler step runs these, so they are written for the fewest kernels
    # (a step at a few rows is launch-bound on a GPU): the writes take strided views as they are, and the reads
    # are concatenated in the layout attention wants, with no copy in between.
    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pages, unit = self.pages, self.layout.block_frames
        rows, h, n, d = k.shape
        b, blocks = rows // 2, n // unit
        past_blocks = pages.read.size(1)
        if not pages.writes and past_blocks == 0:
            return k, v
        kv = torch.stack([k, v], 0).view(2, 2, b, h, blocks, unit, d)      # [k|v, cfg, B, H, blocks, unit, d]
        if pages.writes:   # pool [page, layer, step, k|v, cfg, H, unit, d] <- [B, blocks, k|v, cfg, H, unit, d]
            self.pool.est_kv[pages.write, layer, self.steps] = kv.permute(2, 4, 0, 1, 3, 5, 6)
        if past_blocks == 0:
            return k, v
        past = self.pool.est_kv[pages.read, layer, self.steps]          # [B, past, k|v, cfg, H, unit, d]
        both = torch.cat([past.permute(2, 3, 0, 4, 1, 5, 6), kv], dim=4)   # [k|v, cfg, B, H, past + blocks, ...]
        both = both.view(2, rows, h, (past_blocks + blocks) * unit, d)
        return both[0], both[1]

    def left_context(self, conv: int, x: torch.Tensor, width: int) -> torch.Tensor:
        pages, unit = self.pages, self.layout.block_frames
        rows, c, n = x.shape
        b = rows // 2
        store = self.pool.est_tail                                   # [page, conv, step, cfg, channels, context]
        by_cfg = x.view(2, b, c, n)
        if pages.writes:   # each window block's last `width` frames, [B, blocks, cfg, c, width]
            tails = by_cfg.view(2, b, c, n // unit, unit)[..., unit - width:].permute(1, 3, 0, 2, 4)
            store[pages.write, conv, self.steps, :, :c] = tails
        tail = store[pages.last, conv, self.row_steps][:, :, :c, store.size(-1) - width:]        # [B, cfg, c, width]
        return torch.cat([tail.transpose(0, 1), by_cfg], dim=3).view(rows, c, width + n)


class _NoCache:
    """FlowCache of a batch that reads nothing and keeps nothing (cache off, or final / offline calls):
    the same arithmetic as the cache's, with zeros before the first frame."""

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v

    def left_context(self, conv: int, x: torch.Tensor, width: int) -> torch.Tensor:
        return F.pad(x, (width, 0))


class ModelRunner:
    """Weights, constants and the three batched passes. Holds no request state (that is on each Sequence)."""

    def __init__(self, flow: CausalMaskedDiffWithXvec, hift: HiFTGenerator, owned: bool, device: torch.device,
                 dtype: torch.dtype, hift_dtype: torch.dtype, cache: StateCache, config: Token2WavConfig,
                 use_cuda_graphs: bool, max_batch: int) -> None:
        self.device, self.dtype, self.hift_dtype = device, dtype, hift_dtype
        self.cache = cache
        self.config = config
        self.use_cuda_graphs = use_cuda_graphs
        # pad batches to the graph buckets (HiFT rows and frames; Euler-step rows, window and cached blocks) even
        # when eager: lets CPU tests cover that padding
        self.pad_to_buckets = use_cuda_graphs
        self.max_batch = max_batch
        self.flow = self._prepare_flow(flow, owned)
        self.hift = self._prepare_hift(hift, owned)
        if self.hift.cfg.samples_per_frame != config.samples_per_frame:
            raise ValueError("HiFT samples per frame differ from the token2wav config")
        enc, est = self.flow.encoder, self.flow.decoder.estimator
        self.lookahead = self.flow.cfg.pre_lookahead_len_tokens
        self.ratio = self.flow.cfg.token_mel_ratio
        self.block_tokens = enc.cfg.static_chunk_size_tokens
        self.block_frames = est.cfg.static_chunk_size_frames
        self.halo_tokens = enc.pre_lookahead_layer.halo_tokens
        n = config.source_cache_samples
        window = torch.from_numpy(np.hamming(2 * n))
        self._fade_in = window[:n].to(device)
        self._fade_out = window[n:].to(device)
        self._hift_graphs = GraphCache()
        self._step_graphs = GraphCache()

    # --- load-time conversion ---------------------------------------------------------------------------
    def _prepare_flow(self, flow: CausalMaskedDiffWithXvec, owned: bool) -> CausalMaskedDiffWithXvec:
        flow = flow.eval()
        noise = flow.decoder.rand_noise.detach().float()
        param = next(flow.parameters())
        if not owned and (param.dtype != self.dtype or param.device != self.device):
            flow = copy.deepcopy(flow)
        flow = flow.to(device=self.device, dtype=self.dtype).requires_grad_(False)
        flow.decoder.estimator.fuse_qkv()
        self._noise = noise.to(self.device)                                        # [1, 80, frames] float32
        cfm = flow.decoder
        t_sched, dt_sched = cfm.t_schedule(cfm.cfg.n_timesteps, self.device, torch.float32)
        self.n_steps = cfm.cfg.n_timesteps
        self._t = t_sched                                                          # [steps] float32
        self._dt = dt_sched
        self._guided = 1.0 + cfm.cfg.inference_cfg_rate
        self._unguided = cfm.cfg.inference_cfg_rate
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

    def _uses_cache(self, seqs: list[Sequence]) -> bool:
        return self.cache.enabled and any(s.cached_pages or s.write_pages for s in seqs)

    # --- encoder ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, seqs: list[Sequence]) -> None:
        """Each row's window through the encoder: sets mu, cond, spks and the starting noise x."""
        dev, bt, bf, halo, la = self.device, self.block_tokens, self.block_frames, self.halo_tokens, self.lookahead
        starts = [s.cached_blocks * bt for s in seqs]
        n_tokens = [s.plan.t_enc - start for s, start in zip(seqs, starts)]
        window_blocks = _blocks(max(n_tokens), bt)
        n_tok = window_blocks * bt
        b = len(seqs)
        ids = torch.zeros(b, halo + n_tok + la, dtype=torch.long)
        valid = torch.zeros(b, halo + n_tok + la, 1, dtype=self.dtype)
        for row, (s, start) in enumerate(zip(seqs, starts)):
            first = max(0, start - halo)
            end = min(s.plan.ids.numel(), s.plan.t_enc + la)
            at = halo - (start - first)
            ids[row, at:at + end - first] = s.plan.ids[first:end]
            valid[row, at:at + end - first] = 1
        cached = torch.tensor([s.cached_blocks for s in seqs])
        streaming = torch.tensor([s.plan.streaming for s in seqs])
        n_tok_t = torch.tensor(n_tokens)
        pages = _Pages.of(seqs, window_blocks, self.cache.pool.trash_page if self.cache.enabled else 0, dev)
        cache = _EncoderCache(self.cache.pool, self.cache.layout, pages) if self._uses_cache(seqs) else _NoCache()
        past_blocks = pages.read.size(1)
        window = EncoderWindow(
            cache=cache, embed_valid=valid.to(dev), halo=(cached > 0).to(self.dtype).view(b, 1, 1).to(dev),
            token_mask=key_mask(cached, past_blocks, n_tok_t, n_tok, bt, streaming).to(dev),
            frame_mask=key_mask(cached, past_blocks, n_tok_t * self.ratio, n_tok * self.ratio, bf,
                                streaming).to(dev))
        flow = self.flow
        h = flow.encoder(flow.input_embedding(ids.to(dev)), window=window)
        mu = flow.encoder_proj(h).transpose(1, 2)                                      # [B, 80, frames]
        emb = torch.stack([s.request.embedding.reshape(-1) for s in seqs]).to(dev, self.dtype)
        spks = flow.spk_embed_affine_layer(F.normalize(emb, dim=1))
        for row, s in enumerate(seqs):
            w0, wn = s.window_start(bf), s.window_frames(bf)
            s.mu = mu[row, :, :wn]
            s.spks = spks[row]
            cond = torch.zeros(MEL_BINS, wn, dtype=self.dtype)
            prompt = s.request.prompt_feat[0, w0:min(s.plan.prompt_frames, w0 + wn)]
            cond[:, :prompt.size(0)] = prompt.t().to(self.dtype)
            s.cond = cond.to(dev, non_blocking=True)
            s.x = self._noise[0, :, w0:w0 + wn]
            s.step = 0

    # --- one Euler step -------------------------------------------------------------------------------
    def _step_core(self, x_state: torch.Tensor, mu: torch.Tensor, cond: torch.Tensor, spks: torch.Tensor,
                   frames: torch.Tensor, cached: torch.Tensor, streaming: torch.Tensor, steps: torch.Tensor,
                   read: torch.Tensor, last: torch.Tensor, write: torch.Tensor) -> tuple[torch.Tensor]:
        """One Euler step with CFG on [B] rows padded to a window of whole blocks, all on the device (static shapes:
        what a CUDA graph captures). x_state [B, 80, N] float32; mu, cond [B, 80, N]; spks [B, 80]; frames, cached,
        steps [B] (long), streaming [B] (bool); read [B, past blocks], last [B], write [B, window blocks] pages.
        Returns x_state + dt ((1 + r) v_cond - r v_uncond), each row at its own step."""
        dev, bf = x_state.device, self.block_frames
        b, _, n = x_state.shape
        x = x_state.to(self.dtype).repeat(2, 1, 1)
        zeros = torch.zeros_like(mu)
        if self.cache.enabled:
            cache = _EstimatorCache(self.cache.pool, self.cache.layout, _Pages(read, last, write, True), steps)
        else:
            cache = _NoCache()
        frame_mask = (torch.arange(n, device=dev)[None, :] < frames[:, None]).to(self.dtype).unsqueeze(1)
        allowed = key_mask(cached, read.size(1), frames, n, bf, streaming)
        # additive (0 / -inf) in the compute dtype, built once per step: SDPA would otherwise convert a boolean
        # mask in each attention layer
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        v = self.flow.decoder.estimator(x, frame_mask.repeat(2, 1, 1), torch.cat([mu, zeros]), self._t[steps].repeat(2),
                                        torch.cat([spks, torch.zeros_like(spks)]), torch.cat([cond, zeros]),
                                        attn_mask=bias.repeat(2, 1, 1, 1), cache=cache).float()
        return (x_state + self._dt[steps].view(b, 1, 1) * (self._guided * v[:b] - self._unguided * v[b:]),)

    def _step_inputs(self, bb: int, window_blocks: int, past_blocks: int) -> tuple[torch.Tensor, ...]:
        """Zeroed inputs of `_step_core` for bb rows; a padding row is one valid frame reading and keeping nothing."""
        dev, n = self.device, window_blocks * self.block_frames
        trash = self.cache.pool.trash_page if self.cache.enabled else NULL_PAGE
        long = dict(dtype=torch.long, device=dev)
        return (torch.zeros(bb, MEL_BINS, n, dtype=torch.float32, device=dev),
                torch.zeros(bb, MEL_BINS, n, dtype=self.dtype, device=dev),
                torch.zeros(bb, MEL_BINS, n, dtype=self.dtype, device=dev),
                torch.zeros(bb, MEL_BINS, dtype=self.dtype, device=dev),
                torch.ones(bb, **long), torch.zeros(bb, **long), torch.zeros(bb, dtype=torch.bool, device=dev),
                torch.zeros(bb, **long), torch.full((bb, past_blocks), NULL_PAGE, **long),
                torch.full((bb,), NULL_PAGE, **long), torch.full((bb, window_blocks), trash, **long))

    def step_graph_key(self, b: int, window_blocks: int, past_blocks: int) -> tuple[int, int, int] | None:
        """The graph bucket a step of this size runs in, or None (eager: past the buckets)."""
        windows = STREAM_WINDOW_BLOCK_BUCKETS if past_blocks else WINDOW_BLOCK_BUCKETS
        if window_blocks > windows[-1] or past_blocks > PAST_BLOCK_BUCKETS[-1] or b > self.max_batch:
            return None
        key = (batch_bucket(b, self.max_batch), bucket(window_blocks, windows),
               bucket(past_blocks, PAST_BLOCK_BUCKETS) if past_blocks else 0)
        return key if self._fits(*key) else None

    def _fits(self, b: int, w: int, p: int) -> bool:
        return b * (w + p) * self.block_frames <= MAX_GRAPH_STEP_ROW_FRAMES

    def step_graph_keys(self) -> list[tuple[int, int, int]]:
        batches = sorted({batch_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})
        pasts = PAST_BLOCK_BUCKETS if self.cache.enabled else ()
        keys = [(b, w, 0) for b in batches for w in WINDOW_BLOCK_BUCKETS]
        keys += [(b, w, p) for b in batches for w in STREAM_WINDOW_BLOCK_BUCKETS for p in pasts]
        return [k for k in keys if self._fits(*k)]

    def capture_step_graphs(self) -> int:
        """Capture every Euler-step graph bucket now, largest first (the pool is sized by the first capture)."""
        if not self.use_cuda_graphs:
            return 0
        for key in sorted(set(self.step_graph_keys()), key=lambda k: -k[0] * (k[1] + k[2])):
            self._step_graphs.get(key, self._step_core, lambda key=key: self._step_inputs(*key))
        torch.cuda.synchronize(self.device)
        return len(self._step_graphs)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> None:
        """One Euler step with CFG for every row, each at its own step (`_step_core`); through the step's CUDA
        graph when one was captured for its bucket."""
        bf = self.block_frames
        b = len(seqs)
        n_frames = [s.window_frames(bf) for s in seqs]
        window_blocks = _blocks(max(n_frames), bf)
        past_blocks = max(s.cached_blocks for s in seqs)
        key = self.step_graph_key(b, window_blocks, past_blocks) if self.pad_to_buckets else None
        graph = self._step_graphs.lookup(key) if key is not None and self.use_cuda_graphs else None
        if graph is not None:
            inputs = graph.inputs
            _zero_step_inputs(inputs, self.cache.pool.trash_page if self.cache.enabled else NULL_PAGE)
        else:   # eager, padded to the bucket when bucketing (what the graph would get) or to this batch
            inputs = self._step_inputs(*(key or (b, window_blocks, past_blocks)))
        x_state, mu, cond, spks, frames, cached, streaming, steps, read, last, write = inputs
        host = torch.tensor([[nf, s.cached_blocks, s.plan.streaming, s.step] for s, nf in zip(seqs, n_frames)])
        for t, col in zip((frames, cached, streaming, steps), host.t().to(self.device, non_blocking=True)):
            t[:b] = col
        pages = _Pages.of(seqs, write.size(1), self.cache.pool.trash_page if self.cache.enabled else NULL_PAGE,
                          self.device, past_blocks=read.size(1))
        read[:b], last[:b], write[:b] = pages.read, pages.last, pages.write
        for row, (s, nf) in enumerate(zip(seqs, n_frames)):
            x_state[row, :, :nf] = s.x
            mu[row, :, :nf] = s.mu
            cond[row, :, :nf] = s.cond
            spks[row] = s.spks
        (x_new,) = graph.replay() if graph is not None else self._step_core(*inputs)
        for row, (s, nf) in enumerate(zip(seqs, n_frames)):
            s.x = x_new[row, :, :nf].clone() if graph is not None else x_new[row, :, :nf]
            s.step += 1

    # --- HiFT and chunk joining ---------------------------------------------------------------------
    def new_mel(self, s: Sequence) -> torch.Tensor:
        """[80, new_frames] float32: this chunk's flow mel, from the cached blocks' pages and the window."""
        bf, start = self.block_frames, s.plan.start_frame
        w0 = s.window_start(bf)
        parts = []
        if start < w0:
            first = start // bf
            cached = self.cache.pool.mel[torch.tensor(s.cached_pages[first:], device=self.device)]
            parts.append(cached.permute(1, 0, 2).reshape(MEL_BINS, -1)[:, start - first * bf:])
        if s.x is not None:
            parts.append(s.x[:, max(0, start - w0):])
        if not parts:
            return torch.zeros(MEL_BINS, 0, device=self.device)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def store_block_mels(self, seqs: list[Sequence]) -> None:
        """Each finished row's complete window blocks' mel into their pages (before they become valid)."""
        if not self.cache.enabled:
            return
        bf = self.block_frames
        for s in seqs:
            if s.write_pages:
                n = len(s.write_pages)
                blocks = s.x[:, :n * bf].view(MEL_BINS, n, bf).permute(1, 0, 2)
                self.cache.pool.mel[torch.tensor(s.write_pages, device=self.device)] = blocks

    def _draw(self, seqs: list[Sequence], bb: int, mk: int, rand_ini: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's own source draws (Token2Wav's order and shapes) into [bb, H] / [bb, mk*spf, H] rows."""
        spf = self.hift.cfg.samples_per_frame
        n_h = self.hift.cfg.n_harmonic_channels
        if rand_ini is None:
            rand_ini = torch.zeros(bb, n_h, device=self.device, dtype=self.hift_dtype)
            noise = torch.zeros(bb, mk * spf, n_h, device=self.device, dtype=self.hift_dtype)
        for row, s in enumerate(seqs):
            r = s.request
            gen = r.generator
            if gen is None and r.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(int(r.seed))
            dev = gen.device if gen is not None else self.device
            draws = self.hift.m_source.draw(1, s.plan.mel_frames * spf, dev, gen)
            rand_ini[row].copy_(draws.rand_ini[0], non_blocking=True)
            rand_ini[row, 0] = 0
            noise[row, :s.plan.mel_frames * spf].copy_(draws.noise_randn[0], non_blocking=True)
        return rand_ini, noise

    def _hift_inputs(self, bb: int, mk: int) -> tuple[torch.Tensor, ...]:
        dev, k = self.device, self.config.source_cache_samples
        spf, n_h = self.hift.cfg.samples_per_frame, self.hift.cfg.n_harmonic_channels
        return (torch.zeros(bb, MEL_BINS, mk, dtype=self.hift_dtype, device=dev),
                torch.ones(bb, 1, dtype=torch.long, device=dev),
                torch.zeros(bb, k, dtype=torch.float32, device=dev),
                torch.zeros(bb, 1, dtype=torch.long, device=dev),
                torch.zeros(bb, k, dtype=torch.float32, device=dev),
                torch.zeros(bb, n_h, dtype=self.hift_dtype, device=dev),
                torch.zeros(bb, mk * spf, n_h, dtype=self.hift_dtype, device=dev))

    def _hift_joined(self, mel: torch.Tensor, frames: torch.Tensor, cache_source: torch.Tensor,
                     cache_samples: torch.Tensor, cache_speech: torch.Tensor, rand_ini: torch.Tensor,
                     noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HiFT, then the head cross-faded with the previous chunk's withheld tail (float64, as Token2Wav)."""
        speech, source = self.hift.forward_padded(mel, frames, cache_source, cache_samples, rand_ini, noise)
        k = cache_speech.size(1)
        head = (speech[:, :k].double() * self._fade_in + cache_speech.double() * self._fade_out).float()
        speech = torch.cat([torch.where(cache_samples > 0, head, speech[:, :k]), speech[:, k:]], dim=1)
        return speech, source

    def hift_graph_keys(self) -> list[tuple[int, int]]:
        batches = sorted({batch_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})
        return [(b, m) for b in batches for m in MEL_FRAME_BUCKETS if b * m <= MAX_GRAPH_MEL_ROWS]

    def capture_hift_graphs(self) -> int:
        """Capture every HiFT graph bucket now, largest first (the pool is sized by the first capture)."""
        if not self.use_cuda_graphs:
            return 0
        for bb, mk in sorted(self.hift_graph_keys(), key=lambda key: -key[0] * key[1]):
            self._hift_graphs.get((bb, mk), self._hift_joined, lambda: self._hift_inputs(bb, mk))
        torch.cuda.synchronize(self.device)
        return len(self._hift_graphs)

    @torch.inference_mode()
    def vocode(self, seqs: list[Sequence], keep_mel: bool, output_device: torch.device) -> list[ChunkResult]:
        """HiFT for finished rows (not prefills) in one padded batch; results on `output_device`."""
        cfg, dev = self.config, self.device
        mels, news = [], []
        for s in seqs:
            new = self.new_mel(s)
            news.append(new)
            if s.plan.speed != SPEED_NEUTRAL:
                mel = F.interpolate(new[None], size=s.plan.mel_frames, mode="linear")[0]
            elif s.request.cache is not None:
                mel = torch.cat([s.request.cache.mel[0].to(dev, torch.float32), new], dim=1)
            else:
                mel = new
            mels.append(mel)
        b = len(seqs)
        mk = max(cfg.mel_cache_frames, max(s.plan.mel_frames for s in seqs))
        bb = b
        if self.pad_to_buckets:
            bb, mk = batch_bucket(b, self.max_batch), bucket(mk, MEL_FRAME_BUCKETS)
        graph = self._hift_graphs.lookup((bb, mk)) if self.use_cuda_graphs else None
        inputs = graph.inputs if graph is not None else self._hift_inputs(bb, mk)
        mel_in, frames, cache_source, cache_samples, cache_speech, rand_ini, noise = inputs
        if graph is not None:
            for t in inputs:
                t.zero_()
            frames.fill_(1)
        for row, (s, mel) in enumerate(zip(seqs, mels)):
            mel_in[row, :, :mel.size(1)] = mel.to(self.hift_dtype)
            frames[row, 0] = s.plan.mel_frames
            if s.request.cache is not None:
                c = s.request.cache
                cache_source[row] = c.source.reshape(-1).to(dev, torch.float32)
                cache_speech[row] = c.speech.reshape(-1).to(dev, torch.float32)
                cache_samples[row, 0] = cfg.source_cache_samples
        self._draw(seqs, bb, mk, rand_ini, noise)
        if graph is not None:
            speech, source = graph.replay()
        else:
            speech, source = self._hift_joined(*inputs)
        return self._collect(seqs, news, mel_in, speech, source, keep_mel, output_device)

    def _collect(self, seqs: list[Sequence], news: list[torch.Tensor], mel_in: torch.Tensor, speech: torch.Tensor,
                 source: torch.Tensor, keep_mel: bool, output_device: torch.device) -> list[ChunkResult]:
        """Slice each row back; one packed copy to output_device."""
        spf, k, c = self.config.samples_per_frame, self.config.source_cache_samples, self.config.mel_cache_frames
        pieces: list[torch.Tensor] = []
        layout: list[list[tuple[int, ...]]] = []
        for row, (s, new) in enumerate(zip(seqs, news)):
            p = s.plan
            n = p.mel_frames * spf
            wav = speech[row, :n] if p.finalize else speech[row, :n - k]
            pieces.append(wav)
            shapes = [(1, wav.numel())]
            if not p.finalize:
                pieces += [mel_in[row, :, p.mel_frames - c:p.mel_frames].float().reshape(-1),
                           source[row, n - k:n], speech[row, n - k:n]]
                shapes += [(1, MEL_BINS, c), (1, 1, k), (1, k)]
            if keep_mel:
                pieces.append(new.reshape(-1))
                shapes.append((1, MEL_BINS, new.size(1)))
            layout.append(shapes)
        flat = torch.cat(pieces).to(output_device)
        results, pos = [], 0
        for s, shapes in zip(seqs, layout):
            parts = []
            for shape in shapes:
                size = math.prod(shape)
                parts.append(flat[pos:pos + size].view(shape).clone())
                pos += size
            wav = parts.pop(0)
            cache = None if s.plan.finalize else VocoderCache(mel=parts.pop(0), source=parts.pop(0),
                                                              speech=parts.pop(0))
            results.append(ChunkResult(waveform=wav, cache=cache, mel=parts.pop(0) if keep_mel else None))
        return results
