"""Repetition-aware sampling (spec 4.5, reference HEAD), single-request and batched.

`ras_sample` mirrors the reference call for one request: nucleus (top-p, then top-k) over a stable descending sort,
one `torch.multinomial` over the kept, unnormalised probabilities, and - when the drawn token already occurs
`ceil(win_size * tau_r)` times among the last `win_size` generated tokens - a second draw from the full
distribution with that token removed. With an explicit `torch.Generator` seeded like the reference's global RNG it
reproduces the reference's draws.

`sample_batched` is the same rule for a batch of rows with per-row parameters, written without host syncs or
data-dependent branches so it can run inside a captured decode step. Its randomness is a counter-based hash of
(request seed, step, token id): a request's draws do not depend on which other requests share the batch, and no
generator state has to be registered with a CUDA graph. Draws use the exponential race (argmax of p / Exp(1)),
which samples proportionally to unnormalised p. It does not reproduce torch.multinomial's stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from cosyvoice_common.constants import SPEECH_EOS, SPEECH_STOP_IDS

# Defaults of the reference yaml (`ras_sampling` in cosyvoice2.yaml).
DEFAULT_TOP_P = 0.8
DEFAULT_TOP_K = 25
DEFAULT_WIN_SIZE = 10
DEFAULT_TAU_R = 0.1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    win_size: int = DEFAULT_WIN_SIZE
    tau_r: float = DEFAULT_TAU_R
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.win_size < 1:
            raise ValueError(f"win_size must be >= 1, got {self.win_size}")
        if self.tau_r < 0.0:
            raise ValueError(f"tau_r must be >= 0, got {self.tau_r}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def min_repeats(self) -> int:
        """Repeats in the window that trigger the fallback. Computed in Python double like the reference
        (`rep_num >= win_size * tau_r`; 10 * 0.1 == 1.0 exactly there, but not in fp32)."""
        return math.ceil(self.win_size * self.tau_r)

    @classmethod
    def greedy(cls) -> "SamplingParams":
        """top_k=1 and an unreachable repetition fallback: always the argmax (lowest id on ties)."""
        return cls(top_p=DEFAULT_TOP_P, top_k=1, win_size=DEFAULT_WIN_SIZE, tau_r=1.1)


def mask_eos(logp: torch.Tensor, block: torch.Tensor | bool) -> torch.Tensor:
    """Sets logp[..., eos] = -inf where `block` (scalar or [B] bool) holds; only eos is blocked (spec 4.4).
    No host-to-device copy when `block` is already a device tensor, so it can run inside a captured step."""
    out = logp.clone()
    out[..., SPEECH_EOS] = logp[..., SPEECH_EOS].masked_fill(torch.as_tensor(block, device=logp.device),
                                                             float("-inf"))
    return out


def is_stop(token: int) -> bool:
    return token in SPEECH_STOP_IDS


# --- single request (reference semantics, torch.Generator) ------------------------------------------------------

def nucleus_sample(scores: torch.Tensor, top_p: float, top_k: int, generator: torch.Generator | None) -> int:
    """scores [V] (log-probs) -> one id drawn from the top-p-then-top-k nucleus."""
    probs_sorted, ids_sorted = scores.softmax(dim=0).sort(descending=True, stable=True)
    head = min(top_k, probs_sorted.shape[0])
    head_probs = probs_sorted[:head].detach().cpu().numpy()
    # Accumulate in fp32, one add at a time, testing before adding (the crossing token is kept), like the reference.
    acc = np.float32(0.0)
    kept = 0
    for p in head_probs:
        if acc < top_p:
            acc = np.float32(acc + p)
            kept += 1
        else:
            break
    pick = torch.multinomial(probs_sorted[:kept], 1, replacement=True, generator=generator)
    return int(ids_sorted[pick].item())


def ras_sample(logp: torch.Tensor, history: Sequence[int], params: SamplingParams,
               generator: torch.Generator | None = None) -> int:
    """logp [V] fp32 (eos already masked if needed), history = generated tokens so far -> next id."""
    scores = logp if params.temperature == 1.0 else logp / params.temperature
    tok = nucleus_sample(scores, params.top_p, params.top_k, generator)
    window = history[-params.win_size:]
    if sum(1 for t in window if t == tok) >= params.min_repeats:
        scores = scores.clone()
        scores[tok] = float("-inf")
        tok = int(torch.multinomial(scores.softmax(dim=0), 1, replacement=True, generator=generator).item())
    return tok


# --- batched (no host sync, counter-based randomness) ------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_LOW16 = 0xFFFF
_COLUMN_SALT = 0x9E3779B9   # golden-ratio constant: decorrelates column ids from small seeds/steps
_UNIFORM_BITS = 24          # fp32 holds 24-bit integers exactly, so u = (k + 0.5) / 2^24 is never 0 or 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x < 2^32, split in 16-bit halves so no int64 product overflows."""
    lo = x * (c & _LOW16)
    hi = ((x * (c >> 16)) & _LOW16) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 over int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


