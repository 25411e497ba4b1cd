"""Speech tokenizer: 16 kHz prompts -> S3 v2 codes (0..6560, 25 Hz), via onnxruntime or s3tokenizer's PyTorch port."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cosyvoice_common.constants import PROMPT_16K_SAMPLE_RATE_HZ, PROMPT_MAX_SECONDS
from cosyvoice_common.runtime import exact_fp32, onnx_session
from cosyvoice_tokenizer.features import WHISPER, whisper_log_mel

SPEECH_TOKENIZER_FILE = "speech_tokenizer_v2.onnx"
BACKENDS = ("onnx", "torch")
# The encoder halves time twice (two stride-2 convs): 100 Hz mel frames -> 25 Hz codes.
_CONV_STRIDE = 2
_NUM_STRIDED_CONVS = 2
# The port's rotary table covers this many 25 Hz positions (s3tokenizer precompute_freqs_cis(64, 2048)).
_ROTARY_HEAD_DIM = 64
MAX_PROMPT_SAMPLES = int(PROMPT_MAX_SECONDS * PROMPT_16K_SAMPLE_RATE_HZ)


def code_length(num_frames: int) -> int:
    """Codes for `num_frames` mel frames: ceil(ceil(F / 2) / 2)."""
    for _ in range(_NUM_STRIDED_CONVS):
        num_frames = math.ceil(num_frames / _CONV_STRIDE)
    return num_frames


@dataclass(frozen=True, slots=True)
class SpeechTokenizerConfig:
    model_dir: Path
    backend: str = "onnx"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not (Path(self.model_dir) / SPEECH_TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{Path(self.model_dir) / SPEECH_TOKENIZER_FILE} not found")

    @property
    def onnx_path(self) -> Path:
        return Path(self.model_dir) / SPEECH_TOKENIZER_FILE


def load_s3tokenizer_from_onnx(onnx_path: str | Path):
    """s3tokenizer S3TokenizerV2 with weights converted from the ONNX by `s3tokenizer.onnx2torch`.

    Width and depth are read off the converted weights (the released model is 1280 wide, 6 blocks;
    a tiny stand-in is smaller); s3tokenizer.load_model would always build the full-size config.
    """
    from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2
    from s3tokenizer.utils import onnx2torch

    state = onnx2torch(str(onnx_path), None, False)
    width, num_mels = state["encoder.conv1.weight"].shape[:2]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
    config = ModelConfig(n_mels=int(num_mels), n_audio_state=int(width), n_audio_head=int(width) // _ROTARY_HEAD_DIM,
                         n_audio_layer=layers)
    model = S3TokenizerV2("speech_tokenizer_v2", config)
    model.load_state_dict(state, strict=True)
    return model.eval()


class SpeechTokenizer:
    """`tokenize(list of 1-D 16 kHz float arrays) -> list of int32 code arrays`.

    onnx: onnxruntime, one utterance per run (the released graph is exported for batch 1).
    torch: one padded batch through s3tokenizer's port, each row trimmed to its code length.
    """

    def __init__(self, model_dir: str | Path, backend: str = "onnx", device: str | torch.device = "cpu") -> None:
        self.config = SpeechTokenizerConfig(Path(model_dir), backend, str(device))
        self.device = torch.device(device)
        if backend == "onnx":
            self._session = onnx_session(self.config.onnx_path)
            self._input_names = [i.name for i in self._session.get_inputs()]
            self._model = None
        else:
            self._session = None
            self._model = load_s3tokenizer_from_onnx(self.config.onnx_path).to(self.device)

    @staticmethod
    def _check(wav) -> np.ndarray:
        wav = np.asarray(wav, dtype=np.float32).reshape(-1) if not isinstance(wav, torch.Tensor) else wav
        n = wav.shape[-1]
        if n < WHISPER.hop_samples:
            raise ValueError(f"prompt too short for one feature frame: {n} samples")
        if n > MAX_PROMPT_SAMPLES:
            raise ValueError(f"prompt longer than {PROMPT_MAX_SECONDS} s: {n} samples at 16 kHz")
        return wav

    def tokenize(self, wavs_16k: Sequence) -> list[np.ndarray]:
        wavs = [self._check(w) for w in wavs_16k]
        if not wavs:
            return []
        if self._session is not None:
            return [self._tokenize_onnx(w) for w in wavs]
        return self._tokenize_torch(wavs)

    def _tokenize_onnx(self, wav) -> np.ndarray:
        mel = whisper_log_mel(wav).cpu().numpy()[None]
        feeds = {self._input_names[0]: mel,
                 self._input_names[1]: np.array([mel.shape[-1]], dtype=np.int32)}
        codes = self._session.run(None, feeds)[0]
        return np.ascontiguousarray(codes.reshape(-1), dtype=np.int32)

    @torch.inference_mode()
    def _tokenize_torch(self, wavs) -> list[np.ndarray]:
        mels = [whisper_log_mel(torch.as_tensor(w).to(self.device)) for w in wavs]
        lengths = [m.shape[-1] for m in mels]
        batch = torch.zeros(len(mels), mels[0].shape[0], max(lengths), device=self.device)
        for row, mel in enumerate(mels):
            batch[row, :, :mel.shape[-1]] = mel
        with exact_fp32():   # FSQ rounding needs full float32
            codes, _ = self._model.quantize(batch, torch.tensor(lengths, device=self.device, dtype=torch.int32))
        codes = codes.to(torch.int32).cpu().numpy()   # the one device->host copy
        return [np.ascontiguousarray(codes[row, :code_length(n)]) for row, n in enumerate(lengths)]
