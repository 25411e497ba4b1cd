"""How the stages run exported models the same way: true-fp32 numerics and onnxruntime sessions."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Run convs/matmuls in true float32 on CUDA (cuDNN defaults to TF32 for convs on Ampere+), so the GPU
    ports agree with onnxruntime and the reference within the parity tolerances. Flags are restored after."""
    conv_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv_tf32, matmul_tf32


def onnx_session(onnx_path: str | Path, intra_op_threads: int | None = None):
    """An onnxruntime InferenceSession, all graph optimisations, CUDA first where onnxruntime has it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    available = ort.get_available_providers()
    providers = (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    return ort.InferenceSession(str(onnx_path), options, providers=providers)