_COLUMN_KEYS: dict[tuple[int, str], torch.Tensor] = {}


def precompute_noise_tables(vocab_size: int, device: torch.device | str) -> None:
    """Builds the column hash outside any CUDA-graph capture or torch.compile trace (the engine calls it)."""
    _column_keys(vocab_size, torch.device(device))


def _column_keys(vocab_size: int, device: torch.device) -> torch.Tensor:
    """The per-column hash (a constant of the vocabulary), built once per (vocab size, device): not per step."""
    key = (vocab_size, str(device))
    cols = _COLUMN_KEYS.get(key)
    if cols is None:
        cols = _mix32((torch.arange(vocab_size, device=device, dtype=torch.int64) + _COLUMN_SALT) & _MASK32)
        _COLUMN_KEYS[key] = cols
    return cols


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """Hash of the 64-bit seed per row [B]: a constant of the request (the engine computes it once, at prefill)."""
    key = _mix32(seeds & _MASK32)
    return _mix32(key ^ ((seeds >> 32) & _MASK32))


def _step_keys(seeds: torch.Tensor, steps: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Hash of (seed, step) per row [B]; shared by both noise streams of a draw. `keys`: seed_keys(seeds)."""
    return _mix32((seed_keys(seeds) if keys is None else keys) ^ (steps & _MASK32))


def _exp_noise(stream_keys: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise from per-row stream keys [B] and column hashes ([V] or [B, K])."""
    bits = _mix32(stream_keys[:, None] ^ cols) >> (32 - _UNIFORM_BITS)
    u = (bits.float() + 0.5) * (1.0 / (1 << _UNIFORM_BITS))
    return -torch.log(u)


def _noise_from_keys(step_keys: torch.Tensor, stream: int, vocab_size: int) -> torch.Tensor:
    return _exp_noise(_mix32(step_keys ^ stream), _column_keys(vocab_size, step_keys.device)[None, :])


def exponential_noise(seeds: torch.Tensor, steps: torch.Tensor, stream: int, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [B, V] as a pure function of (seed, step, stream, column); seeds/steps int64 [B]."""
    return _noise_from_keys(_step_keys(seeds, steps), stream, vocab_size)


@dataclass(frozen=True, slots=True)
class BatchSamplingParams:
    """Per-row sampling parameters as device tensors [B] (rows of the engine's slot table)."""

    top_p: torch.Tensor        # fp32
    top_k: torch.Tensor        # int64
    temperature: torch.Tensor  # fp32
    win_size: torch.Tensor     # int64, <= history width
    min_repeats: torch.Tensor  # int64, SamplingParams.min_repeats
    seeds: torch.Tensor        # int64
    seed_keys: torch.Tensor | None = None   # seed_keys(seeds), when the caller keeps it (saves two hashes a step)

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], seeds: Sequence[int],
                    device: torch.device | str | None = None) -> "BatchSamplingParams":
        if len(params) != len(seeds):
            raise ValueError(f"{len(params)} sampling params but {len(seeds)} seeds")
        return cls(
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            win_size=torch.tensor([p.win_size for p in params], dtype=torch.int64, device=device),
            min_repeats=torch.tensor([p.min_repeats for p in params], dtype=torch.int64, device=device),
            seeds=torch.tensor(list(seeds), dtype=torch.int64, device=device),
        )


def _race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return torch.argmax(probs / noise, dim=-1)


_ID_BITS = 13   # room for the column id in a sort key: speech heads of up to 8192 ids


def _nucleus_candidates(probs: torch.Tensor, top_k_cap: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, ids) [B, K] in the order of a stable descending sort (higher p first, lower id first among equal p):
    the whole row (K = V) by a sort, or its first `top_k_cap` entries by one top-k over a key unique per column
    (the fp32 bit pattern, monotonic for p >= 0, then the reversed id), which gives exactly the sort's first K."""
    vocab_size = probs.shape[-1]
    if top_k_cap is None or top_k_cap >= vocab_size:
        return probs.sort(dim=-1, descending=True, stable=True)
    if vocab_size > 1 << _ID_BITS:
        raise ValueError(f"top-k sampling keys hold at most {1 << _ID_BITS} ids, got {vocab_size}")
    reversed_ids = torch.arange(vocab_size - 1, -1, -1, device=probs.device, dtype=torch.int64)
    keys = (probs.view(torch.int32).to(torch.int64) << _ID_BITS) | reversed_ids
    ids = keys.topk(top_k_cap, dim=-1, sorted=True).indices
    return probs.gather(1, ids), ids


def sample_batched(logp: torch.Tensor, history: torch.Tensor, steps: torch.Tensor,
                   p: BatchSamplingParams, top_k_cap: int | None = None) -> torch.Tensor:
    """logp [B, V] fp32 (eos masked as needed); history [B, W] int64, newest last, -1 = empty;
    steps [B] int64 (index of the token being drawn, the noise counter) -> ids [B] int64.

    `top_k_cap` (every row's top_k <= it): the nucleus is looked for among the `top_k_cap` most likely ids only
    (one top-k instead of a full sort, and the race's noise for those columns only); the draws are the same."""
    vocab_size = logp.shape[-1]
    width = history.shape[-1]
    scores = logp / p.temperature[:, None]
    probs_sorted, ids_sorted = _nucleus_candidates(scores.softmax(dim=-1), top_k_cap)
    rank = torch.arange(probs_sorted.shape[-1], device=logp.device)
    mass_before = torch.cumsum(probs_sorted, dim=-1) - probs_sorted   # exclusive prefix: test before adding
    keep = (mass_before < p.top_p[:, None]) & (rank[None, :] < p.top_k[:, None])
    keep[:, 0] = True   # the top token is always kept, as in the reference loop
    step_keys = _step_keys(p.seeds, steps, p.seed_keys)
    # Both streams' row keys in one hash: stream 0 draws the nucleus, stream 1 the repetition fallback.
    stream_keys = _mix32(step_keys[:, None] ^ torch.arange(2, device=logp.device))
    columns = _column_keys(vocab_size, logp.device)
    noise = _exp_noise(stream_keys[:, 0], columns[ids_sorted])
    pick = _race(torch.where(keep, probs_sorted, torch.zeros_like(probs_sorted)), noise)
    tok = ids_sorted.gather(1, pick[:, None])[:, 0]

    col = torch.arange(width, device=logp.device)
    in_window = col[None, :] >= (width - p.win_size)[:, None]
    repeats = ((history == tok[:, None]) & in_window).sum(dim=-1)
    fire = repeats >= p.min_repeats

    fallback_scores = scores.scatter(1, tok[:, None], float("-inf"))
    fallback_noise = _exp_noise(stream_keys[:, 1], columns[None, :])
    tok_fallback = _race(fallback_scores.softmax(dim=-1), fallback_noise)
    return torch.where(fire, tok_fallback, tok)


def push_history(history: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Shift register: drop the oldest column, append `tokens` [B] as newest. Returns a new tensor."""
    return torch.cat((history[:, 1:], tokens[:, None].to(history.dtype)), dim=1)
