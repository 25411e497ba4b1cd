"""The state cache: what streaming calls keep of the flow, per block of the chunk grid, in a fixed page pool.

A block is `block_tokens` tokens = `block_frames` mel frames of the grid the chunk masks use, counted from the
prompt's first frame. In a streaming call, a block whose tokens and look-ahead are all present is computed the
same in every later call (`flow/window.py`), so its page keeps what later frames read of it:

- the encoder: each attention layer's keys and values, and the last tokens the up-sampler reads;
- the estimator, per Euler step and CFG branch: each attention layer's keys and values, and each causal
  convolution's last input frames;
- the block's final mel (a later chunk may emit frames of it).

Pages are content-addressed, as vLLM's prefix cache: a block's key hashes everything its values depend on (the
speaker embedding, every token up to its end plus the look-ahead, and the prompt mel inside it) chained over the
blocks before it. So a stream's next call finds its earlier blocks, a registered voice's prompt blocks serve
every request with that voice, and two requests can never read each other's state unless they are the same
computation. A page is pending while the call that writes it runs and valid once it is done (a call may read a
pending page only one Euler step behind its writer: `scheduler`); a valid page no call reads sits in an LRU list
and is evicted when a new page is needed. Page 0 is all zeros (the left padding
of a batch, and "nothing before the first block"); the last page takes the writes of blocks not kept.
"""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .flow import CausalMaskedDiffWithXvec

_HASH_BYTES = 16
NULL_PAGE = 0


@dataclass(frozen=True, slots=True)
class PageLayout:
    """Sizes of one page (one block of the chunk grid) for a flow model and compute dtype."""
    block_tokens: int
    block_frames: int
    lookahead_tokens: int
    n_steps: int
    est_layers: int
    est_heads: int
    est_head_dim: int
    est_convs: int
    est_conv_channels: int         # the widest causal convolution input (narrower ones use a prefix)
    conv_context_frames: int       # frames of left context each causal convolution reads
    enc_token_layers: int
    enc_frame_layers: int
    enc_heads: int
    enc_head_dim: int
    enc_dims: int
    enc_context_tokens: int        # tokens before a window the up-sampler reads
    mel_bins: int
    dtype: torch.dtype

    @classmethod
    def of(cls, flow: CausalMaskedDiffWithXvec, dtype: torch.dtype) -> "PageLayout | None":
        """None when the encoder's and the estimator's chunk grids differ (no block is then final)."""
        enc, est = flow.encoder, flow.decoder.estimator
        block_tokens = enc.cfg.static_chunk_size_tokens
        if enc.cfg.up_static_chunk_size_frames != est.cfg.static_chunk_size_frames:
            return None
        convs = est.causal_convs
        return cls(block_tokens=block_tokens, block_frames=est.cfg.static_chunk_size_frames,
                   lookahead_tokens=flow.cfg.pre_lookahead_len_tokens, n_steps=flow.decoder.cfg.n_timesteps,
                   est_layers=len(est.attention_layers), est_heads=est.cfg.num_heads,
                   est_head_dim=est.cfg.attention_head_dim, est_convs=len(convs),
                   est_conv_channels=max(c.in_channels for c in convs),
                   conv_context_frames=max(c.causal_padding for c in convs),
                   enc_token_layers=len(enc.encoders), enc_frame_layers=len(enc.up_encoders),
                   enc_heads=enc.cfg.attention_heads, enc_head_dim=enc.cfg.head_dim, enc_dims=enc.cfg.output_size_dims,
                   enc_context_tokens=enc.up_layer.context_tokens, mel_bins=flow.cfg.mel_bins, dtype=dtype)

    @property
    def page_bytes(self) -> int:
        item = torch.empty(0, dtype=self.dtype).element_size()
        est_kv = self.est_layers * self.n_steps * 2 * 2 * self.est_heads * self.est_head_dim * self.block_frames
        est_tail = self.est_convs * self.n_steps * 2 * self.est_conv_channels * self.conv_context_frames
        enc_kv = 2 * self.enc_heads * self.enc_head_dim * (self.enc_token_layers * self.block_tokens
                                                           + self.enc_frame_layers * self.block_frames)
        enc_tail = self.enc_dims * self.enc_context_tokens
        return (est_kv + est_tail + enc_kv + enc_tail) * item + self.mel_bins * self.block_frames * 4


