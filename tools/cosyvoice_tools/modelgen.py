"""Random-weight CosyVoice2 model directory in the real layout (`make model`).

    python -m cosyvoice_tools.modelgen --size tiny|full --out DIR [--seed N] [--force]

Writes `cosyvoice2.yaml`, `llm.pt`, `flow.pt`, `hift.pt` (float32 state dicts, keys in the reference's module
order, the exact keys/shapes of the released files at full size; `llm.pt` holds `embed_tokens` and the tied
`lm_head` as one storage), `campplus.onnx`, `speech_tokenizer_v2.onnx` (stand-ins with the real I/O),
`CosyVoice-BlankEN/` (Qwen2 `config.json` + tokenizer files) and `GENERATED.json` (size, seed; written last, so
its presence means the directory is complete; loaders never need it).

Sizes: `tiny` is the tiny-seed1 golden configuration (whole pipeline well under a second per utterance on one
CPU core); `full` is CosyVoice2-0.5B. The state dict layout is derived here from the config alone (no model
class needed), so the generator and the model code are checked against each other by the tests.

Weights: per tensor, fan-in scaled normals (std 1/sqrt(fan_in)); biases N(0, 0.05^2); norm weights and Snake
alphas 1 + N(0, 0.1^2); `pos_bias_u/v` N(0, 0.1^2); weight-norm `v` ~ N(0, 1) with `g` set so the effective
weight has std 1/sqrt(fan_in). Torch generators seeded `seed*1000 + k` (k = 1 llm, 2 flow, 3 hift). Then a few
deterministic adjustments so random weights behave like a TTS model (see `_shape_llm_head`, `_shape_hift`).

Termination (spec 9.3): the LLM's eos logit gets a bias chosen by simulation on the generated head so that,
after `min_len = 2 x text tokens` (eos is masked before), eos holds EOS_NUCLEUS_SHARE of the sampler's
top-k/top-p nucleus on a simulated step. Decoding then stops after a roughly geometric number of extra tokens:
utterances end near 2-3 speech tokens per text token (measured on tiny seed 1, 17 text tokens, 20 sampled runs:
34-84 tokens, mean 46; the real hidden states give a longer tail than the simulation; the full-size model,
seed 1, stopped exactly at min_len in 3 of 3 runs, which suits benchmarks that force lengths). The other stop ids
(6562, 6563) get a bias of STOP_FILL_BIAS so they never fire; eos stays far below 0.8 of the full
distribution, so the reference's older "re-draw while eos is blocked" loop never gives up.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from cosyvoice_common import modelconfig as mc
from cosyvoice_common.constants import (
    MEL_BINS,
    OUTPUT_SAMPLE_RATE_HZ,
    PRE_LOOKAHEAD_TOKENS,
    SPEAKER_EMBEDDING_DIM,
    SPEECH_CODEBOOK_SIZE,
    SPEECH_EOS,
    SPEECH_STOP_IDS,
    TOKEN_FRAME_RATE_HZ,
    TOKEN_HOP_TOKENS,
    TOKEN_MEL_RATIO,
)
from cosyvoice_gateway.seed_speakers import (
    SPK2INFO_NAME,  # read into the registry at start
)

Shape = tuple[int, ...]
SIZES = ("tiny", "full")
MARKER_NAME = mc.GENERATED_MARKER_NAME
SEED_SPEAKER_ID = "001"                    # the seed's default speaker key
SEED_SPEAKER_TEXT = "Hello, this is a tiny text to speech model."
SEED_SPEAKER_SECONDS = 3
SEED_SPEAKER_OFFSET = 97                   # its generator's seed offset (apart from the weights' and stand-ins')
GENERATOR_VERSION = 1

# --- init statistics (golden README "Weights") --------------------------------------------------------------------
BIAS_STD = 0.05
NORM_WEIGHT_STD = 0.1
POS_BIAS_STD = 0.1
WEIGHT_NORM_G_JITTER_STD = 0.1
SEED_STRIDE = 1000                    # generator seed = seed * SEED_STRIDE + component index
COMPONENT_INDEX = {"llm": 1, "flow": 2, "hift": 3}

# --- LLM head shaping (spec 9.3) -------------------------------------------------------------------------------------
LLM_DECODER_SHARPEN = 4.0             # sharper speech logits, as the goldens (peaky enough for top-k sampling)
EOS_NUCLEUS_SHARE = 0.25              # eos's share of the top-k/top-p nucleus once min_len is reached
STOP_FILL_BIAS = -20.0                # ids 6562/6563: never sampled in unistream decoding
EOS_CALIBRATION_STEPS = 256           # simulated decode steps (random unit-RMS hidden states)
EOS_BIAS_SEARCH_ITERS = 40
EOS_BIAS_SEARCH_RANGE = (-10.0, 60.0)
SAMPLER_TOP_K = 25                    # the released yaml's ras_sampling; used only for calibration
SAMPLER_TOP_P = 0.8

# --- HiFT shaping: audible, unsaturated random vocoder (the golden README's adjustments, fixed numbers) -------------
SOURCE_DOWNS_SCALE = 0.3
CONV_POST_G = 0.165                   # effective conv_post row norm: small log-magnitude / phase spread
CONV_POST_LOGMAG_BIAS = -0.6          # exp(-0.6) ~ 0.55 spectral magnitude
CONV_POST_PHASE_BIAS_STD = 0.4
F0_CLASSIFIER_GAIN = 250.0            # f0 = |classifier(h)|: spreads f0 over roughly 0..220 Hz ...
F0_CLASSIFIER_BIAS_HZ = 170.0         # ... around a speech-like pitch, with a few unvoiced (< 10 Hz) frames

# --- files ------------------------------------------------------------------------------------------------------
QWEN2_CONFIG_EXTRA = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_scaling": None,
                      "torch_dtype": "float32"}
TIED_LM_HEAD_KEY = "llm.model.lm_head.weight"        # tied to EMBED_TOKENS_KEY: one storage in llm.pt
EMBED_TOKENS_KEY = "llm.model.model.embed_tokens.weight"
ONNX_STANDIN_SEED_OFFSET = {"campplus": 4, "speech_tokenizer": 5}


# ====================================================================================================================
# Configurations (our own numbers; the tiny one equals the tiny-seed1 golden config, the full one CosyVoice2-0.5B)
# ====================================================================================================================

@dataclass(frozen=True, slots=True)
class SizeSpec:
    """The widths/depths that differ between sizes; everything else is the released yaml's."""
    qwen_vocab_size: int
    qwen_hidden_size: int
    qwen_intermediate_size: int
    qwen_num_layers: int
    qwen_num_heads: int
    qwen_num_kv_heads: int
    qwen_bos_eos_id: int
    flow_width: int
    flow_heads: int
    flow_linear_units: int
    flow_num_blocks: int
    est_channels: int
    est_head_dim: int
    est_n_blocks: int
    est_num_mid_blocks: int
    est_num_heads: int
    hift_base_channels: int
    f0_cond_channels: int


