from pathlib import Path

import numpy as np
import pytest
import torch
from cosyvoice_common.constants import SPEAKER_EMBEDDING_DIM
from cosyvoice_common.golden import golden_dir
from cosyvoice_speaker import CAMPPLUS_FILE, SpeakerEncoder
from cosyvoice_speaker.features import kaldi_fbank, prompt_mel
from cosyvoice_speaker.parity import cases
from cosyvoice_speaker.standin import write_campplus_onnx
from torchaudio.compliance import kaldi

GOLDEN = golden_dir()


def _golden() -> Path:
    if not (GOLDEN / "frontend.npz").is_file():
        print(f"golden frontend.npz absent at {GOLDEN}")
        pytest.skip(f"golden frontend.npz absent at {GOLDEN}")
    return GOLDEN


def _speech(num_samples: int, seed: int, rate_hz: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / rate_hz
    wav = 0.4 * np.sin(2 * np.pi * (rng.uniform(100, 300) * t + rng.uniform(50, 400) * t ** 2))
    return (wav + 0.03 * rng.standard_normal(num_samples)).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("speaker")
    write_campplus_onnx(d / CAMPPLUS_FILE, "tiny", seed=1)
    return d


def test_features_match_golden():
    results = {r.case: r for r in cases(_golden())}
    assert set(results) == {"frontend.speech_feat", "frontend.kaldi_fbank_raw", "frontend.campplus_fbank"}
    for r in results.values():
        assert r.passed, r


def test_prompt_mel_accepts_1d_2d_numpy_and_has_50hz_frames():
    wav = _speech(24000 + 300, 0, 24000)
    a = prompt_mel(wav)
    assert a.shape == (50, 80)
    torch.testing.assert_close(prompt_mel(torch.from_numpy(wav)[None]), a)
    with pytest.raises(ValueError):
        prompt_mel(np.zeros((2, 100), np.float32))


def test_kaldi_fbank_matches_torchaudio_on_other_lengths():
    wav = _speech(16000 + 555, 3)
    want = kaldi.fbank(torch.from_numpy(wav)[None], num_mel_bins=80, dither=0.0, sample_frequency=16000)
    got = kaldi_fbank(wav)
    assert got.shape == want.shape == (1 + (16555 - 400) // 160, 80)
    torch.testing.assert_close(got, want, atol=5e-3, rtol=0)
    normed = kaldi_fbank(wav, mean_normalize=True)
    torch.testing.assert_close(normed.mean(0), torch.zeros(80), atol=1e-4, rtol=0)


def test_onnx_and_torch_backends_agree(model_dir):
    wavs = [_speech(n, i) for i, n in enumerate((24000, 50000, 4000))]
    a = SpeakerEncoder(model_dir, "onnx").embed(wavs)
    b = SpeakerEncoder(model_dir, "torch").embed(wavs)
    assert a.shape == b.shape == (3, SPEAKER_EMBEDDING_DIM) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-4)
    # Different inputs give different embeddings; the same input gives the same one.
    assert np.abs(a[0] - a[1]).max() > 1e-3
    np.testing.assert_array_equal(SpeakerEncoder(model_dir, "onnx").embed([wavs[0]])[0], a[0])


def test_standin_contract_and_determinism(model_dir, tmp_path):
    import onnx

    m = onnx.load(str(model_dir / CAMPPLUS_FILE))
    (inp,) = m.graph.input
    assert inp.name == "input"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[0] == 1 and isinstance(dims[1], str) and dims[2] == 80
    again = write_campplus_onnx(tmp_path / "c.onnx", "tiny", seed=1)
    assert again.read_bytes() == (model_dir / CAMPPLUS_FILE).read_bytes()
    assert write_campplus_onnx(tmp_path / "d.onnx", "tiny", seed=2).read_bytes() != again.read_bytes()


def test_bad_inputs(model_dir):
    with pytest.raises(ValueError, match="backend"):
        SpeakerEncoder(model_dir, "trt")
    with pytest.raises(ValueError, match="too short"):
        SpeakerEncoder(model_dir, "onnx").embed([np.zeros(100, np.float32)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_features_and_torch_backend(model_dir):
    wav16, wav24 = _speech(20000, 5), _speech(30000, 6, 24000)
    torch.testing.assert_close(kaldi_fbank(torch.from_numpy(wav16).cuda()).cpu(), kaldi_fbank(wav16), atol=5e-3, rtol=0)
    torch.testing.assert_close(prompt_mel(torch.from_numpy(wav24).cuda()).cpu(), prompt_mel(wav24), atol=2e-4, rtol=0)
    np.testing.assert_allclose(SpeakerEncoder(model_dir, "torch", "cuda").embed([wav16]),
                               SpeakerEncoder(model_dir, "onnx").embed([wav16]), atol=1e-4)
