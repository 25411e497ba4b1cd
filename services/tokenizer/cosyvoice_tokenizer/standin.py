"""Random-weight stand-in for `speech_tokenizer_v2.onnx` (S3 tokenizer v2), for tests and `make model`.

The graph is written node by node with the onnx helper API rather than with torch.onnx.export, because
s3tokenizer's ONNX->PyTorch converter (`s3tokenizer.onnx2torch`) finds weights by the released graph's
node names (`/blocks.0/attn/query/MatMul`, `/blocks.0/attn_ln/LayerNormalization`, ...) and by a few
fixed initializer names (`onnx::Conv_2216`..`2219`, `onnx::MatMul_2536`, `quantizer.project_in.bias`).
Writing the graph ourselves reproduces exactly those names, independent of the torch exporter version,
so both backends (onnxruntime on this file, the s3tokenizer port loaded from it) see the same weights.
All constants are `Constant` nodes, never initializers: the converter treats every initializer as a weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from cosyvoice_common.constants import PROMPT_16K_SAMPLE_RATE_HZ, SPEECH_CODEBOOK_SIZE

ONNX_OPSET = 17            # LayerNormalization exists from 17; onnxruntime 1.30 runs it
ONNX_IR_VERSION = 8        # readable by every onnxruntime we deploy
ROTARY_HEAD_DIM = 64       # s3tokenizer hard-codes 64-dim rotary heads (precompute_freqs_cis(64, ...))
ROTARY_THETA = 10000.0
FSMN_KERNEL = 31
CONV_KERNEL = 3
LN_EPS = 1e-5
FSQ_DIGITS = 8
FSQ_LEVELS = 3
FSQ_SCALE = 0.9990000128746033   # the released graph's tanh scale (float32 of 0.999)
MASK_BIAS = -1.0e10              # s3tokenizer.mask_to_bias
NUM_MELS = 128

# Initializer names s3tokenizer's converter maps by exact name (v2_25hz release).
CONV1_WEIGHT, CONV1_BIAS = "onnx::Conv_2216", "onnx::Conv_2217"
CONV2_WEIGHT, CONV2_BIAS = "onnx::Conv_2218", "onnx::Conv_2219"
PROJECT_DOWN_WEIGHT, PROJECT_DOWN_BIAS = "onnx::MatMul_2536", "quantizer.project_in.bias"


@dataclass(frozen=True, slots=True)
class SpeechTokenizerShape:
    width: int
    heads: int
    layers: int

    def __post_init__(self) -> None:
        if self.width != self.heads * ROTARY_HEAD_DIM:
            raise ValueError(f"width must be heads * {ROTARY_HEAD_DIM} (s3tokenizer's rotary), got {self}")


SHAPES = {
    "tiny": SpeechTokenizerShape(width=2 * ROTARY_HEAD_DIM, heads=2, layers=2),
    "full": SpeechTokenizerShape(width=1280, heads=20, layers=6),   # spec 3.2
}


def random_state_dict(shape: SpeechTokenizerShape, seed: int) -> dict[str, torch.Tensor]:
    """s3tokenizer S3TokenizerV2 state_dict keys with seeded fan-in-scaled weights (no FSQ calibration)."""
    g = torch.Generator().manual_seed(seed)
    d = shape.width

    def normal(*size: int, std: float) -> torch.Tensor:
        return torch.randn(*size, generator=g) * std

    sd: dict[str, torch.Tensor] = {
        "encoder.conv1.weight": normal(d, NUM_MELS, CONV_KERNEL, std=1 / math.sqrt(NUM_MELS * CONV_KERNEL)),
        "encoder.conv1.bias": normal(d, std=0.05),
        "encoder.conv2.weight": normal(d, d, CONV_KERNEL, std=1 / math.sqrt(d * CONV_KERNEL)),
        "encoder.conv2.bias": normal(d, std=0.05),
    }
    for i in range(shape.layers):
        p = f"encoder.blocks.{i}"
        for name, fan_out in (("query", d), ("key", d), ("value", d), ("out", d)):
            sd[f"{p}.attn.{name}.weight"] = normal(fan_out, d, std=1 / math.sqrt(d))
            if name != "key":
                sd[f"{p}.attn.{name}.bias"] = normal(fan_out, std=0.05)
        sd[f"{p}.attn.fsmn_block.weight"] = normal(d, 1, FSMN_KERNEL, std=1 / math.sqrt(FSMN_KERNEL))
        for ln in ("attn_ln", "mlp_ln"):
            sd[f"{p}.{ln}.weight"] = 1 + normal(d, std=0.1)
            sd[f"{p}.{ln}.bias"] = normal(d, std=0.05)
        sd[f"{p}.mlp.0.weight"] = normal(4 * d, d, std=1 / math.sqrt(d))
        sd[f"{p}.mlp.0.bias"] = normal(4 * d, std=0.05)
        sd[f"{p}.mlp.2.weight"] = normal(d, 4 * d, std=1 / math.sqrt(4 * d))
        sd[f"{p}.mlp.2.bias"] = normal(d, std=0.05)
    sd["quantizer._codebook.project_down.weight"] = normal(FSQ_DIGITS, d, std=1 / math.sqrt(d))
    sd["quantizer._codebook.project_down.bias"] = torch.zeros(FSQ_DIGITS)
    return sd


def build_torch_model(shape: SpeechTokenizerShape):
    """An s3tokenizer S3TokenizerV2 of this shape (weights uninitialised until load_state_dict)."""
    from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2

    config = ModelConfig(n_mels=NUM_MELS, n_audio_state=shape.width, n_audio_head=shape.heads,
                         n_audio_layer=shape.layers, n_codebook_size=SPEECH_CODEBOOK_SIZE)
    return S3TokenizerV2("speech_tokenizer_v2", config).eval()


def _calibration_mel() -> torch.Tensor:
    """A deterministic 2 s chirp + noise, as [1, 128, F] Whisper log-mel."""
    from cosyvoice_tokenizer.features import whisper_log_mel

    rng = np.random.default_rng(0)
    t = np.arange(2 * PROMPT_16K_SAMPLE_RATE_HZ) / PROMPT_16K_SAMPLE_RATE_HZ
    wav = 0.5 * np.sin(2 * np.pi * (150 * t + 600 * t**2)) + 0.02 * rng.standard_normal(t.shape)
    return whisper_log_mel(wav.astype(np.float32))[None]


def calibrated_state_dict(shape: SpeechTokenizerShape, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with the FSQ projection rescaled so each digit's pre-tanh value has unit spread.

    Unscaled, the projection's outputs cluster near 0 and nearly every frame gets code 3280 (all ones).
    """
    sd = random_state_dict(shape, seed)
    model = build_torch_model(shape)
    model.load_state_dict(sd, strict=True)
    mel = _calibration_mel()
    with torch.inference_mode():
        hidden, _ = model.encoder(mel, torch.tensor([mel.shape[-1]]))
        h = hidden[0] @ sd["quantizer._codebook.project_down.weight"].T
    std, mean = h.std(dim=0), h.mean(dim=0)
    sd["quantizer._codebook.project_down.weight"] = sd["quantizer._codebook.project_down.weight"] / std[:, None]
    sd["quantizer._codebook.project_down.bias"] = -mean / std
    return sd


