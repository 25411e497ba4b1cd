"""`Qwen2LM`: the CosyVoice2 speech-token LM (spec 4), with `llm.pt`-compatible module names.

Inputs are flat ids of the TensorRT-LLM export's vocabulary (cosyvoice_common.constants): text ids index Qwen's
`embed_tokens`, `SPEECH_ID_OFFSET + k` indexes `speech_embedding[k]`, `FLAT_SOS_ID` / `FLAT_TASK_ID` index rows 0 / 1
of `llm_embedding`. Outputs are speech-head ids 0..6563 (6561..6563 are stop ids).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from cosyvoice_common.checkpoint import check_state_dict
from cosyvoice_common.constants import (
    FLAT_SOS_ID,
    FLAT_TASK_ID,
    MAX_TOKEN_TEXT_RATIO,
    MIN_TOKEN_TEXT_RATIO,
    SPEECH_CODEBOOK_SIZE,
    SPEECH_EOS,
    SPEECH_ID_OFFSET,
    SPEECH_STOP_IDS,
)
from cosyvoice_common.errors import CheckpointError, InvalidRequestError
from cosyvoice_common.modelconfig import load_model_config
from torch import nn

from .qwen2 import Qwen2Config, Qwen2ForCausalLM
from .sampling import SamplingParams, ras_sample

QWEN2_CONFIG_RELPATH = Path("CosyVoice-BlankEN") / "config.json"
LLM_CHECKPOINT_NAME = "llm.pt"
# Rows of llm_embedding (spec 4.2).
SOS_ROW = 0
TASK_ROW = 1


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """The `llm` section of the model config (golden config.json / cosyvoice2.yaml names)."""

    llm_input_size: int
    llm_output_size: int
    speech_token_size: int = SPEECH_CODEBOOK_SIZE

    def __post_init__(self) -> None:
        if self.llm_input_size <= 0 or self.llm_output_size <= 0:
            raise ValueError(f"llm_input_size ({self.llm_input_size}) and llm_output_size "
                             f"({self.llm_output_size}) must be positive")
        if self.speech_token_size != SPEECH_CODEBOOK_SIZE:
            # The flat vocabulary (SPEECH_ID_OFFSET, FLAT_SOS_ID, ...) is laid out for this codebook size.
            raise ValueError(f"speech_token_size {self.speech_token_size} != {SPEECH_CODEBOOK_SIZE} is not supported")

    @property
    def speech_head_size(self) -> int:
        return self.speech_token_size + len(SPEECH_STOP_IDS)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "LLMConfig":
        try:
            return cls(llm_input_size=int(cfg["llm_input_size"]), llm_output_size=int(cfg["llm_output_size"]),
                       speech_token_size=int(cfg.get("speech_token_size", SPEECH_CODEBOOK_SIZE)))
        except KeyError as e:
            raise ValueError(f"llm config lacks required field {e.args[0]!r}") from None


class Qwen2Encoder(nn.Module):
    """Holds the backbone as `model` so keys read `llm.model.model.*` / `llm.model.lm_head.*`."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.model = Qwen2ForCausalLM(cfg)

    @property
    def backbone(self):
        return self.model.model

    def setup_caches(self, max_batch_slots: int, max_seq_len: int) -> None:
        self.backbone.setup_caches(max_batch_slots, max_seq_len)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                slot_ids: torch.Tensor | slice | None = None) -> torch.Tensor:
        return self.model(inputs_embeds, positions, slot_ids)


def build_prompt_flat_ids(text_ids: Sequence[int], prompt_text_ids: Sequence[int] = (),
                          prompt_speech_codes: Sequence[int] = ()) -> list[int]:
    """Reference input layout (spec 4.3) as flat ids: sos, prompt text ++ text, task, prompt speech."""
    for name, ids in (("text_ids", text_ids), ("prompt_text_ids", prompt_text_ids)):
        bad = [int(t) for t in ids if not 0 <= int(t) < SPEECH_ID_OFFSET]
        if bad:
            raise InvalidRequestError(f"{name} holds ids outside [0, {SPEECH_ID_OFFSET}): {bad[:5]}")
    bad = [int(c) for c in prompt_speech_codes if not 0 <= int(c) < SPEECH_CODEBOOK_SIZE]
    if bad:
        raise InvalidRequestError(f"prompt_speech_codes holds codes outside [0, {SPEECH_CODEBOOK_SIZE}): {bad[:5]}")
    return ([FLAT_SOS_ID] + [int(t) for t in prompt_text_ids] + [int(t) for t in text_ids] + [FLAT_TASK_ID]
            + [int(c) + SPEECH_ID_OFFSET for c in prompt_speech_codes])


