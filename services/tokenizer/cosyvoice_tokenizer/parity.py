"""Golden parity cases of the tokenizer stage's features (frontend.npz)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cosyvoice_common.parity import ParityResult, compare, compare_exact
from cosyvoice_tokenizer.features import whisper_log_mel

WHISPER_ATOL = 2e-4  # golden README tolerance for whisper_logmel128


def cases(golden_dir: Path) -> list[ParityResult]:
    z = np.load(Path(golden_dir) / "frontend.npz")
    mel = whisper_log_mel(z["wav_16k"]).numpy()[None]
    feats_length = np.array([mel.shape[-1]], dtype=np.int32)
    return [
        compare("frontend.whisper_logmel128", mel, z["whisper_logmel128"], WHISPER_ATOL),
        compare_exact("frontend.whisper_feats_length", feats_length, z["whisper_feats_length"]),
    ]
