"""speaker_embedding served by a real tritonserver on the tiny model: x-vector and prompt mel as in-process."""
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from cosyvoice_common.constants import MEL_BINS, MEL_HOP_SAMPLES, OUTPUT_SAMPLE_RATE_HZ, PROMPT_16K_SAMPLE_RATE_HZ, SPEAKER_EMBEDDING_DIM
from cosyvoice_common.contracts import SPEAKER_MODEL
from cosyvoice_speaker import SpeakerEncoder
from cosyvoice_speaker.features import prompt_mel

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _input(name: str, array: np.ndarray, datatype: str):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_speaker_embedding_and_prompt_mel_match_in_process(stage_servers, tiny_model_dir):
    rng = np.random.default_rng(1)
    wav_16k = (0.1 * rng.standard_normal(PROMPT_16K_SAMPLE_RATE_HZ)).astype(np.float32)
    wav_24k = (0.1 * rng.standard_normal(OUTPUT_SAMPLE_RATE_HZ)).astype(np.float32)
    client = grpcclient.InferenceServerClient(stage_servers.grpc_url("speaker"))
    result = client.infer(SPEAKER_MODEL, [
        _input("reference_wav", wav_16k[None], "FP32"),
        _input("reference_wav_len", np.array([[wav_16k.size]], np.int32), "INT32"),
        _input("reference_wav_24k", wav_24k[None], "FP32"),
        _input("reference_wav_24k_len", np.array([[wav_24k.size]], np.int32), "INT32")])
    embedding = result.as_numpy("prompt_spk_embedding")
    feat = result.as_numpy("prompt_speech_feat")
    assert embedding.shape == (1, SPEAKER_EMBEDDING_DIM) and embedding.dtype == np.float32
    assert feat.shape == (1, wav_24k.size // MEL_HOP_SAMPLES, MEL_BINS) and feat.dtype == np.float32
    expected = SpeakerEncoder(tiny_model_dir, "onnx", "cpu").embed([wav_16k])[0]
    np.testing.assert_allclose(embedding[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feat[0], prompt_mel(torch.from_numpy(wav_24k)).numpy(), rtol=1e-5, atol=1e-5)


def test_speaker_without_24k_prompt_returns_empty_mel(stage_servers):
    wav = np.full((1, 8000), 0.05, np.float32)
    client = grpcclient.InferenceServerClient(stage_servers.grpc_url("speaker"))
    result = client.infer(SPEAKER_MODEL, [_input("reference_wav", wav, "FP32"),
                                          _input("reference_wav_len", np.array([[8000]], np.int32), "INT32")])
    assert result.as_numpy("prompt_spk_embedding").shape == (1, SPEAKER_EMBEDDING_DIM)
    assert result.as_numpy("prompt_speech_feat").shape == (1, 0, MEL_BINS)
