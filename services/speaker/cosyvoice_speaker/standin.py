"""Random-weight stand-in for `campplus.onnx` (CAM++ speaker x-vector), for tests and `make model`.

Only the file's I/O contract matters to the stack (spec 3.3): input `input` [1, T, 80] float32 with a
dynamic time axis, output 0 [1, 192]. The network is CAM++-like: a TDNN front layer, densely connected
TDNN blocks (bottleneck 1x1 conv, then a dilated k3 conv whose output is gated by context-aware masking
from the utterance mean), transit 1x1 layers, statistics pooling (mean and standard deviation over time)
and a dense layer to 192. It is written with the onnx helper API (no exporter dependency) from seeded
numpy weights, so the file is identical on every run. The "full" size has the real model's block
layout (12/24/16 D-TDNN layers, growth 32, bottleneck x4, 512-d pooled input) but omits the 2-D FCM
head: a documented approximation, see services/speaker/README.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cosyvoice_common.constants import MEL_BINS, SPEAKER_EMBEDDING_DIM

ONNX_OPSET = 17
ONNX_IR_VERSION = 8
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
STATS_EPS = 1e-5
FRONT_KERNEL = 5
TDNN_KERNEL = 3


@dataclass(frozen=True, slots=True)
class CampplusShape:
    channels: int                       # after the front TDNN
    growth: int                         # channels each dense layer adds
    bottleneck: int                     # multiplier of growth for the 1x1 bottleneck
    block_layers: tuple[int, ...]       # dense layers per block
    block_dilations: tuple[int, ...]


SHAPES = {
    "tiny": CampplusShape(channels=32, growth=16, bottleneck=2, block_layers=(2, 2), block_dilations=(1, 2)),
    "full": CampplusShape(channels=128, growth=32, bottleneck=4, block_layers=(12, 24, 16),
                          block_dilations=(1, 2, 2)),
}


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"/{out}", **attrs))
        return out

    def tensor(self, value: np.ndarray, hint: str) -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name=name))
        return name

    def conv(self, x: str, c_in: int, c_out: int, kernel: int, dilation: int = 1) -> str:
        std = math.sqrt(2.0 / (c_in * kernel))    # He init keeps ReLU activations from vanishing
        w = self.tensor(self.rng.normal(0.0, std, (c_out, c_in, kernel)), "conv.weight")
        b = self.tensor(self.rng.normal(0.0, 0.05, (c_out,)), "conv.bias")
        pad = dilation * (kernel - 1) // 2
        return self.op("Conv", [x, w, b], kernel_shape=[kernel], dilations=[dilation], pads=[pad, pad])

    def relu_conv(self, x: str, c_in: int, c_out: int, kernel: int, dilation: int = 1) -> str:
        return self.op("Relu", [self.conv(x, c_in, c_out, kernel, dilation)])


def build_campplus_onnx(shape: CampplusShape, seed: int) -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.op("Transpose", [INPUT_NAME], perm=[0, 2, 1])                     # [B, 80, T]
    x = b.relu_conv(x, MEL_BINS, shape.channels, FRONT_KERNEL)
    channels = shape.channels
    for layers, dilation in zip(shape.block_layers, shape.block_dilations):
        for _ in range(layers):
            h = b.relu_conv(x, channels, shape.growth * shape.bottleneck, 1)
            local = b.conv(h, shape.growth * shape.bottleneck, shape.growth, TDNN_KERNEL, dilation)
            # Context-aware masking: a gate from the utterance-level mean of the bottleneck output.
            context = b.op("ReduceMean", [h], axes=[2], keepdims=1)
            gate = b.op("Sigmoid", [b.conv(context, shape.growth * shape.bottleneck, shape.growth, 1)])
            x = b.op("Concat", [x, b.op("Relu", [b.op("Mul", [local, gate])])], axis=1)
            channels += shape.growth
        x = b.relu_conv(x, channels, channels // 2, 1)                     # transit layer halves width
        channels //= 2
    mean = b.op("ReduceMean", [x], axes=[2], keepdims=1)
    centred = b.op("Sub", [x, mean])
    var = b.op("ReduceMean", [b.op("Mul", [centred, centred])], axes=[2], keepdims=1)
    eps = b.tensor(np.array(STATS_EPS), "stats.eps")
    std = b.op("Sqrt", [b.op("Add", [var, eps])])
    stats = b.op("Flatten", [b.op("Concat", [mean, std], axis=1)], axis=1)  # [B, 2C]
    w = b.tensor(b.rng.normal(0.0, 1.0 / math.sqrt(2 * channels), (SPEAKER_EMBEDDING_DIM, 2 * channels)), "dense.w")
    bias = b.tensor(b.rng.normal(0.0, 0.05, (SPEAKER_EMBEDDING_DIM,)), "dense.b")
    b.nodes.append(helper.make_node("Gemm", [stats, w, bias], [OUTPUT_NAME], name="/dense/Gemm", transB=1))

    graph = helper.make_graph(
        b.nodes, "campplus_standin",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, "T", MEL_BINS])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, SPEAKER_EMBEDDING_DIM])],
        initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="cosyvoice_speaker.standin")
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    return model


def write_campplus_onnx(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight CAM++-like ONNX of `size` ("tiny" | "full") to `path`; deterministic in seed."""
    if size not in SHAPES:
        raise ValueError(f"size must be one of {sorted(SHAPES)}, got {size!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build_campplus_onnx(SHAPES[size], seed), str(path))
    return path