def default_length_bounds(num_text_tokens: int) -> tuple[int, int]:
    """(min_len, max_len) of generated speech tokens from the target text length (spec 4.4)."""
    return int(num_text_tokens * MIN_TOKEN_TEXT_RATIO), int(num_text_tokens * MAX_TOKEN_TEXT_RATIO)


class Qwen2LM(nn.Module):
    def __init__(self, llm_cfg: LLMConfig, qwen2_cfg: Qwen2Config) -> None:
        super().__init__()
        if not llm_cfg.llm_input_size == llm_cfg.llm_output_size == qwen2_cfg.hidden_size:
            raise ValueError(f"llm_input_size {llm_cfg.llm_input_size} / llm_output_size {llm_cfg.llm_output_size} "
                             f"must equal the Qwen2 hidden_size {qwen2_cfg.hidden_size}")
        self.llm_config = llm_cfg
        self.qwen2_config = qwen2_cfg
        hidden = qwen2_cfg.hidden_size
        self.llm_embedding = nn.Embedding(2, hidden)
        self.llm = Qwen2Encoder(qwen2_cfg)
        self.llm_decoder = nn.Linear(hidden, llm_cfg.speech_head_size, bias=True)
        self.speech_embedding = nn.Embedding(llm_cfg.speech_head_size, hidden)

    @classmethod
    def from_config(cls, llm_cfg: Mapping[str, Any], qwen2_cfg: Mapping[str, Any]) -> "Qwen2LM":
        return cls(LLMConfig.from_dict(llm_cfg), Qwen2Config.from_dict(qwen2_cfg))

    # --- embeddings and heads ------------------------------------------------------------------------------------

    @property
    def text_vocab_size(self) -> int:
        return min(self.qwen2_config.vocab_size, SPEECH_ID_OFFSET)

    def validate_flat_ids(self, flat_ids: Sequence[int]) -> None:
        """Boundary check (host side) so the vectorised embedding never sees an out-of-range id."""
        speech_end = SPEECH_ID_OFFSET + self.llm_config.speech_head_size
        bad = [int(t) for t in flat_ids
               if not (0 <= int(t) < self.text_vocab_size or SPEECH_ID_OFFSET <= int(t) < speech_end
                       or int(t) in (FLAT_SOS_ID, FLAT_TASK_ID))]
        if bad:
            raise InvalidRequestError(
                f"input_ids holds ids that are neither text (< {self.text_vocab_size}), speech "
                f"([{SPEECH_ID_OFFSET}, {speech_end})), sos ({FLAT_SOS_ID}) nor task ({FLAT_TASK_ID}): {bad[:5]}")

    def embed_flat(self, flat_ids: torch.Tensor) -> torch.Tensor:
        """Flat ids [...] (int64) -> embeddings [..., H]; branch-free so it can run inside a captured step."""
        is_text = flat_ids < SPEECH_ID_OFFSET
        is_speech = (flat_ids >= SPEECH_ID_OFFSET) & (flat_ids < FLAT_SOS_ID)
        zero = torch.zeros_like(flat_ids)
        text = self.llm.backbone.embed_tokens(torch.where(is_text, flat_ids, zero))
        speech = self.speech_embedding(torch.where(is_speech, flat_ids - SPEECH_ID_OFFSET, zero))
        special = self.llm_embedding((flat_ids - FLAT_SOS_ID).clamp(SOS_ROW, TASK_ROW))
        return torch.where(is_text[..., None], text, torch.where(is_speech[..., None], speech, special))

    def speech_logp(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> fp32 log-probs over the speech head [..., 6564]."""
        return self.llm_decoder(hidden).float().log_softmax(dim=-1)

    # --- forward passes -----------------------------------------------------------------------------------------

    def forward_hidden(self, flat_ids: torch.Tensor) -> torch.Tensor:
        """Cache-free causal pass (teacher forcing): flat ids [B, L] -> final hidden [B, L, H]."""
        positions = torch.arange(flat_ids.shape[1], device=flat_ids.device).expand(flat_ids.shape[0], -1)
        return self.llm(self.embed_flat(flat_ids), positions)

    def setup_caches(self, max_batch_slots: int, max_seq_len: int) -> None:
        """Static KV cache; grows (never shrinks) so engines and `inference` can share a model object."""
        bb = self.llm.backbone
        self.llm.setup_caches(max(max_batch_slots, bb.max_batch_slots), max(max_seq_len, bb.max_seq_len))

    def prefill(self, flat_ids: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Writes one sequence (flat ids [T]) at positions 0..T-1 of cache slot `slot` ([1] int64);
        returns the fp32 log-probs [6564] that predict the first generated token."""
        positions = torch.arange(flat_ids.shape[0], device=flat_ids.device)[None]
        hidden = self.llm(self.embed_flat(flat_ids[None]), positions, slot)
        return self.speech_logp(hidden[0, -1])

    def decode_step(self, speech_ids: torch.Tensor, positions: torch.Tensor,
                    slot_ids: torch.Tensor | slice) -> torch.Tensor:
        """One token per slot: speech-head ids [B], their positions [B], slots ([B] or a slice of B consecutive
        slots) -> fp32 log-probs [B, 6564]."""
        hidden = self.llm(self.speech_embedding(speech_ids)[:, None], positions[:, None], slot_ids)
        return self.speech_logp(hidden[:, 0])

    @torch.inference_mode()
    def inference(self, text_ids: Sequence[int], prompt_text_ids: Sequence[int] = (),
                  prompt_speech_codes: Sequence[int] = (), min_len: int | None = None, max_len: int | None = None,
                  sampling: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                  slot: int = 0) -> Iterator[int]:
        """Single-request generation with reference semantics (spec 4.4): yields speech codes, stops on a stop id
        (not yielded) or after `max_len` tokens; eos is masked while fewer than `min_len` have been generated.
        Not for use on a model an `LLMEngine` is running (they share the KV cache)."""
        if len(text_ids) == 0:
            raise InvalidRequestError("text_ids is empty")
        default_min, default_max = default_length_bounds(len(text_ids))
        min_len = default_min if min_len is None else min_len
        max_len = default_max if max_len is None else max_len
        if min_len < 0 or max_len < 0:
            raise InvalidRequestError(f"min_len ({min_len}) and max_len ({max_len}) must be >= 0")
        flat = build_prompt_flat_ids(text_ids, prompt_text_ids, prompt_speech_codes)
        self.validate_flat_ids(flat)
        device = self.llm_decoder.weight.device
        self.setup_caches(slot + 1, len(flat) + max_len)
        slot_ids = torch.full((1,), slot, dtype=torch.int64, device=device)
        token = torch.zeros(1, dtype=torch.int64, device=device)
        position = torch.zeros(1, dtype=torch.int64, device=device)
        logp = self.prefill(torch.tensor(flat, dtype=torch.int64, device=device), slot_ids)
        out: list[int] = []
        for i in range(max_len):
            if i < min_len:
                logp[SPEECH_EOS] = float("-inf")
            tok = ras_sample(logp, out, sampling, generator)
            if tok in SPEECH_STOP_IDS:
                return
            yield tok
            out.append(tok)
            if i + 1 == max_len:
                return
            token.fill_(tok)
            position.fill_(len(flat) + i)
            logp = self.decode_step(token, position, slot_ids)[0]


# --- loading ------------------------------------------------------------------------------------------------------

def _read_llm_section(model_dir: Path, hidden_size: int) -> dict[str, Any]:
    try:
        return dict(load_model_config(model_dir)["llm"])
    except FileNotFoundError:
        pass
    golden = model_dir / "config.json"
    if golden.is_file():
        return dict(json.loads(golden.read_text())["llm"])
    # Without a readable model config, the real model's values: the LLM's width is the backbone's.
    return {"llm_input_size": hidden_size, "llm_output_size": hidden_size, "speech_token_size": SPEECH_CODEBOOK_SIZE}


def load_llm(model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             llm_cfg: Mapping[str, Any] | None = None) -> Qwen2LM:
    """Builds Qwen2LM from `<model_dir>/CosyVoice-BlankEN/config.json` (+ the model config's llm section) and loads
    `<model_dir>/llm.pt` strictly. Returns the model in eval mode on `device` / `dtype`."""
    model_dir = Path(model_dir)
    qwen2_path = model_dir / QWEN2_CONFIG_RELPATH
    ckpt_path = model_dir / LLM_CHECKPOINT_NAME
    for p in (qwen2_path, ckpt_path):
        if not p.is_file():
            raise FileNotFoundError(f"LLM model file not found: {p}")
    qwen2_cfg = json.loads(qwen2_path.read_text())
    if llm_cfg is None:
        llm_cfg = _read_llm_section(model_dir, int(qwen2_cfg["hidden_size"]))
    with torch.device("meta"):
        model = Qwen2LM.from_config(llm_cfg, qwen2_cfg)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{ckpt_path} holds a {type(state).__name__}, expected a state dict")
    check_state_dict(model, state, str(ckpt_path))
    # assign=True adopts the checkpoint tensors (no second full-size copy); re-tie the unused text head after.
    model.load_state_dict(state, strict=True, assign=True)
    if model.qwen2_config.tie_word_embeddings:
        model.llm.model.lm_head.weight = model.llm.backbone.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()