class PagePool:
    """The page tensors (device memory, allocated once). Index 0 is the zero page; index n_pages + 1 the trash
    page that absorbs the writes of blocks not kept (so a batch writes every window block, static shapes)."""

    def __init__(self, layout: PageLayout, n_pages: int, device: torch.device) -> None:
        lo, total = layout, n_pages + 2
        # Uninitialised but for the zero page: a page is written whole (every layer, step and branch of its block)
        # before it becomes valid, and nothing reads the trash page; zero-filling the budget would cost seconds.
        z = lambda *shape, dtype=lo.dtype: torch.empty(total, *shape, dtype=dtype, device=device)  # noqa: E731
        # [page, layer, step, k|v, cfg branch, head, frame, dim]
        self.est_kv = z(lo.est_layers, lo.n_steps, 2, 2, lo.est_heads, lo.block_frames, lo.est_head_dim)
        # [page, conv, step, cfg branch, channel, frame]: the block's last input frames of each causal conv
        self.est_tail = z(lo.est_convs, lo.n_steps, 2, lo.est_conv_channels, lo.conv_context_frames)
        # [page, layer, k|v, head, token, dim] and [page, layer, k|v, head, frame, dim]
        self.enc_token_kv = z(lo.enc_token_layers, 2, lo.enc_heads, lo.block_tokens, lo.enc_head_dim)
        self.enc_frame_kv = z(lo.enc_frame_layers, 2, lo.enc_heads, lo.block_frames, lo.enc_head_dim)
        # [page, channel, token]: the block's last first-stack outputs (the up-sampler's left context)
        self.enc_tail = z(lo.enc_dims, lo.enc_context_tokens)
        self.mel = z(lo.mel_bins, lo.block_frames, dtype=torch.float32)
        self.trash_page = total - 1
        for store in (self.est_kv, self.est_tail, self.enc_token_kv, self.enc_frame_kv, self.enc_tail, self.mel):
            store[NULL_PAGE].zero_()


