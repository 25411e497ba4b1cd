"""CausalMaskedDiffWithXvec: speech tokens + prompt mel + x-vector -> mel (spec 5.1), and its strict loader."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice_common.checkpoint import check_state_dict

from .cfm import CausalConditionalCFM
from .config import FlowConfig
from .encoder import UpsampleConformerEncoder
from .estimator import CausalConditionalDecoder

FLOW_CHECKPOINT_NAME = "flow.pt"
_MAX_CACHED_MASKS = 256


@dataclass(slots=True)
class FlowTrace:
    """Intermediates of one inference call (for parity checks and debugging), reference names and layouts."""
    encoder_out: torch.Tensor        # [1, F, D] after after_norm
    encoder_proj_out: torch.Tensor   # [1, F, 80]
    spks: torch.Tensor               # [1, 80]
    mu: torch.Tensor                 # [1, 80, F]
    cond: torch.Tensor               # [1, 80, F]
    decoder_out: torch.Tensor        # [1, 80, F] incl. prompt frames
    mel: torch.Tensor                # [1, 80, F - prompt frames]


class CausalMaskedDiffWithXvec(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # registration order reproduces the reference state_dict order
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size_dims)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dims, cfg.mel_bins)
        self.encoder = UpsampleConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(self.encoder.output_size(), cfg.mel_bins)
        self.decoder = CausalConditionalCFM(cfg.cfm, CausalConditionalDecoder(cfg.estimator))
        self._frame_masks: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def _all_valid_mask(self, frames: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[1, 1, frames] ones, cached per shape (a request is never padded inside a single flow call)."""
        key = (frames, device, dtype)
        mask = self._frame_masks.get(key)
        if mask is None:
            if len(self._frame_masks) >= _MAX_CACHED_MASKS:
                self._frame_masks.pop(next(iter(self._frame_masks)))
            mask = torch.ones((1, 1, frames), device=device, dtype=dtype)
            self._frame_masks[key] = mask
        return mask

    @classmethod
    def from_config(cls, flow_cfg: Mapping[str, Any]) -> "CausalMaskedDiffWithXvec":
        """flow_cfg: the "flow" section of a golden config.json / parsed cosyvoice2.yaml."""
        return cls(FlowConfig.from_dict(flow_cfg))

    def _run(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
             embedding: torch.Tensor, streaming: bool, finalize: bool, keep: bool) -> FlowTrace | torch.Tensor:
        if token.size(0) != 1 or prompt_token.size(0) != 1:
            raise ValueError("flow inference takes one request (batch 1); batch requests at the estimator")
        lookahead = self.cfg.pre_lookahead_len_tokens
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        tokens = torch.cat([prompt_token, token], dim=1)
        emb = self.input_embedding(tokens.clamp(min=0).long())
        if finalize:
            h = self.encoder(emb, streaming=streaming)
        else:
            if tokens.size(1) <= lookahead:
                raise ValueError(f"a non-final call needs more than {lookahead} tokens")
            h = self.encoder(emb[:, :-lookahead], context=emb[:, -lookahead:], streaming=streaming)
        prompt_frames = prompt_feat.size(1)
        total_frames = h.size(1)
        if total_frames < prompt_frames:
            raise ValueError(f"prompt_feat has {prompt_frames} frames but the tokens give only {total_frames}")
        proj = self.encoder_proj(h)
        mu = proj.transpose(1, 2).contiguous()
        cond = torch.zeros((1, self.cfg.mel_bins, total_frames), device=h.device, dtype=h.dtype)
        cond[:, :, :prompt_frames] = prompt_feat.transpose(1, 2).to(h.dtype)
        mask = self._all_valid_mask(total_frames, h.device, h.dtype)
        feat = self.decoder(mu, mask, spks, cond, streaming=streaming)
        mel = feat[:, :, prompt_frames:]
        if not keep:
            return mel
        return FlowTrace(encoder_out=h, encoder_proj_out=proj, spks=spks, mu=mu, cond=cond, decoder_out=feat, mel=mel)

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, token_len: torch.Tensor, prompt_token: torch.Tensor,
                  prompt_token_len: torch.Tensor, prompt_feat: torch.Tensor, prompt_feat_len: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool, finalize: bool) -> tuple[torch.Tensor, None]:
        """token [1, Tn], prompt_token [1, Tp] (codes), prompt_feat [1, 2*Tp, 80], embedding [1, 192].

        Returns (mel [1, 80, F2] float32, None): F2 = 2*Tn when finalize, else 2*(Tn - 3) (the last 3 tokens are
        only look-ahead context). The *_len arguments are accepted for the reference's signature; a request is
        its whole tensors (batch 1, no padding).
        """
        mel = self._run(token, prompt_token, prompt_feat, embedding, streaming, finalize, keep=False)
        return mel.float(), None

    @torch.inference_mode()
    def inference_trace(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                        embedding: torch.Tensor, streaming: bool, finalize: bool) -> FlowTrace:
        """As `inference`, keeping every intermediate."""
        return self._run(token, prompt_token, prompt_feat, embedding, streaming, finalize, keep=True)


def load_flow_state(flow: CausalMaskedDiffWithXvec, checkpoint_path: str | os.PathLike,
                    device: torch.device | str, dtype: torch.dtype = torch.float32) -> CausalMaskedDiffWithXvec:
    """Load a flow.pt state_dict strictly into `flow` (built on any device, meta included)."""
    state = torch.load(checkpoint_path, map_location=device, weights_only=True)
    check_state_dict(flow, state, str(checkpoint_path))
    flow.load_state_dict(state, strict=True, assign=True)
    # the fixed noise is never in the checkpoint; move it along (it stays on the CPU when built under meta)
    return flow.to(device=device, dtype=dtype).eval()


def build_flow(flow_cfg: Mapping[str, Any]) -> CausalMaskedDiffWithXvec:
    """Build without initialising weights (parameters on meta; the fixed noise on the CPU)."""
    with torch.device("meta"):
        return CausalMaskedDiffWithXvec.from_config(flow_cfg)


def load_flow(model_dir: str | os.PathLike, device: torch.device | str,
              dtype: torch.dtype = torch.float32) -> CausalMaskedDiffWithXvec:
    """<model_dir>/flow.pt, config from load_model_config(model_dir)["flow"]; strict (CheckpointError names keys)."""
    from cosyvoice_common.modelconfig import load_model_config

    flow_cfg = load_model_config(model_dir)["flow"]
    return load_flow_state(build_flow(flow_cfg), os.path.join(model_dir, FLOW_CHECKPOINT_NAME), device, dtype)