SIZE_SPECS: dict[str, SizeSpec] = {
    "tiny": SizeSpec(qwen_vocab_size=1200, qwen_hidden_size=64, qwen_intermediate_size=128, qwen_num_layers=2,
                     qwen_num_heads=4, qwen_num_kv_heads=2, qwen_bos_eos_id=1100,
                     flow_width=64, flow_heads=4, flow_linear_units=128, flow_num_blocks=2,
                     est_channels=64, est_head_dim=32, est_n_blocks=2, est_num_mid_blocks=2, est_num_heads=4,
                     hift_base_channels=64, f0_cond_channels=32),
    "full": SizeSpec(qwen_vocab_size=151936, qwen_hidden_size=896, qwen_intermediate_size=4864, qwen_num_layers=24,
                     qwen_num_heads=14, qwen_num_kv_heads=2, qwen_bos_eos_id=151643,
                     flow_width=512, flow_heads=8, flow_linear_units=2048, flow_num_blocks=6,
                     est_channels=256, est_head_dim=64, est_n_blocks=4, est_num_mid_blocks=12, est_num_heads=8,
                     hift_base_channels=512, f0_cond_channels=512),
}

QWEN_MAX_POSITIONS = 32768
QWEN_ROPE_THETA = 1000000.0
QWEN_RMS_EPS = 1e-6
FLOW_DROPOUT = 0.1
HIFT_UPSAMPLE_RATES = [8, 5, 3]
HIFT_ISTFT_N_FFT = 16
HIFT_ISTFT_HOP = 4


def model_config(size: str) -> dict[str, Any]:
    """The whole model config (golden config.json shape) of a generated model of `size`."""
    s = SIZE_SPECS[size]
    d = s.qwen_hidden_size
    return {
        "sample_rate": OUTPUT_SAMPLE_RATE_HZ,
        "llm_input_size": d,
        "llm_output_size": d,
        "spk_embed_dim": SPEAKER_EMBEDDING_DIM,
        "token_frame_rate": TOKEN_FRAME_RATE_HZ,
        "token_mel_ratio": TOKEN_MEL_RATIO,
        "chunk_size": TOKEN_HOP_TOKENS,
        "num_decoding_left_chunks": -1,
        "llm": {
            "__class__": "cosyvoice.llm.llm.Qwen2LM",
            "llm_input_size": d, "llm_output_size": d, "speech_token_size": SPEECH_CODEBOOK_SIZE,
            "length_normalized_loss": True, "lsm_weight": 0, "mix_ratio": [5, 15],
            "llm": {"__class__": "cosyvoice.llm.llm.Qwen2Encoder", "pretrain_path": "",
                    "qwen2_config": qwen2_config(size)},
            "sampling": {"__fn__": "cosyvoice.utils.common.ras_sampling",
                         "top_p": SAMPLER_TOP_P, "top_k": SAMPLER_TOP_K, "win_size": 10, "tau_r": 0.1},
        },
        "flow": {
            "__class__": "cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
            "input_size": s.flow_width, "output_size": MEL_BINS, "spk_embed_dim": SPEAKER_EMBEDDING_DIM,
            "output_type": "mel", "vocab_size": SPEECH_CODEBOOK_SIZE, "input_frame_rate": TOKEN_FRAME_RATE_HZ,
            "only_mask_loss": True, "token_mel_ratio": TOKEN_MEL_RATIO, "pre_lookahead_len": PRE_LOOKAHEAD_TOKENS,
            "encoder": {
                "__class__": "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder",
                "output_size": s.flow_width, "attention_heads": s.flow_heads, "linear_units": s.flow_linear_units,
                "num_blocks": s.flow_num_blocks, "dropout_rate": FLOW_DROPOUT,
                "positional_dropout_rate": FLOW_DROPOUT, "attention_dropout_rate": FLOW_DROPOUT,
                "normalize_before": True, "input_layer": "linear", "pos_enc_layer_type": "rel_pos_espnet",
                "selfattention_layer_type": "rel_selfattn", "input_size": s.flow_width, "use_cnn_module": False,
                "macaron_style": False, "static_chunk_size": TOKEN_HOP_TOKENS,
            },
            "decoder": {
                "__class__": "cosyvoice.flow.flow_matching.CausalConditionalCFM",
                "in_channels": 240, "n_spks": 1, "spk_emb_dim": MEL_BINS,
                "cfm_params": {"sigma_min": 1e-06, "solver": "euler", "t_scheduler": "cosine",
                               "training_cfg_rate": 0.2, "inference_cfg_rate": 0.7, "reg_loss_type": "l1"},
                "estimator": {
                    "__class__": "cosyvoice.flow.decoder.CausalConditionalDecoder",
                    "in_channels": 4 * MEL_BINS, "out_channels": MEL_BINS, "channels": [s.est_channels],
                    "dropout": 0.0, "attention_head_dim": s.est_head_dim, "n_blocks": s.est_n_blocks,
                    "num_mid_blocks": s.est_num_mid_blocks, "num_heads": s.est_num_heads, "act_fn": "gelu",
                    "static_chunk_size": TOKEN_HOP_TOKENS * TOKEN_MEL_RATIO, "num_decoding_left_chunks": -1,
                },
            },
        },
        "hift": {
            "__class__": "cosyvoice.hifigan.generator.HiFTGenerator",
            "in_channels": MEL_BINS, "base_channels": s.hift_base_channels, "nb_harmonics": 8,
            "sampling_rate": OUTPUT_SAMPLE_RATE_HZ, "nsf_alpha": 0.1, "nsf_sigma": 0.003, "nsf_voiced_threshold": 10,
            "upsample_rates": list(HIFT_UPSAMPLE_RATES), "upsample_kernel_sizes": [16, 11, 7],
            "istft_params": {"n_fft": HIFT_ISTFT_N_FFT, "hop_len": HIFT_ISTFT_HOP},
            "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5]] * 3,
            "source_resblock_kernel_sizes": [7, 7, 11], "source_resblock_dilation_sizes": [[1, 3, 5]] * 3,
            "lrelu_slope": 0.1, "audio_limit": 0.99,
            "f0_predictor": {"__class__": "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor",
                             "num_class": 1, "in_channels": MEL_BINS, "cond_channels": s.f0_cond_channels},
        },
        "get_tokenizer": {"__fn__": "cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer", "token_path": "",
                          "skip_special_tokens": True},
        "allowed_special": "all",
        "feat_extractor": {"__fn__": "matcha.utils.audio.mel_spectrogram", "n_fft": 1920, "num_mels": MEL_BINS,
                           "sampling_rate": OUTPUT_SAMPLE_RATE_HZ, "hop_size": 480, "win_size": 1920, "fmin": 0,
                           "fmax": 8000, "center": False},
    }