def block_hashes(ids: torch.Tensor, n_blocks: int, embedding: torch.Tensor, prompt_feat: torch.Tensor,
                 layout: PageLayout) -> list[bytes]:
    """Content keys of blocks [0, n_blocks): block k's key hashes the previous key, its tokens and look-ahead
    tokens, and the prompt mel frames inside it; block 0's previous key is the speaker embedding's."""
    if n_blocks <= 0:
        return []
    tokens = ids.numpy().astype(np.int64, copy=False)
    feat = np.ascontiguousarray(prompt_feat.detach().reshape(-1, layout.mel_bins).to("cpu", torch.float32).numpy())
    prev = hashlib.blake2b(np.ascontiguousarray(embedding.detach().reshape(-1).to("cpu", torch.float32).numpy())
                           .tobytes(), digest_size=_HASH_BYTES).digest()
    keys = []
    bt, bf = layout.block_tokens, layout.block_frames
    for k in range(n_blocks):
        h = hashlib.blake2b(prev, digest_size=_HASH_BYTES)
        h.update(tokens[k * bt:(k + 1) * bt + layout.lookahead_tokens].tobytes())
        cond = feat[k * bf:(k + 1) * bf]
        h.update(len(cond).to_bytes(4, "little"))
        h.update(cond.tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


class StateCache:
    """Pages of blocks: lookup by content key, reference counts while calls read or write them, LRU eviction."""

    def __init__(self, layout: PageLayout | None, budget_bytes: int, device: torch.device) -> None:
        self.layout = layout
        self.page_bytes = layout.page_bytes if layout is not None else 0
        self.n_pages = budget_bytes // self.page_bytes if layout is not None and budget_bytes > 0 else 0
        self.pool = PagePool(layout, self.n_pages, device) if self.n_pages > 0 else None
        self._valid: dict[bytes, int] = {}         # key -> page, computed
        self._pending: dict[bytes, int] = {}       # key -> page, being computed by a running call
        self._key_of: dict[int, bytes] = {}
        self._owner: dict[int, object] = {}        # pending page -> the call writing it
        self._refs = [0] * (self.n_pages + 2)
        self._free = list(range(self.n_pages, 0, -1))   # pages 1..n_pages; pop() gives the lowest
        self._lru: OrderedDict[int, None] = OrderedDict()   # valid pages no call holds, oldest first
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.pool is not None

    @property
    def bytes_held(self) -> int:
        """Device bytes of the pages that hold a block (valid or being written)."""
        return (len(self._valid) + len(self._pending)) * self.page_bytes

    def match(self, keys: list[bytes]) -> tuple[list[int], list[object]]:
        """The pages of the longest prefix of `keys` that is valid or being computed, and the writers (the `owner`s
        given to `allocate`) of those being computed, in order of appearance without repeats."""
        pages: list[int] = []
        writers: list[object] = []
        for key in keys:
            page = self._valid.get(key)
            if page is None:
                page = self._pending.get(key)
                if page is None:
                    break
                owner = self._owner[page]
                if all(owner is not w for w in writers):
                    writers.append(owner)
            pages.append(page)
        return pages, writers

    def acquire(self, pages: list[int]) -> None:
        for page in pages:
            self._refs[page] += 1
            self._lru.pop(page, None)

    def allocate(self, keys: list[bytes], owner: object) -> list[int]:
        """Pages for blocks `keys` (in order), pending until `commit`, written by `owner`; fewer when the pool is
        held by running calls (the blocks after the last page given are computed but not kept)."""
        pages = []
        for key in keys:
            if key in self._valid or key in self._pending:
                break   # computed meanwhile (or twice in one call's keys, which hashing rules out): keep order
            if self._free:
                page = self._free.pop()
            elif self._lru:
                page, _ = self._lru.popitem(last=False)
                del self._valid[self._key_of.pop(page)]
                self.evictions += 1
            else:
                break
            self._refs[page] = 1
            self._pending[key] = page
            self._key_of[page] = key
            self._owner[page] = owner
            pages.append(page)
        return pages

    def commit(self, read: list[int], written: list[int]) -> None:
        """A call is done: its written pages become valid; it no longer holds what it read or wrote."""
        for page in written:
            key = self._key_of[page]
            del self._pending[key]
            del self._owner[page]
            self._valid[key] = page
        self._release([*read, *written])

    def abort(self, read: list[int], written: list[int]) -> None:
        """A call failed: its written pages are freed unseen (calls reading them were aborted first)."""
        for page in written:
            del self._pending[self._key_of.pop(page)]
            del self._owner[page]
            self._refs[page] = 0
            self._free.append(page)
        self._release(read)

    def _release(self, pages: list[int]) -> None:
        # Later blocks are released first, so they are evicted first: a prefix (a voice's prompt) outlives tails.
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] == 0 and page in self._key_of:
                self._lru[page] = None

    def check(self) -> None:
        """Invariants (tests): every page is free, pending, or valid; refs match."""
        valid, pending = set(self._valid.values()), set(self._pending.values())
        assert not valid & pending and not (valid | pending) & set(self._free)
        assert len(valid) + len(pending) + len(self._free) == self.n_pages
        assert set(self._lru) <= valid and all(self._refs[p] == 0 for p in self._lru)
        assert all(self._refs[p] > 0 for p in pending)


def pages_for_budget(layout: PageLayout | None, budget_gib: float) -> int:
    """How many pages a budget in GiB buys (for logs and docs)."""
    if layout is None or budget_gib <= 0:
        return 0
    return math.floor(budget_gib * (1 << 30) / layout.page_bytes)
