"""Static block-causal chunk masks shared by the encoder and the estimator, built once per shape and cached."""
from __future__ import annotations

import torch

# Calls see a handful of distinct lengths per request (one per chunk); bound the cache so a long-running server
# does not keep every length it has ever seen.
_MAX_CACHED_MASKS = 256


class ChunkMaskCache:
    """Boolean [T, T] masks: frame i may attend frame j iff j < (i // chunk + 1) * chunk (chunks counted from 0)."""

    def __init__(self) -> None:
        self._masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def get(self, length: int, chunk_size: int, device: torch.device) -> torch.Tensor:
        key = (length, chunk_size, device)
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) >= _MAX_CACHED_MASKS:
                self._masks.pop(next(iter(self._masks)))
            pos = torch.arange(length, device=device)
            chunk_end = (torch.div(pos, chunk_size, rounding_mode="floor") + 1) * chunk_size
            mask = pos.unsqueeze(0) < chunk_end.unsqueeze(1)
            self._masks[key] = mask
        return mask


def block_causal_mask(length: int, chunk_size: int) -> torch.Tensor:
    """Uncached CPU version (for tests and one-off use)."""
    return ChunkMaskCache().get(length, chunk_size, torch.device("cpu"))