def qwen2_config(size: str) -> dict[str, Any]:
    s = SIZE_SPECS[size]
    return {
        "vocab_size": s.qwen_vocab_size, "hidden_size": s.qwen_hidden_size,
        "intermediate_size": s.qwen_intermediate_size, "num_hidden_layers": s.qwen_num_layers,
        "num_attention_heads": s.qwen_num_heads, "num_key_value_heads": s.qwen_num_kv_heads,
        "max_position_embeddings": QWEN_MAX_POSITIONS, "rope_theta": QWEN_ROPE_THETA, "rms_norm_eps": QWEN_RMS_EPS,
        "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False,
        "sliding_window": QWEN_MAX_POSITIONS, "max_window_layers": s.qwen_num_layers, "attention_dropout": 0.0,
        "bos_token_id": s.qwen_bos_eos_id, "eos_token_id": s.qwen_bos_eos_id, "initializer_range": 0.02,
        "use_cache": True,
    }


# ====================================================================================================================
# State-dict layouts (keys in module registration order: a module's own parameters, then its children)
# ====================================================================================================================

def llm_param_shapes(llm_cfg: Mapping[str, Any], qcfg: Mapping[str, Any]) -> "OrderedDict[str, Shape]":
    d = int(qcfg["hidden_size"])
    heads, kv_heads = int(qcfg["num_attention_heads"]), int(qcfg["num_key_value_heads"])
    head_dim = int(qcfg.get("head_dim") or d // heads)
    ffn, vocab = int(qcfg["intermediate_size"]), int(qcfg["vocab_size"])
    width = int(llm_cfg["llm_input_size"])
    head_rows = int(llm_cfg["speech_token_size"]) + len(SPEECH_STOP_IDS)
    out: OrderedDict[str, Shape] = OrderedDict()
    out["llm_embedding.weight"] = (2, width)                   # sos, task_id
    p = "llm.model.model."
    out[p + "embed_tokens.weight"] = (vocab, d)
    for i in range(int(qcfg["num_hidden_layers"])):
        q = f"{p}layers.{i}."
        for name, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                           ("v_proj", kv_heads * head_dim)):
            out[f"{q}self_attn.{name}.weight"] = (rows, d)
            out[f"{q}self_attn.{name}.bias"] = (rows,)
        out[f"{q}self_attn.o_proj.weight"] = (d, heads * head_dim)
        out[f"{q}mlp.gate_proj.weight"] = (ffn, d)
        out[f"{q}mlp.up_proj.weight"] = (ffn, d)
        out[f"{q}mlp.down_proj.weight"] = (d, ffn)
        out[f"{q}input_layernorm.weight"] = (d,)
        out[f"{q}post_attention_layernorm.weight"] = (d,)
    out[p + "norm.weight"] = (d,)
    out[TIED_LM_HEAD_KEY] = (vocab, d)
    out["llm_decoder.weight"] = (head_rows, int(llm_cfg["llm_output_size"]))
    out["llm_decoder.bias"] = (head_rows,)
    out["speech_embedding.weight"] = (head_rows, width)
    return out


