"""One token2wav call as the engine sees it: the request, its result, and its state while it runs.

A `ChunkRequest` means exactly what one `Token2Wav.chunk` call means (spec 7.2): the whole token prefix, the
prompt, the offset of the audio it returns and the vocoder overlap cache of the stream's previous chunk; its
`ChunkResult` holds the same waveform and next `VocoderCache`. A `prefill` request carries only a prompt: it
computes the prompt's complete blocks into the engine's state cache and returns no audio.

`plan_sequence` validates a request and derives its sizes on the host; a `Sequence` is that plan plus where it
is in the engine (waiting, running at Euler step k, finished) and what it holds (its window's Euler state, its
pages in the state cache).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from cosyvoice_common.constants import MAX_SPEED, MEL_BINS, MIN_SPEED, SPEAKER_EMBEDDING_DIM, SPEED_NEUTRAL
from cosyvoice_common.errors import InvalidRequestError

from .token2wav import Token2WavConfig, VocoderCache, stretched_frames

_SEED_MASK = (1 << 64) - 1
_SEED_MODULUS = 1 << 63             # torch.Generator.manual_seed takes any int64/uint64; stay positive
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64

# Kinds, in scheduling priority: a prompt prefill and a stream's first chunk are on the path to the first audio.
CHUNK_KINDS = ("prefill", "first", "middle", "final", "offline")
URGENT_KINDS = frozenset({"prefill", "first"})


def chunk_seed(request_seed: int, token_offset: int) -> int:
    """The source-noise seed of one chunk: the request's seed mixed with the chunk's `token_offset` (which
    identifies the chunk within its stream; 0 for an offline call) by splitmix64. Chunks of a stream draw
    different noise; the same request replayed draws the same, on whichever replica serves each chunk."""
    z = (int(request_seed) + (int(token_offset) + 1) * _GOLDEN_GAMMA) & _SEED_MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _SEED_MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _SEED_MASK
    return (z ^ (z >> 31)) % _SEED_MODULUS


# A request that cannot be run (answers only that request; the gateway maps the name to INVALID_ARGUMENT).
ChunkRequestError = InvalidRequestError


@dataclass(slots=True)
class ChunkRequest:
    """One ``Token2Wav.chunk`` call. Tensors may be on any device (CPU expected: what Triton hands over)."""
    tokens: torch.Tensor              # [1, T] speech codes, the whole prefix (may be empty for a prefill)
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
    prefill: bool = False             # compute the prompt's complete blocks into the state cache; no audio

    @property
    def kind(self) -> str:
        """prefill | first | middle | final (chunks of a stream) | offline (one pass): scheduling and metrics."""
        if self.prefill:
            return "prefill"
        if not self.finalize:
            return "first" if self.token_offset == 0 else "middle"
        return "final" if self.token_offset > 0 else "offline"


@dataclass(slots=True)
class ChunkResult:
    waveform: torch.Tensor | None         # [1, N] float32 (empty for a prefill)
    cache: VocoderCache | None            # for the next chunk; None after the final one (or on error)
    error: Exception | None = None
    mel: torch.Tensor | None = None       # [1, 80, F] this chunk's new flow mel (only with keep_mel)


@dataclass(frozen=True, slots=True)
class SequencePlan:
    """Host-side sizes of one request (frames are mel frames, counted from the prompt's first frame)."""
    ids: torch.Tensor          # [n] int64 prompt + target codes (CPU)
    t_enc: int                 # encoder tokens whose frames this call computes (the rest is look-ahead)
    prompt_frames: int
    flow_frames: int           # frames of the call's flow: ratio * t_enc
    start_frame: int           # first frame of this chunk's audio (prompt + ratio * offset)
    cache_frames: int          # 0 or HIFT_MEL_CACHE_FRAMES (the previous chunk's mel before the new)
    mel_frames: int            # HiFT input frames (cache + new; new stretched by speed)
    new_frames: int            # flow frames of this chunk's audio (before any speed stretch)
    streaming: bool            # chunk-masked (block-causal) attention; else full attention
    finalize: bool
    prefill: bool
    speed: float = SPEED_NEUTRAL


def plan_sequence(r: ChunkRequest, lookahead_tokens: int, token_mel_ratio: int, vocab_size: int,
                  config: Token2WavConfig, block_tokens: int) -> SequencePlan:
    """Validate one request and size it; `ChunkRequestError` names what is wrong."""
    if r.tokens.dim() != 2 or r.tokens.size(0) != 1 or r.prompt_tokens.dim() != 2 or r.prompt_tokens.size(0) != 1:
        raise ChunkRequestError("tokens and prompt_tokens must be [1, T]")
    if r.prompt_feat.dim() != 3 or r.prompt_feat.size(0) != 1 or r.prompt_feat.size(2) != MEL_BINS:
        raise ChunkRequestError(f"prompt_feat must be [1, frames, {MEL_BINS}]")
    if r.embedding.numel() != SPEAKER_EMBEDDING_DIM:
        raise ChunkRequestError(f"embedding must have {SPEAKER_EMBEDDING_DIM} values")
    ids = torch.cat([r.prompt_tokens.reshape(-1), r.tokens.reshape(-1)]).to("cpu", torch.int64).clamp(min=0)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise ChunkRequestError(f"speech codes must be < {vocab_size}")
    prompt_frames = r.prompt_feat.size(1)
    if r.prefill:
        if r.tokens.numel() or r.cache is not None or r.token_offset:
            raise ChunkRequestError("a prefill carries only the prompt (no target tokens, offset or cache)")
        # Only blocks whose tokens and look-ahead all lie in the prompt are the same for every target.
        complete = max(0, ids.numel() - lookahead_tokens) // block_tokens * block_tokens
        frames = token_mel_ratio * complete
        if prompt_frames < frames:
            raise ChunkRequestError(f"prompt_feat has {prompt_frames} frames but the prompt tokens give {frames}")
        return SequencePlan(ids, complete, prompt_frames, frames, frames, 0, 0, 0, streaming=True,
                            finalize=False, prefill=True)
    n_target = r.tokens.size(1)
    if r.token_offset < 0 or r.token_offset > n_target:
        raise ChunkRequestError(f"token_offset {r.token_offset} outside [0, {n_target}]")
    if (r.cache is None) != (r.token_offset == 0):
        raise ChunkRequestError("a cache is required exactly for chunks after the first (token_offset > 0)")
    n = ids.numel()
    if r.finalize:
        t_enc = n
    else:
        if n <= lookahead_tokens:
            raise ChunkRequestError(f"a non-final call needs more than {lookahead_tokens} tokens")
        t_enc = n - lookahead_tokens
    if t_enc < 1:
        raise ChunkRequestError("no tokens")
    frames = t_enc * token_mel_ratio
    if prompt_frames > frames:
        raise ChunkRequestError(f"prompt_feat has {prompt_frames} frames but the tokens give only {frames}")
    start = prompt_frames + r.token_offset * config.token_mel_ratio
    new = max(0, frames - start)
    cache_frames = 0 if r.cache is None else config.mel_cache_frames
    if r.cache is not None and (tuple(r.cache.mel.shape) != (1, MEL_BINS, cache_frames)
                                or r.cache.source.numel() != config.source_cache_samples
                                or r.cache.speech.numel() != config.source_cache_samples):
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
    if not r.finalize and mel_frames < config.mel_cache_frames:
        raise ChunkRequestError(f"a non-final chunk needs at least {config.mel_cache_frames} mel frames, "
                                f"got {mel_frames}")
    if mel_frames < 1:
        raise ChunkRequestError("the chunk has no mel frames to vocode")
    return SequencePlan(ids, t_enc, prompt_frames, frames, start, cache_frames, mel_frames, new,
                        streaming=r.streaming, finalize=r.finalize, prefill=False, speed=speed)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"      # encoder done; Euler steps under way
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    """A request inside the engine. The window is the frames it computes: [window_start, flow_frames), starting
    on a block boundary; frames before it come from the state cache's pages (`cached_pages`)."""
    request: ChunkRequest
    plan: SequencePlan
    on_done: object                    # Callable[[ChunkResult], None]
    keep_mel: bool = False
    submitted_s: float = field(default_factory=time.perf_counter)
    admitted_s: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    # state cache (block manager)
    block_hashes: list[bytes] = field(default_factory=list)   # this call's complete blocks, in order
    cached_pages: list[int] = field(default_factory=list)     # pages of blocks [0, len) read, not computed
    write_pages: list[int] = field(default_factory=list)      # pages for the window's complete blocks, in order
    # model state (model runner)
    step: int = 0
    x: torch.Tensor | None = None      # [80, window] float32 Euler state
    mu: torch.Tensor | None = None     # [80, window] encoder output (compute dtype)
    cond: torch.Tensor | None = None   # [80, window] prompt mel where the window overlaps the prompt
    spks: torch.Tensor | None = None   # [80] projected speaker embedding
    last_step_s: float = 0.0           # when it last ran an Euler step (or was admitted): how long it has sat out
    leader: "Sequence | None" = None   # the running call computing blocks this one reads (until it is done)
    followers: list["Sequence"] = field(default_factory=list)   # calls reading blocks this one computes

    @property
    def kind(self) -> str:
        return self.request.kind

    @property
    def urgent(self) -> bool:
        return self.kind in URGENT_KINDS

    @property
    def cached_blocks(self) -> int:
        return len(self.cached_pages)

    def window_start(self, block_frames: int) -> int:
        return self.cached_blocks * block_frames

    def window_frames(self, block_frames: int) -> int:
        return self.plan.flow_frames - self.window_start(block_frames)