class _Graph:
    """Tiny helper: named nodes, Constant nodes for constants, initializers for weights only."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        node_name = name or f"/{self._fresh(op_type)}"
        out = self._fresh(node_name.strip("/").replace("/", "_") + "_out")
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name, **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        out = self._fresh("const")
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name=out)
        self.nodes.append(helper.make_node("Constant", [], [out], name=f"/{out}", value=tensor))
        return out

    def weight(self, name: str, value: torch.Tensor) -> str:
        self.inits.append(numpy_helper.from_array(value.detach().to(torch.float32).contiguous().numpy(), name=name))
        return name

    def gelu(self, x: str) -> str:  # exact (erf) GELU, like torch.nn.functional.gelu
        inner = self.op("Erf", [self.op("Div", [x, self.const(math.sqrt(2.0))])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [inner, self.const(1.0)])]), self.const(0.5)])

    def linear(self, x: str, prefix: str, w: torch.Tensor, b: torch.Tensor | None, w_name: str,
               b_name: str | None = None) -> str:
        # MatMul weights are stored [in, out] like the released graph (the converter transposes them).
        y = self.op("MatMul", [x, self.weight(w_name, w.T)], name=f"{prefix}/MatMul")
        if b is not None:
            y = self.op("Add", [self.weight(b_name or f"{w_name}.bias", b), y], name=f"{prefix}/Add")
        return y

    def mask_from_lengths(self, lengths: str, size: str) -> str:
        """[B, T] float mask (1 inside each length) from int64 lengths [B] and a scalar int64 size."""
        positions = self.op("Range", [self.const(0, np.int64), size, self.const(1, np.int64)])
        inside = self.op("Less", [self.op("Unsqueeze", [positions, self.const([0], np.int64)]),
                                  self.op("Unsqueeze", [lengths, self.const([1], np.int64)])])
        return self.op("Cast", [inside], to=TensorProto.FLOAT)


def _conv_out_len(g: _Graph, length: str) -> str:
    # (L + 2*pad - kernel) // stride + 1 with pad 1, kernel 3, stride 2  ->  (L - 1) // 2 + 1
    return g.op("Add", [g.op("Div", [g.op("Sub", [length, g.const(1, np.int64)]), g.const(2, np.int64)]),
                        g.const(1, np.int64)])


def build_onnx_model(shape: SpeechTokenizerShape, sd: dict[str, torch.Tensor]) -> onnx.ModelProto:
    g = _Graph()
    d, heads = shape.width, shape.heads
    half = ROTARY_HEAD_DIM // 2
    feats_len = g.op("Cast", ["feats_length"], to=TensorProto.INT64)                      # [B]

    def time_size(x: str) -> str:  # scalar int64 size of axis 2
        return g.op("Squeeze", [g.op("Slice", [g.op("Shape", [x]), g.const([2], np.int64), g.const([3], np.int64)]),
                                g.const([0], np.int64)])

    def masked(x: str, lengths: str) -> str:
        m = g.mask_from_lengths(lengths, time_size(x))
        return g.op("Mul", [x, g.op("Unsqueeze", [m, g.const([1], np.int64)])])

    x = masked("feats", feats_len)
    x = g.gelu(g.op("Conv", [x, g.weight(CONV1_WEIGHT, sd["encoder.conv1.weight"]),
                             g.weight(CONV1_BIAS, sd["encoder.conv1.bias"])],
                    name="/conv1/Conv", kernel_shape=[CONV_KERNEL], strides=[2], pads=[1, 1]))
    len1 = _conv_out_len(g, feats_len)
    x = masked(x, len1)
    x = g.gelu(g.op("Conv", [x, g.weight(CONV2_WEIGHT, sd["encoder.conv2.weight"]),
                             g.weight(CONV2_BIAS, sd["encoder.conv2.bias"])],
                    name="/conv2/Conv", kernel_shape=[CONV_KERNEL], strides=[2], pads=[1, 1]))
    len2 = _conv_out_len(g, len1)
    steps = time_size(x)
    mask = g.mask_from_lengths(len2, steps)                                                 # [B, T]
    mask_pad = g.op("Unsqueeze", [mask, g.const([2], np.int64)])                            # [B, T, 1]
    attn_bias = g.op("Mul", [g.op("Sub", [g.const(1.0), mask]), g.const(MASK_BIAS)])
    attn_bias = g.op("Unsqueeze", [attn_bias, g.const([1, 2], np.int64)])                   # [B, 1, 1, T]
    x = g.op("Transpose", [x], perm=[0, 2, 1])                                              # [B, T, D]

    # Rotary tables, computed like s3tokenizer.precompute_freqs_cis (float32 angle = t * inv_freq).
    inv_freq = (1.0 / (ROTARY_THETA ** (torch.arange(0, ROTARY_HEAD_DIM, 2)[:half].float() / ROTARY_HEAD_DIM))).numpy()
    pos = g.op("Cast", [g.op("Range", [g.const(0, np.int64), steps, g.const(1, np.int64)])], to=TensorProto.FLOAT)
    angle = g.op("Mul", [g.op("Unsqueeze", [pos, g.const([1], np.int64)]), g.const(inv_freq[None, :])])
    angle = g.op("Concat", [angle, angle], axis=1)                                          # [T, 64]
    rot_shape = g.const([1, -1, 1, ROTARY_HEAD_DIM], np.int64)
    cos = g.op("Reshape", [g.op("Cos", [angle]), rot_shape])
    sin = g.op("Reshape", [g.op("Sin", [angle]), rot_shape])
    head_shape = g.const([0, 0, heads, ROTARY_HEAD_DIM], np.int64)
    scale = g.const(float(ROTARY_HEAD_DIM) ** -0.25)

    def rotate(t: str) -> str:
        lo = g.op("Slice", [t, g.const([0], np.int64), g.const([half], np.int64), g.const([3], np.int64)])
        hi = g.op("Slice", [t, g.const([half], np.int64), g.const([ROTARY_HEAD_DIM], np.int64), g.const([3], np.int64)])
        rotated = g.op("Concat", [g.op("Neg", [hi]), lo], axis=3)
        return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rotated, sin])])

    for i in range(shape.layers):
        p, s = f"/blocks.{i}", f"encoder.blocks.{i}"
        h = g.op("LayerNormalization", [x, g.weight(f"{s}.attn_ln.weight", sd[f"{s}.attn_ln.weight"]),
                                        g.weight(f"{s}.attn_ln.bias", sd[f"{s}.attn_ln.bias"])],
                 name=f"{p}/attn_ln/LayerNormalization", axis=-1, epsilon=LN_EPS)
        q = g.linear(h, f"{p}/attn/query", sd[f"{s}.attn.query.weight"], sd[f"{s}.attn.query.bias"], f"{s}.attn.query.w")
        k = g.linear(h, f"{p}/attn/key", sd[f"{s}.attn.key.weight"], None, f"{s}.attn.key.w")
        v = g.linear(h, f"{p}/attn/value", sd[f"{s}.attn.value.weight"], sd[f"{s}.attn.value.bias"], f"{s}.attn.value.w")
        # FSMN memory: depth-wise conv (k31, same padding) over the masked values, plus the values.
        v_masked = g.op("Mul", [v, mask_pad])
        fsmn = g.op("Conv", [g.op("Transpose", [v_masked], perm=[0, 2, 1]),
                             g.weight(f"{s}.attn.fsmn_block.weight", sd[f"{s}.attn.fsmn_block.weight"])],
                    name=f"{p}/attn/fsmn_block/Conv", kernel_shape=[FSMN_KERNEL], group=d,
                    pads=[(FSMN_KERNEL - 1) // 2, FSMN_KERNEL - 1 - (FSMN_KERNEL - 1) // 2])
        fsmn = g.op("Mul", [g.op("Add", [g.op("Transpose", [fsmn], perm=[0, 2, 1]), v_masked]), mask_pad])
        qh = rotate(g.op("Reshape", [q, head_shape]))
        kh = rotate(g.op("Reshape", [k, head_shape]))
        vh = g.op("Transpose", [g.op("Reshape", [v, head_shape])], perm=[0, 2, 1, 3])
        qh = g.op("Mul", [g.op("Transpose", [qh], perm=[0, 2, 1, 3]), scale])
        kh = g.op("Mul", [g.op("Transpose", [kh], perm=[0, 2, 3, 1]), scale])
        weights = g.op("Softmax", [g.op("Add", [g.op("MatMul", [qh, kh]), attn_bias])], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [weights, vh])], perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([0, 0, d], np.int64)])
        attn = g.linear(ctx, f"{p}/attn/out", sd[f"{s}.attn.out.weight"], sd[f"{s}.attn.out.bias"], f"{s}.attn.out.w")
        x = g.op("Add", [x, g.op("Add", [attn, fsmn])])
        h = g.op("LayerNormalization", [x, g.weight(f"{s}.mlp_ln.weight", sd[f"{s}.mlp_ln.weight"]),
                                        g.weight(f"{s}.mlp_ln.bias", sd[f"{s}.mlp_ln.bias"])],
                 name=f"{p}/mlp_ln/LayerNormalization", axis=-1, epsilon=LN_EPS)
        h = g.gelu(g.linear(h, f"{p}/mlp/mlp.0", sd[f"{s}.mlp.0.weight"], sd[f"{s}.mlp.0.bias"], f"{s}.mlp.0.w"))
        h = g.linear(h, f"{p}/mlp/mlp.2", sd[f"{s}.mlp.2.weight"], sd[f"{s}.mlp.2.bias"], f"{s}.mlp.2.w")
        x = g.op("Add", [x, h])

    # FSQ: 8 ternary digits -> code = sum(digit_i * 3^i).
    h = g.linear(x, "/quantizer/project_down", sd["quantizer._codebook.project_down.weight"],
                 sd["quantizer._codebook.project_down.bias"], PROJECT_DOWN_WEIGHT, PROJECT_DOWN_BIAS)
    digits = g.op("Add", [g.op("Round", [g.op("Mul", [g.op("Tanh", [h]), g.const(FSQ_SCALE)])]), g.const(1.0)])
    powers = (FSQ_LEVELS ** np.arange(FSQ_DIGITS)).astype(np.float32)
    code = g.op("MatMul", [digits, g.const(powers)])
    g.nodes.append(helper.make_node("Cast", [code], ["indices"], name="/quantizer/Cast", to=TensorProto.INT32))

    graph = helper.make_graph(
        g.nodes, "speech_tokenizer_v2_standin",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["B", NUM_MELS, "F"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, ["B"])],
        [helper.make_tensor_value_info("indices", TensorProto.INT32, ["B", "T"])],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="cosyvoice_tokenizer.standin")
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    return model


def write_speech_tokenizer_onnx(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight S3TokenizerV2 ONNX of `size` ("tiny" | "full") to `path`; deterministic in seed."""
    if size not in SHAPES:
        raise ValueError(f"size must be one of {sorted(SHAPES)}, got {size!r}")
    shape = SHAPES[size]
    model = build_onnx_model(shape, calibrated_state_dict(shape, seed))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path
