"""Typed configuration of the flow (CausalMaskedDiffWithXvec), parsed from the golden `config.json` "flow" section.

The dict shape is the reference yaml's (see `/work/shared/golden/tiny-seed1/config.json`); sizes the reference
hard-codes in its source live under `encoder.__not_in_yaml__` in golden configs and default to the reference's
values when a real `cosyvoice2.yaml` is parsed (those keys are then absent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from cosyvoice_common.constants import (
    MEL_BINS,
    MEL_HOP_SAMPLES,
    OUTPUT_SAMPLE_RATE_HZ,
    PRE_LOOKAHEAD_TOKENS,
    SPEAKER_EMBEDDING_DIM,
    SPEECH_CODEBOOK_SIZE,
    TOKEN_MEL_RATIO,
)

# --- values the reference hard-codes in source rather than in the yaml ---------------------------------
REFERENCE_ENCODER_WIDTH = 512          # PreLookaheadLayer(512, 512) and Upsample1D(512, 512)
REFERENCE_UP_STRIDE = 2                # Upsample1D stride (= token_mel_ratio)
REFERENCE_NUM_UP_BLOCKS = 4            # conformer layers after the up-sampler
REFERENCE_POS_ENC_MAX_LEN = 5000       # initial size of the ESPnet relative-position table (extended on demand)
FLOW_N_TIMESTEPS = 10                  # Euler steps, hard-coded in the reference flow.inference
NOISE_SEED = 0                         # the CFM's fixed noise is drawn right after seeding with 0
MEL_FRAME_RATE_HZ = OUTPUT_SAMPLE_RATE_HZ // MEL_HOP_SAMPLES   # 50 mel frames per second
NOISE_MAX_SECONDS = 300                # the fixed noise covers 300 s of (prompt + output) mel
NOISE_FRAMES = MEL_FRAME_RATE_HZ * NOISE_MAX_SECONDS           # 15000

_NOT_IN_YAML = "__not_in_yaml__"


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"flow config: {what}")


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """UpsampleConformerEncoder (rel-pos ESPnet attention, pre-norm, no macaron, no conv module)."""
    input_size_dims: int
    output_size_dims: int
    attention_heads: int
    linear_units_dims: int
    num_blocks: int
    static_chunk_size_tokens: int
    pre_lookahead_channels: int
    pre_lookahead_len_tokens: int
    up_channels: int
    up_stride: int
    num_up_blocks: int
    pos_enc_max_len: int

    def __post_init__(self) -> None:
        _require(self.output_size_dims % self.attention_heads == 0, "encoder output_size must divide into heads")
        # The pre-lookahead layer's residual and the up-sampler feed output-size features; the reference only works
        # when these widths agree (full size: all 512).
        _require(self.pre_lookahead_channels == self.output_size_dims == self.up_channels,
                 "pre_lookahead/up_layer channels must equal encoder output_size")
        _require(self.input_size_dims == self.output_size_dims,
                 "encoder input_size must equal output_size (up_embed is built with input_size)")
        _require(self.pre_lookahead_len_tokens >= 1 and self.up_stride >= 1 and self.num_up_blocks >= 0,
                 "bad pre_lookahead_len / stride / num_up_blocks")
        _require(self.static_chunk_size_tokens > 0, "static_chunk_size must be > 0")

    @property
    def head_dim(self) -> int:
        return self.output_size_dims // self.attention_heads

    @property
    def up_static_chunk_size_frames(self) -> int:
        return self.static_chunk_size_tokens * self.up_stride


@dataclass(frozen=True, slots=True)
class EstimatorConfig:
    """CausalConditionalDecoder: a one-level causal 1-D U-Net with transformer blocks."""
    in_channels: int
    out_channels: int
    channels: int                      # the single U-Net level's width (yaml `channels: [C]`)
    attention_head_dim: int
    num_heads: int
    n_blocks: int
    num_mid_blocks: int
    static_chunk_size_frames: int

    def __post_init__(self) -> None:
        _require(self.channels > 0 and self.channels % 8 == 0, "estimator channels must be a positive multiple of 8")
        _require(self.in_channels % 2 == 0, "estimator in_channels must be even (sinusoidal time embedding)")
        _require(self.n_blocks >= 0 and self.num_mid_blocks >= 0, "negative block count")
        _require(self.static_chunk_size_frames > 0, "estimator static_chunk_size must be > 0")

    @property
    def time_embed_dims(self) -> int:
        return self.channels * 4       # the reference sizes the time MLP as 4x the first level's width

    @property
    def inner_dims(self) -> int:
        return self.num_heads * self.attention_head_dim


@dataclass(frozen=True, slots=True)
class CFMConfig:
    mel_bins: int
    inference_cfg_rate: float
    n_timesteps: int
    noise_frames: int
    noise_seed: int

    def __post_init__(self) -> None:
        _require(self.n_timesteps >= 1, "n_timesteps must be >= 1")
        _require(self.noise_frames > 0, "noise_frames must be > 0")
        _require(self.inference_cfg_rate >= 0.0, "inference_cfg_rate must be >= 0")


@dataclass(frozen=True, slots=True)
class FlowConfig:
    input_size_dims: int
    mel_bins: int
    spk_embed_dims: int
    vocab_size: int
    token_mel_ratio: int
    pre_lookahead_len_tokens: int
    encoder: EncoderConfig
    estimator: EstimatorConfig
    cfm: CFMConfig

    def __post_init__(self) -> None:
        _require(self.mel_bins == MEL_BINS, f"output_size must be {MEL_BINS} (the CFM is built for {MEL_BINS} bins)")
        _require(self.spk_embed_dims == SPEAKER_EMBEDDING_DIM, f"spk_embed_dim must be {SPEAKER_EMBEDDING_DIM}")
        _require(self.input_size_dims == self.encoder.input_size_dims, "flow input_size != encoder input_size")
        _require(self.token_mel_ratio == self.encoder.up_stride, "token_mel_ratio must equal the up-sampler stride")
        _require(self.pre_lookahead_len_tokens == self.encoder.pre_lookahead_len_tokens,
                 "flow pre_lookahead_len != encoder pre-lookahead layer's")
        # estimator input = [x, mu, spks, cond], each mel_bins wide
        _require(self.estimator.in_channels == 4 * self.mel_bins, "estimator in_channels must be 4 * mel bins")
        _require(self.estimator.out_channels == self.mel_bins, "estimator out_channels must be mel bins")

    @classmethod
    def from_dict(cls, flow_cfg: Mapping[str, Any]) -> "FlowConfig":
        enc = flow_cfg["encoder"]
        hard = enc.get(_NOT_IN_YAML, {}) or {}
        pre = hard.get("pre_lookahead_layer", {}) or {}
        up = hard.get("up_layer", {}) or {}
        for key, want in (("input_layer", "linear"), ("pos_enc_layer_type", "rel_pos_espnet"),
                          ("selfattention_layer_type", "rel_selfattn")):
            _require(enc.get(key, want) == want, f"encoder {key} must be {want!r}, got {enc.get(key)!r}")
        _require(enc.get("normalize_before", True) is True, "encoder normalize_before must be true")
        _require(not enc.get("use_cnn_module", False), "encoder use_cnn_module is not supported")
        _require(not enc.get("macaron_style", False), "encoder macaron_style is not supported")
        _require(hard.get("activation_type", "swish") == "swish", "encoder activation must be swish")
        _require(hard.get("key_bias", True) is True, "encoder key_bias must be true")
        pre_len = int(flow_cfg.get("pre_lookahead_len", PRE_LOOKAHEAD_TOKENS))
        encoder = EncoderConfig(
            input_size_dims=int(enc.get("input_size", flow_cfg["input_size"])),
            output_size_dims=int(enc["output_size"]),
            attention_heads=int(enc["attention_heads"]),
            linear_units_dims=int(enc["linear_units"]),
            num_blocks=int(enc["num_blocks"]),
            static_chunk_size_tokens=int(enc["static_chunk_size"]),
            pre_lookahead_channels=int(pre.get("channels", REFERENCE_ENCODER_WIDTH)),
            pre_lookahead_len_tokens=int(pre.get("pre_lookahead_len", PRE_LOOKAHEAD_TOKENS)),
            up_channels=int(up.get("channels", REFERENCE_ENCODER_WIDTH)),
            up_stride=int(up.get("stride", REFERENCE_UP_STRIDE)),
            num_up_blocks=int(hard.get("num_up_blocks", REFERENCE_NUM_UP_BLOCKS)),
            pos_enc_max_len=int(hard.get("pos_enc_max_len", REFERENCE_POS_ENC_MAX_LEN)),
        )
        _require(int(pre.get("in_channels", encoder.pre_lookahead_channels)) == encoder.pre_lookahead_channels,
                 "pre_lookahead_layer in_channels != channels")
        _require(int(up.get("out_channels", encoder.up_channels)) == encoder.up_channels,
                 "up_layer out_channels != channels")

        dec = flow_cfg["decoder"]
        est = dec["estimator"]
        chans = list(est["channels"])
        _require(len(chans) == 1, f"only a one-level estimator U-Net is supported, got channels={chans}")
        _require(est.get("act_fn", "gelu") == "gelu", "estimator act_fn must be gelu")
        _require(int(est.get("num_decoding_left_chunks", -1)) < 0, "estimator num_decoding_left_chunks must be -1")
        estimator = EstimatorConfig(
            in_channels=int(est["in_channels"]),
            out_channels=int(est["out_channels"]),
            channels=int(chans[0]),
            attention_head_dim=int(est["attention_head_dim"]),
            num_heads=int(est["num_heads"]),
            n_blocks=int(est["n_blocks"]),
            num_mid_blocks=int(est["num_mid_blocks"]),
            static_chunk_size_frames=int(est.get("static_chunk_size",
                                                 encoder.static_chunk_size_tokens * encoder.up_stride)),
        )
        cfm_params = dec.get("cfm_params", {})
        _require(cfm_params.get("solver", "euler") == "euler", "cfm solver must be euler")
        _require(cfm_params.get("t_scheduler", "cosine") == "cosine", "cfm t_scheduler must be cosine")
        cfm = CFMConfig(
            mel_bins=int(flow_cfg["output_size"]),
            inference_cfg_rate=float(cfm_params["inference_cfg_rate"]),
            n_timesteps=FLOW_N_TIMESTEPS,
            noise_frames=NOISE_FRAMES,
            noise_seed=NOISE_SEED,
        )
        return cls(
            input_size_dims=int(flow_cfg["input_size"]),
            mel_bins=int(flow_cfg["output_size"]),
            spk_embed_dims=int(flow_cfg.get("spk_embed_dim", SPEAKER_EMBEDDING_DIM)),
            vocab_size=int(flow_cfg.get("vocab_size", SPEECH_CODEBOOK_SIZE)),
            token_mel_ratio=int(flow_cfg.get("token_mel_ratio", TOKEN_MEL_RATIO)),
            pre_lookahead_len_tokens=pre_len,
            encoder=encoder,
            estimator=estimator,
            cfm=cfm,
        )
