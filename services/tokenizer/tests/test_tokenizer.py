from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cosyvoice_common.constants import SPEECH_CODEBOOK_SIZE
from cosyvoice_common.golden import golden_dir
from cosyvoice_tokenizer import SPEECH_TOKENIZER_FILE, SpeechTokenizer, code_length
from cosyvoice_tokenizer.features import whisper_log_mel
from cosyvoice_tokenizer.parity import cases
from cosyvoice_tokenizer.standin import write_speech_tokenizer_onnx

GOLDEN = golden_dir()


def _golden() -> Path:
    if not (GOLDEN / "frontend.npz").is_file():
        print(f"golden frontend.npz absent at {GOLDEN}")
        pytest.skip(f"golden frontend.npz absent at {GOLDEN}")
    return GOLDEN


def _speech(num_samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16000
    f0 = rng.uniform(100, 300)
    wav = 0.4 * np.sin(2 * np.pi * (f0 * t + rng.uniform(50, 400) * t ** 2)) + 0.03 * rng.standard_normal(num_samples)
    return wav.astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    write_speech_tokenizer_onnx(d / SPEECH_TOKENIZER_FILE, "tiny", seed=1)
    return d


def test_whisper_features_match_golden():
    results = cases(_golden())
    assert [r.case for r in results] == ["frontend.whisper_logmel128", "frontend.whisper_feats_length"]
    for r in results:
        assert r.passed, r


def test_whisper_mel_shape_and_range():
    mel = whisper_log_mel(_speech(16000 + 77, 0))
    assert mel.shape == (128, 100)
    # Floored at max - 8 (log10), then (x + 4) / 4: the spread is at most 2.
    assert float(mel.max() - mel.min()) <= 2.0 + 1e-6


def test_code_length_rule():
    assert [code_length(f) for f in (1, 2, 3, 4, 5, 150, 151)] == [1, 1, 1, 1, 2, 38, 38]


def test_standin_has_the_release_names_s3tokenizer_converts(model_dir):
    m = onnx.load(str(model_dir / SPEECH_TOKENIZER_FILE))
    inits = {i.name for i in m.graph.initializer}
    assert {"onnx::Conv_2216", "onnx::Conv_2219", "onnx::MatMul_2536", "quantizer.project_in.bias"} <= inits
    names = {n.name for n in m.graph.node}
    assert {"/blocks.0/attn/query/MatMul", "/blocks.1/attn/fsmn_block/Conv", "/blocks.0/mlp_ln/LayerNormalization"} <= names
    assert [i.name for i in m.graph.input] == ["feats", "feats_length"]


def test_standin_is_deterministic(model_dir, tmp_path):
    other = write_speech_tokenizer_onnx(tmp_path / "again.onnx", "tiny", seed=1)
    assert other.read_bytes() == (model_dir / SPEECH_TOKENIZER_FILE).read_bytes()


def test_onnx_and_torch_backends_give_identical_codes(model_dir):
    wavs = [_speech(n, i) for i, n in enumerate((24000, 16000 * 3 + 123, 5000, 16000))]
    onnx_codes = SpeechTokenizer(model_dir, "onnx").tokenize(wavs)
    torch_codes = SpeechTokenizer(model_dir, "torch").tokenize(wavs)   # one padded batch
    for wav, a, b in zip(wavs, onnx_codes, torch_codes):
        assert a.dtype == np.int32 and b.dtype == np.int32
        assert a.shape == (code_length(len(wav) // 160),)
        np.testing.assert_array_equal(a, b)
        assert a.min() >= 0 and a.max() < SPEECH_CODEBOOK_SIZE
    # Random weights are scaled so codes vary (an all-equal sequence would hide bugs).
    assert len(set(np.concatenate(onnx_codes).tolist())) > 20


def test_torch_batch_equals_one_by_one(model_dir):
    tok = SpeechTokenizer(model_dir, "torch")
    wavs = [_speech(n, 10 + i) for i, n in enumerate((30000, 9000))]
    batched = tok.tokenize(wavs)
    for wav, codes in zip(wavs, batched):
        np.testing.assert_array_equal(tok.tokenize([wav])[0], codes)


def test_golden_input_codes_length(model_dir):
    wav = np.load(_golden() / "frontend.npz")["wav_16k"]
    codes = SpeechTokenizer(model_dir, "onnx").tokenize([wav])[0]
    assert codes.shape == (38,)   # ceil(ceil(150 / 2) / 2)


def test_bad_inputs(model_dir):
    with pytest.raises(ValueError, match="backend"):
        SpeechTokenizer(model_dir, "tensorrt")
    with pytest.raises(FileNotFoundError):
        SpeechTokenizer(model_dir / "missing", "onnx")
    with pytest.raises(ValueError, match="too short"):
        SpeechTokenizer(model_dir, "onnx").tokenize([np.zeros(10, np.float32)])
    assert SpeechTokenizer(model_dir, "onnx").tokenize([]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_features_and_torch_backend(model_dir):
    wav = _speech(20000, 5)
    np.testing.assert_allclose(whisper_log_mel(torch.from_numpy(wav).cuda()).cpu().numpy(),
                               whisper_log_mel(wav).numpy(), atol=2e-4)
    np.testing.assert_array_equal(SpeechTokenizer(model_dir, "torch", "cuda").tokenize([wav])[0],
                                  SpeechTokenizer(model_dir, "onnx").tokenize([wav])[0])