def _conformer_layer(out: dict, p: str, d: int, heads: int, units: int) -> None:
    out[p + "self_attn.pos_bias_u"] = (heads, d // heads)
    out[p + "self_attn.pos_bias_v"] = (heads, d // heads)
    for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
        out[f"{p}self_attn.{name}.weight"] = (d, d)
        out[f"{p}self_attn.{name}.bias"] = (d,)
    out[p + "self_attn.linear_pos.weight"] = (d, d)
    out[p + "feed_forward.w_1.weight"] = (units, d)
    out[p + "feed_forward.w_1.bias"] = (units,)
    out[p + "feed_forward.w_2.weight"] = (d, units)
    out[p + "feed_forward.w_2.bias"] = (d,)
    for norm in ("norm_ff", "norm_mha"):
        out[f"{p}{norm}.weight"] = (d,)
        out[f"{p}{norm}.bias"] = (d,)


def _linear_norm_embed(out: dict, p: str, d_in: int, d: int) -> None:
    out[p + "out.0.weight"] = (d, d_in)
    out[p + "out.0.bias"] = (d,)
    out[p + "out.1.weight"] = (d,)
    out[p + "out.1.bias"] = (d,)


def _causal_resnet(out: dict, p: str, c_in: int, c_out: int, time_dim: int) -> None:
    out[p + "mlp.1.weight"] = (c_out, time_dim)
    out[p + "mlp.1.bias"] = (c_out,)
    for block, c in (("block1", c_in), ("block2", c_out)):
        out[f"{p}{block}.block.0.weight"] = (c_out, c, 3)
        out[f"{p}{block}.block.0.bias"] = (c_out,)
        out[f"{p}{block}.block.2.weight"] = (c_out,)
        out[f"{p}{block}.block.2.bias"] = (c_out,)
    out[p + "res_conv.weight"] = (c_out, c_in, 1)
    out[p + "res_conv.bias"] = (c_out,)


def _transformer_block(out: dict, p: str, dim: int, inner: int) -> None:
    out[p + "norm1.weight"] = (dim,)
    out[p + "norm1.bias"] = (dim,)
    for name in ("to_q", "to_k", "to_v"):
        out[f"{p}attn1.{name}.weight"] = (inner, dim)
    out[p + "attn1.to_out.0.weight"] = (dim, inner)
    out[p + "attn1.to_out.0.bias"] = (dim,)
    out[p + "norm3.weight"] = (dim,)
    out[p + "norm3.bias"] = (dim,)
    ff = 4 * dim                                                # diffusers FeedForward mult=4
    out[p + "ff.net.0.proj.weight"] = (ff, dim)
    out[p + "ff.net.0.proj.bias"] = (ff,)
    out[p + "ff.net.2.weight"] = (dim, ff)
    out[p + "ff.net.2.bias"] = (dim,)


def flow_param_shapes(flow_cfg: Mapping[str, Any]) -> "OrderedDict[str, Shape]":
    enc = flow_cfg["encoder"]
    est = flow_cfg["decoder"]["estimator"]
    d_in, d = int(flow_cfg["input_size"]), int(enc["output_size"])
    heads, units = int(enc["attention_heads"]), int(enc["linear_units"])
    extra = enc.get("__not_in_yaml__", {})
    look = extra.get("pre_lookahead_layer", {})
    up = extra.get("up_layer", {})
    look_in, look_ch = int(look.get("in_channels", d)), int(look.get("channels", d))
    look_len = int(look.get("pre_lookahead_len", flow_cfg.get("pre_lookahead_len", PRE_LOOKAHEAD_TOKENS)))
    up_ch, up_out = int(up.get("channels", d)), int(up.get("out_channels", d))
    stride = int(up.get("stride", mc.ENCODER_UP_STRIDE))
    n_up = int(extra.get("num_up_blocks", mc.ENCODER_NUM_UP_BLOCKS))
    mel = int(flow_cfg["output_size"])

    out: OrderedDict[str, Shape] = OrderedDict()
    out["input_embedding.weight"] = (int(flow_cfg["vocab_size"]), d_in)
    out["spk_embed_affine_layer.weight"] = (mel, int(flow_cfg["spk_embed_dim"]))
    out["spk_embed_affine_layer.bias"] = (mel,)
    _linear_norm_embed(out, "encoder.embed.", int(enc["input_size"]), d)
    out["encoder.after_norm.weight"] = (d,)
    out["encoder.after_norm.bias"] = (d,)
    out["encoder.pre_lookahead_layer.conv1.weight"] = (look_ch, look_in, look_len + 1)
    out["encoder.pre_lookahead_layer.conv1.bias"] = (look_ch,)
    out["encoder.pre_lookahead_layer.conv2.weight"] = (look_in, look_ch, 3)
    out["encoder.pre_lookahead_layer.conv2.bias"] = (look_in,)
    for i in range(int(enc["num_blocks"])):
        _conformer_layer(out, f"encoder.encoders.{i}.", d, heads, units)
    out["encoder.up_layer.conv.weight"] = (up_out, up_ch, 2 * stride + 1)
    out["encoder.up_layer.conv.bias"] = (up_out,)
    _linear_norm_embed(out, "encoder.up_embed.", int(enc["input_size"]), d)
    for i in range(n_up):
        _conformer_layer(out, f"encoder.up_encoders.{i}.", d, heads, units)
    out["encoder_proj.weight"] = (mel, d)
    out["encoder_proj.bias"] = (mel,)

    p = "decoder.estimator."
    channels = [int(c) for c in est["channels"]]
    est_in = int(est["in_channels"])
    time_dim = channels[0] * 4
    inner = int(est["num_heads"]) * int(est["attention_head_dim"])
    out[p + "time_mlp.linear_1.weight"] = (time_dim, est_in)
    out[p + "time_mlp.linear_1.bias"] = (time_dim,)
    out[p + "time_mlp.linear_2.weight"] = (time_dim, time_dim)
    out[p + "time_mlp.linear_2.bias"] = (time_dim,)
    c_prev = est_in
    for i, c in enumerate(channels):
        _causal_resnet(out, f"{p}down_blocks.{i}.0.", c_prev, c, time_dim)
        for j in range(int(est["n_blocks"])):
            _transformer_block(out, f"{p}down_blocks.{i}.1.{j}.", c, inner)
        out[f"{p}down_blocks.{i}.2.weight"] = (c, c, 3)        # the last level's "downsample" is a causal conv
        out[f"{p}down_blocks.{i}.2.bias"] = (c,)
        c_prev = c
    for i in range(int(est["num_mid_blocks"])):
        _causal_resnet(out, f"{p}mid_blocks.{i}.0.", channels[-1], channels[-1], time_dim)
        for j in range(int(est["n_blocks"])):
            _transformer_block(out, f"{p}mid_blocks.{i}.1.{j}.", channels[-1], inner)
    up_channels = channels[::-1] + [channels[0]]
    for i in range(len(up_channels) - 1):
        c_in, c = up_channels[i] * 2, up_channels[i + 1]       # skip connection doubles the input
        _causal_resnet(out, f"{p}up_blocks.{i}.0.", c_in, c, time_dim)
        for j in range(int(est["n_blocks"])):
            _transformer_block(out, f"{p}up_blocks.{i}.1.{j}.", c, inner)
        out[f"{p}up_blocks.{i}.2.weight"] = (c, c, 3)
        out[f"{p}up_blocks.{i}.2.bias"] = (c,)
    c_last = up_channels[-1]
    out[p + "final_block.block.0.weight"] = (c_last, c_last, 3)
    out[p + "final_block.block.0.bias"] = (c_last,)
    out[p + "final_block.block.2.weight"] = (c_last,)
    out[p + "final_block.block.2.bias"] = (c_last,)
    out[p + "final_proj.weight"] = (int(est["out_channels"]), c_last, 1)
    out[p + "final_proj.bias"] = (int(est["out_channels"]),)
    return out


def _wn_conv(out: dict, p: str, v_shape: Shape, bias: int) -> None:
    """A weight-normalised conv (parametrizations spelling): bias first (own parameter), then g, v."""
    out[p + "bias"] = (bias,)
    out[p + "parametrizations.weight.original0"] = (v_shape[0], 1, 1)
    out[p + "parametrizations.weight.original1"] = v_shape


def _hift_resblock(out: dict, p: str, ch: int, k: int, dilations: list[int]) -> None:
    for conv in ("convs1", "convs2"):
        for j in range(len(dilations)):
            _wn_conv(out, f"{p}{conv}.{j}.", (ch, ch, k), ch)
    for act in ("activations1", "activations2"):
        for j in range(len(dilations)):
            out[f"{p}{act}.{j}.alpha"] = (ch,)


def hift_param_shapes(hift_cfg: Mapping[str, Any]) -> "OrderedDict[str, Shape]":
    base = int(hift_cfg["base_channels"])
    rates = [int(r) for r in hift_cfg["upsample_rates"]]
    kernels = [int(k) for k in hift_cfg["upsample_kernel_sizes"]]
    n_fft = int(hift_cfg["istft_params"]["n_fft"])
    spec_ch = n_fft + 2
    f0 = hift_cfg["f0_predictor"]
    cond = int(f0["cond_channels"])
    out: OrderedDict[str, Shape] = OrderedDict()
    out["m_source.l_linear.weight"] = (1, int(hift_cfg["nb_harmonics"]) + 1)
    out["m_source.l_linear.bias"] = (1,)
    _wn_conv(out, "conv_pre.", (base, int(hift_cfg["in_channels"]), 7), base)
    for i, k in enumerate(kernels):
        c_in, c_out = base // 2 ** i, base // 2 ** (i + 1)
        _wn_conv(out, f"ups.{i}.", (c_in, c_out, k), c_out)    # ConvTranspose1d: v is [in, out, k], g is [in,1,1]
    cum = [1]
    for r in rates[::-1][:-1]:
        cum.append(cum[-1] * r)
    for i, (u, k) in enumerate(zip(cum[::-1], hift_cfg["source_resblock_kernel_sizes"])):
        ch = base // 2 ** (i + 1)
        out[f"source_downs.{i}.weight"] = (ch, spec_ch, 1) if u == 1 else (ch, spec_ch, 2 * u)
        out[f"source_downs.{i}.bias"] = (ch,)
    for i, (k, dil) in enumerate(zip(hift_cfg["source_resblock_kernel_sizes"],
                                     hift_cfg["source_resblock_dilation_sizes"])):
        _hift_resblock(out, f"source_resblocks.{i}.", base // 2 ** (i + 1), int(k), list(dil))
    n_kernels = len(hift_cfg["resblock_kernel_sizes"])
    for i in range(len(rates)):
        for j, (k, dil) in enumerate(zip(hift_cfg["resblock_kernel_sizes"], hift_cfg["resblock_dilation_sizes"])):
            _hift_resblock(out, f"resblocks.{i * n_kernels + j}.", base // 2 ** (i + 1), int(k), list(dil))
    c_last = base // 2 ** len(rates)
    _wn_conv(out, "conv_post.", (spec_ch, c_last, 7), spec_ch)
    for i in range(5):                                          # condnet: Conv, ELU, ... (5 convs at 0,2,4,6,8)
        _wn_conv(out, f"f0_predictor.condnet.{2 * i}.", (cond, int(f0["in_channels"]) if i == 0 else cond, 3), cond)
    out["f0_predictor.classifier.weight"] = (int(f0["num_class"]), cond)
    out["f0_predictor.classifier.bias"] = (int(f0["num_class"]),)
    return out


def param_shapes(cfg: Mapping[str, Any]) -> dict[str, "OrderedDict[str, Shape]"]:
    """{file name: {key: shape}} of a model config (with `llm.llm.qwen2_config`), as `full_size_keys.json`."""
    return {
        mc.LLM_CHECKPOINT_NAME: llm_param_shapes(cfg["llm"], mc.qwen2_config_of(cfg)),
        mc.FLOW_CHECKPOINT_NAME: flow_param_shapes(cfg["flow"]),
        mc.HIFT_CHECKPOINT_NAME: hift_param_shapes(cfg["hift"]),
    }


# ====================================================================================================================
# Random init
# ====================================================================================================================

_NORM_MARKERS = ("norm", "block.2.", "embed.out.1.", "up_embed.out.1.")
_TRANSPOSED_CONVS = ("ups.",)


def _fan_in(key: str, shape: Shape, strides: Mapping[str, int]) -> int:
    if any(key.startswith(p) for p in _TRANSPOSED_CONVS):
        prefix = key.split(".parametrizations")[0]
        # ConvTranspose1d [in, out, k]: each output sample sees in * k / stride inputs
        return max(1, shape[0] * shape[2] // strides.get(prefix, 1))
    return math.prod(shape[1:])


def _init_tensor(key: str, shape: Shape, gen: torch.Generator, strides: Mapping[str, int]) -> torch.Tensor:
    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float32)

    if key.endswith("pos_bias_u") or key.endswith("pos_bias_v"):
        return randn(shape) * POS_BIAS_STD
    if key.endswith(".alpha"):
        return 1.0 + randn(shape) * NORM_WEIGHT_STD
    if key.endswith("parametrizations.weight.original1"):
        return randn(shape)
    if key.endswith("parametrizations.weight.original0"):
        return torch.empty(shape)                               # set from v by _fill_weight_norm_g
    if len(shape) == 1:
        if key.endswith(".weight") and any(m in key for m in _NORM_MARKERS):
            return 1.0 + randn(shape) * NORM_WEIGHT_STD
        return randn(shape) * BIAS_STD
    return randn(shape) / math.sqrt(_fan_in(key, shape, strides))


def _fill_weight_norm_g(sd: dict[str, torch.Tensor], gen: torch.Generator, strides: Mapping[str, int]) -> None:
    """g = ||v_row|| scale so that the effective weight g * v / ||v|| has std 1/sqrt(fan_in)."""
    for key in sd:
        if not key.endswith("parametrizations.weight.original0"):
            continue
        v = sd[key[: -len("original0")] + "original1"]
        row_numel = math.prod(v.shape[1:])
        target = math.sqrt(row_numel / _fan_in(key, tuple(v.shape), strides))
        jitter = 1.0 + torch.randn(sd[key].shape, generator=gen) * WEIGHT_NORM_G_JITTER_STD
        sd[key] = (target * jitter).to(torch.float32)


def _generator(seed: int, component: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * SEED_STRIDE + COMPONENT_INDEX[component])


def random_state_dict(shapes: Mapping[str, Shape], gen: torch.Generator, strides: Mapping[str, int] | None = None,
                      device: str = "cpu", progress: Any = None) -> "OrderedDict[str, torch.Tensor]":
    """Random tensors for `shapes` (in order). On the meta device: shapes only, no memory, no RNG draws."""
    strides = strides or {}
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in shapes.items():
        if device == "meta":
            sd[key] = torch.empty(shape, device="meta", dtype=torch.float32)
        else:
            sd[key] = _init_tensor(key, tuple(shape), gen, strides)
        if progress is not None:
            progress.update(math.prod(shape))
    if device != "meta":
        _fill_weight_norm_g(sd, gen, strides)
    return sd


def _hift_strides(hift_cfg: Mapping[str, Any]) -> dict[str, int]:
    return {f"ups.{i}": int(r) for i, r in enumerate(hift_cfg["upsample_rates"])}


# ---- shaping ----

def _nucleus_eos_share(rest_top: torch.Tensor, rest_lse: torch.Tensor, eos_logit: torch.Tensor,
                       top_k: int, top_p: float) -> torch.Tensor:
    """Per row: eos's share of the ras_sampling nucleus (probs sorted descending, an item kept while the mass
    before it is < top_p, at most top_k items). `rest_top`: the top_k logits of every other id, descending;
    `rest_lse`: logsumexp of every other id; `eos_logit`: [rows]."""
    lse = torch.logaddexp(rest_lse, eos_logit)
    cand = torch.cat([eos_logit[:, None], rest_top], dim=1)    # eos first: it wins ties, as a stable sort would
    sorted_l, order = cand.sort(dim=-1, descending=True, stable=True)
    sorted_p = (sorted_l - lse[:, None]).exp()[:, :top_k]
    order = order[:, :top_k]
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    nucleus = (sorted_p * keep).sum(-1)
    eos_kept = ((order == 0) & keep).any(-1)
    eos_p = (eos_logit - lse).exp()
    return torch.where(eos_kept, eos_p / nucleus, torch.zeros_like(nucleus))


def calibrate_eos_bias(decoder_w: torch.Tensor, decoder_b: torch.Tensor, final_norm_w: torch.Tensor,
                       gen: torch.Generator, share: float = EOS_NUCLEUS_SHARE) -> float:
    """Bias for the eos row so that its median nucleus share over simulated steps is `share`.
    Simulated hidden states: unit-RMS Gaussian vectors times the final RMSNorm weight (what the backbone emits)."""
    hidden = torch.randn(EOS_CALIBRATION_STEPS, decoder_w.shape[1], generator=gen) * final_norm_w
    logits = hidden @ decoder_w.T + decoder_b
    for stop in SPEECH_STOP_IDS[1:]:
        logits[:, stop] = STOP_FILL_BIAS
    eos_no_bias = logits[:, SPEECH_EOS] - decoder_b[SPEECH_EOS]
    logits[:, SPEECH_EOS] = float("-inf")                      # "every other id" from here on
    rest_top = logits.topk(SAMPLER_TOP_K, dim=-1).values
    rest_lse = logits.logsumexp(-1)
    lo, hi = EOS_BIAS_SEARCH_RANGE
    for _ in range(EOS_BIAS_SEARCH_ITERS):
        mid = (lo + hi) / 2
        if _nucleus_eos_share(rest_top, rest_lse, eos_no_bias + mid, SAMPLER_TOP_K, SAMPLER_TOP_P).median() < share:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _shape_llm_head(sd: dict[str, torch.Tensor], gen: torch.Generator) -> float:
    sd["llm_decoder.weight"].mul_(LLM_DECODER_SHARPEN)
    bias = calibrate_eos_bias(sd["llm_decoder.weight"], sd["llm_decoder.bias"], sd["llm.model.model.norm.weight"], gen)
    sd["llm_decoder.bias"][SPEECH_EOS] = bias
    for stop in SPEECH_STOP_IDS[1:]:
        sd["llm_decoder.bias"][stop] = STOP_FILL_BIAS
    return bias


def _shape_hift(sd: dict[str, torch.Tensor], hift_cfg: Mapping[str, Any], gen: torch.Generator) -> None:
    for key in sd:
        if key.startswith("source_downs.") and key.endswith(".weight"):
            sd[key].mul_(SOURCE_DOWNS_SCALE)
    n_mag = int(hift_cfg["istft_params"]["n_fft"]) // 2 + 1    # conv_post: [log-magnitude bins | phase bins]
    g = sd["conv_post.parametrizations.weight.original0"]
    sd["conv_post.parametrizations.weight.original0"] = torch.full_like(g, CONV_POST_G)
    b = sd["conv_post.bias"]
    b[:n_mag] = CONV_POST_LOGMAG_BIAS
    b[n_mag:] = torch.randn(b.shape[0] - n_mag, generator=gen) * CONV_POST_PHASE_BIAS_STD
    sd["f0_predictor.classifier.weight"].mul_(F0_CLASSIFIER_GAIN)
    sd["f0_predictor.classifier.bias"].fill_(F0_CLASSIFIER_BIAS_HZ)


def build_state_dicts(cfg: Mapping[str, Any], seed: int, device: str = "cpu",
                      progress: bool = False) -> tuple[dict[str, "OrderedDict[str, torch.Tensor]"], dict[str, Any]]:
    """({file: state dict}, notes). device="meta" gives the layout only (no memory)."""
    shapes = param_shapes(cfg)
    total = sum(math.prod(s) for f in shapes.values() for k, s in f.items() if k != TIED_LM_HEAD_KEY)
    bar = None
    if progress and device != "meta":
        from tqdm import tqdm
        bar = tqdm(total=total, unit="param", unit_scale=True, desc="random weights", file=sys.stderr)
    out: dict[str, OrderedDict[str, torch.Tensor]] = {}
    notes: dict[str, Any] = {}
    try:
        for name, component in ((mc.LLM_CHECKPOINT_NAME, "llm"), (mc.FLOW_CHECKPOINT_NAME, "flow"),
                                (mc.HIFT_CHECKPOINT_NAME, "hift")):
            gen = _generator(seed, component)
            strides = _hift_strides(cfg["hift"]) if component == "hift" else {}
            layout = shapes[name]
            if component == "llm":     # the tied head is the embedding itself: generate it once
                layout = OrderedDict((k, v) for k, v in layout.items() if k != TIED_LM_HEAD_KEY)
            sd = random_state_dict(layout, gen, strides, device, bar)
            if component == "llm":
                ordered: OrderedDict[str, torch.Tensor] = OrderedDict()
                for key in shapes[name]:
                    ordered[key] = sd[EMBED_TOKENS_KEY] if key == TIED_LM_HEAD_KEY \
                        else sd[key]
                sd = ordered
                if device != "meta":
                    notes["eos_bias"] = _shape_llm_head(sd, gen)
            elif component == "hift" and device != "meta":
                _shape_hift(sd, cfg["hift"], gen)
            out[name] = sd
    finally:
        if bar is not None:
            bar.close()
    notes["parameters"] = total
    return out, notes


# ====================================================================================================================
# Model directory
# ====================================================================================================================

def random_flow_and_hift(size: str = "tiny", seed: int = 1):
    """A random `size` flow and HiFT built in memory, no files (tests, the token2wav speed script): eval mode,
    HiFT's weight norm folded, HiFT's output shaped like `generate`'s."""
    from cosyvoice_token2wav.flow import CausalMaskedDiffWithXvec   # here: generating files needs no token2wav
    from cosyvoice_token2wav.hift import HiFTGenerator, load_hift_state

    cfg = mc.add_source_defaults(model_config(size))
    flow = CausalMaskedDiffWithXvec.from_config(cfg["flow"])
    flow.load_state_dict(random_state_dict(flow_param_shapes(cfg["flow"]), _generator(seed, "flow")))
    gen = _generator(seed, "hift")
    hift_sd = random_state_dict(hift_param_shapes(cfg["hift"]), gen, _hift_strides(cfg["hift"]))
    _shape_hift(hift_sd, cfg["hift"], gen)
    hift = HiFTGenerator.from_config(cfg["hift"])
    load_hift_state(hift, hift_sd)
    return flow.eval(), hift.fold_weight_norm().eval()


def expected_files(model_dir: Path) -> list[Path]:
    return [model_dir / n for n in (mc.YAML_NAME, *mc.CHECKPOINT_NAMES, mc.CAMPPLUS_ONNX_NAME,
                                    mc.SPEECH_TOKENIZER_ONNX_NAME, SPK2INFO_NAME)] + \
        [model_dir / mc.QWEN2_DIR_NAME / mc.QWEN2_CONFIG_NAME, model_dir / MARKER_NAME]


read_marker = mc.read_generated_marker


def is_complete(model_dir: Path, size: str, seed: int) -> bool:
    marker = read_marker(model_dir)
    return (marker is not None and marker.get("size") == size and marker.get("seed") == seed
            and marker.get("generator_version") == GENERATOR_VERSION and all(p.is_file() for p in expected_files(model_dir)))


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_tokenizer(qwen_dir: Path, qcfg: Mapping[str, Any]) -> None:
    """The tiny byte-level BPE at both sizes (the real Qwen2 vocabulary is not redistributable here). At full size
    its ids sit at the bottom of the 151936-row table: text ids stay below the flat speech ids (151663 + code)."""
    from cosyvoice_common.text import write_tiny_bpe_tokenizer
    write_tiny_bpe_tokenizer(qwen_dir, vocab_size=int(qcfg["vocab_size"]))


def _write_seed_spk2info(model_dir: Path, seed: int) -> None:
    """`spk2info.pt` with the seed's default speaker `001`, in the Triton recipe's layout (spec 1.6). Like the
    weights, its prompt features are random (seeded), not computed from audio: a voice for the random model."""
    from cosyvoice_common.text import TextTokenizer

    gen = torch.Generator().manual_seed(seed * SEED_STRIDE + SEED_SPEAKER_OFFSET)
    tokens = SEED_SPEAKER_SECONDS * TOKEN_FRAME_RATE_HZ
    text_ids = TextTokenizer.from_dir(model_dir / mc.QWEN2_DIR_NAME).encode(SEED_SPEAKER_TEXT)
    embedding = torch.randn(1, SPEAKER_EMBEDDING_DIM, generator=gen)
    entry = {
        "name": SEED_SPEAKER_ID, "spk_id": SEED_SPEAKER_ID, "prompt_text": SEED_SPEAKER_TEXT,
        "prompt_text_token": torch.tensor([text_ids], dtype=torch.int32),
        "speech_token": torch.randint(0, SPEECH_CODEBOOK_SIZE, (1, tokens), generator=gen, dtype=torch.int32),
        "speech_feat": torch.randn(1, TOKEN_MEL_RATIO * tokens, MEL_BINS, generator=gen) * 2.0 - 4.0,
        "embedding": embedding / embedding.norm(),
    }
    _atomic_save({SEED_SPEAKER_ID: entry}, model_dir / SPK2INFO_NAME)


def _write_standins(model_dir: Path, size: str, seed: int) -> None:
    from cosyvoice_speaker.standin import write_campplus_onnx
    from cosyvoice_tokenizer.standin import write_speech_tokenizer_onnx
    write_campplus_onnx(model_dir / mc.CAMPPLUS_ONNX_NAME, size, seed * SEED_STRIDE + ONNX_STANDIN_SEED_OFFSET["campplus"])
    write_speech_tokenizer_onnx(model_dir / mc.SPEECH_TOKENIZER_ONNX_NAME, size,
                                seed * SEED_STRIDE + ONNX_STANDIN_SEED_OFFSET["speech_tokenizer"])


def generate(out_dir: str | Path, size: str = "tiny", seed: int = 1, force: bool = False,
             progress: bool | None = None) -> Path:
    """Write a complete random-weight model directory; a no-op when `out_dir` already holds this size/seed.
    Refuses to overwrite a directory that has model files but no matching marker (e.g. a real checkpoint)
    unless `force`."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    model_dir = Path(out_dir)
    if not force:
        if is_complete(model_dir, size, seed):
            print(f"modelgen: {model_dir} already holds the {size} model (seed {seed}); --force rebuilds it")
            return model_dir
        marker = read_marker(model_dir)
        has_models = any((model_dir / n).exists() for n in mc.CHECKPOINT_NAMES)
        if has_models and (marker is None or (marker.get("size"), marker.get("seed")) != (size, seed)):
            what = "a model not made by this generator" if marker is None else \
                f"a generated {marker.get('size')} model (seed {marker.get('seed')})"
            raise FileExistsError(f"{model_dir} holds {what}; pass --force to overwrite")
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / MARKER_NAME).unlink(missing_ok=True)           # incomplete until the marker is rewritten

    cfg = model_config(size)
    state_dicts, notes = build_state_dicts(cfg, seed, progress=(size == "full") if progress is None else progress)
    for name, sd in state_dicts.items():
        _atomic_save(sd, model_dir / name)
    del state_dicts

    qwen_dir = model_dir / mc.QWEN2_DIR_NAME
    qwen_dir.mkdir(exist_ok=True)
    qcfg = {**QWEN2_CONFIG_EXTRA, **cfg["llm"]["llm"]["qwen2_config"]}
    (qwen_dir / mc.QWEN2_CONFIG_NAME).write_text(json.dumps(qcfg, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(qwen_dir, qcfg)
    _write_seed_spk2info(model_dir, seed)
    _write_standins(model_dir, size, seed)
    mc.write_model_yaml(cfg, model_dir / mc.YAML_NAME)

    marker = {"generator": "cosyvoice_tools.modelgen", "generator_version": GENERATOR_VERSION, "size": size,
              "seed": seed, "eos_bias": notes.get("eos_bias"), "eos_nucleus_share": EOS_NUCLEUS_SHARE,
              "parameters": notes["parameters"], "torch": torch.__version__}
    (model_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    print(f"modelgen: wrote {size} model (seed {seed}, {notes['parameters']:,} parameters) to {model_dir}")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cosyvoice_tools.modelgen", description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--out", required=True, type=Path, help="model directory to write")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT is complete or holds other files")
    args = ap.parse_args(argv)
    try:
        generate(args.out, args.size, args.seed, args.force)
    except FileExistsError as e:
        print(f"modelgen: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
