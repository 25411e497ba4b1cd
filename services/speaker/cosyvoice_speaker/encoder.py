"""Speaker x-vector: 16 kHz prompts -> mean-normalised Kaldi fbank -> campplus.onnx -> [N, 192]."""
from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cosyvoice_common.constants import SPEAKER_EMBEDDING_DIM
from cosyvoice_common.runtime import exact_fp32, onnx_session
from cosyvoice_speaker.features import KALDI, campplus_fbank

CAMPPLUS_FILE = "campplus.onnx"
CAMPPLUS_INPUT_NAME = "input"    # the released model's input name (Triton builds its profile on it)
BACKENDS = ("onnx", "torch")


@dataclass(frozen=True, slots=True)
class SpeakerEncoderConfig:
    model_dir: Path
    backend: str = "onnx"
    device: str = "cpu"
    intra_op_threads: int = 1        # the reference runs CAM++ on one CPU thread

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not (Path(self.model_dir) / CAMPPLUS_FILE).is_file():
            raise FileNotFoundError(f"{Path(self.model_dir) / CAMPPLUS_FILE} not found")

    @property
    def onnx_path(self) -> Path:
        return Path(self.model_dir) / CAMPPLUS_FILE


def _import_onnx2torch():
    """Import onnx2torch, which imports torchvision only for its NMS/RoIAlign converters.

    Where the installed torchvision does not match torch (its C++ ops fail to register), a stub
    torchvision is put in its place for the import: CAM++ uses neither operator.
    """
    try:
        import onnx2torch
        return onnx2torch
    except (RuntimeError, ImportError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for name in [m for m in sys.modules if m == "onnx2torch" or m.startswith("onnx2torch.")]:
            del sys.modules[name]

        def _unavailable(*_args, **_kwargs):
            raise NotImplementedError("torchvision is unavailable in this environment")

        stub = types.ModuleType("torchvision")
        stub.ops = types.ModuleType("torchvision.ops")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        stub.ops.__spec__ = importlib.machinery.ModuleSpec("torchvision.ops", None)
        stub.ops.roi_align = stub.ops.nms = stub.ops.batched_nms = _unavailable
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, stub.ops
        try:
            import onnx2torch
        finally:
            # The stub must not outlive the import: other libraries (transformers) probe torchvision.
            del sys.modules["torchvision"], sys.modules["torchvision.ops"]
        return onnx2torch


class SpeakerEncoder:
    """`embed(list of 1-D 16 kHz float arrays) -> float32 [N, 192]` (un-normalised x-vectors).

    Each utterance runs alone: CAM++ pools statistics over time, so padding would change the result.
    """

    def __init__(self, model_dir: str | Path, backend: str = "onnx", device: str | torch.device = "cpu") -> None:
        self.config = SpeakerEncoderConfig(Path(model_dir), backend, str(device))
        self.device = torch.device(device)
        self._session = None
        self._module = None
        if backend == "onnx":
            self._session = onnx_session(self.config.onnx_path, self.config.intra_op_threads)
            self._input_name = self._session.get_inputs()[0].name
        else:
            import onnx

            # Converted once at load; the GraphModule then runs on `device`.
            module = _import_onnx2torch().convert(onnx.load(str(self.config.onnx_path)))
            self._module = module.eval().to(self.device)

    def _features(self, wav) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(wav, dtype=np.float32).reshape(-1)) if not isinstance(wav, torch.Tensor) \
            else wav.reshape(-1).to(torch.float32)
        if x.shape[0] < KALDI.frame_length_samples:
            raise ValueError(f"prompt too short for one fbank frame: {x.shape[0]} samples")
        return campplus_fbank(x.to(self.device) if self._module is not None else x)[None]

    def embed(self, wavs_16k: Sequence) -> np.ndarray:
        out = np.zeros((len(wavs_16k), SPEAKER_EMBEDDING_DIM), dtype=np.float32)
        for row, wav in enumerate(wavs_16k):
            feats = self._features(wav)
            if self._session is not None:
                result = self._session.run(None, {self._input_name: feats.numpy()})[0]
            else:
                with torch.inference_mode(), exact_fp32():
                    result = self._module(feats)
                    result = (result[0] if isinstance(result, (tuple, list)) else result).cpu().numpy()
            out[row] = result.reshape(-1)
        return out
