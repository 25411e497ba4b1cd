"""Golden parity cases of the speaker stage's features (frontend.npz)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cosyvoice_common.parity import ParityResult, compare
from cosyvoice_speaker.features import kaldi_fbank, prompt_mel

# Tolerances from the golden README (float32 re-implementation).
SPEECH_FEAT_ATOL = 2e-4
FBANK_ATOL = 5e-3


def cases(golden_dir: Path) -> list[ParityResult]:
    z = np.load(Path(golden_dir) / "frontend.npz")
    speech_feat = prompt_mel(z["wav_24k"]).numpy()[None]
    fbank = kaldi_fbank(z["wav_16k"]).numpy()
    campplus_in = kaldi_fbank(z["wav_16k"], mean_normalize=True).numpy()[None]
    return [
        compare("frontend.speech_feat", speech_feat, z["speech_feat"], SPEECH_FEAT_ATOL),
        compare("frontend.kaldi_fbank_raw", fbank, z["kaldi_fbank_raw"], FBANK_ATOL),
        compare("frontend.campplus_fbank", campplus_in, z["campplus_fbank"], FBANK_ATOL),
    ]
