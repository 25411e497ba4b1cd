"""How the stages run the same way: crash/hang diagnostics, true-fp32 numerics and onnxruntime sessions."""
from __future__ import annotations

import faulthandler
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def install_stack_dumps() -> None:
    """For a Triton stub process: a fatal signal (SIGSEGV, SIGABRT, ...) prints every thread's Python stack
    to stderr, which is the stage's log, and `kill -USR1 <stub pid>` prints them on demand (a hang). Without
    this a crashed stub leaves only "Stub process is not healthy" behind."""
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Run convs/matmuls in true float32 on CUDA (cuDNN defaults to TF32 for convs on Ampere+), so the GPU
    ports agree with onnxruntime and the reference within the parity tolerances. Flags are restored after."""
    import torch   # here: the gateway image (seed fronts call install_stack_dumps) has no torch

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
