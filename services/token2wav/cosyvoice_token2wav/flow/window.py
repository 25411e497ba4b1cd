"""What a windowed flow forward reads from a serving engine: earlier blocks' attention keys/values and the left
context of causal convolutions.

Why a window is exact: in a streaming (chunk-masked) call, attention is block-causal on a fixed grid counted from
the prompt's first frame, every convolution is causal, the pre-look-ahead layer reads 3 tokens ahead, and the CFM's
starting noise is fixed per absolute frame. So a block whose frames (and 3 look-ahead tokens) were all present in an
earlier call comes out the same in every later call. A module given a `FlowCache` computes only a window of frames
that starts on a block boundary; what the window's frames read of earlier blocks comes from the cache:

- every attention layer: the earlier blocks' keys and values (`attend`: the window's own are appended);
- every causal convolution (and the encoder's up-sampler): the inputs of the frames just before the window
  (`left_context`; zeros before the first frame, which is what causal zero padding gives).

The cache also sees the window's new keys, values and convolution inputs, so it can keep those of blocks that are
complete. Layer and convolution numbers are the modules' `cache_index` attributes, set by their owners.
"""
from __future__ import annotations

from typing import Protocol

import torch


class FlowCache(Protocol):
    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [N, H, window, d] -> keys and values to attend over: [N, H, past + window, d] (past first)."""

    def left_context(self, conv: int, x: torch.Tensor, width: int) -> torch.Tensor:
        """x [N, C, window] -> [N, C, width + window]: the `width` input frames before the window, then x."""
