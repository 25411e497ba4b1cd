"""audio_tokenizer served by a real tritonserver on the tiny model answers like the in-process tokenizer."""
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from cosyvoice_common.constants import PROMPT_16K_SAMPLE_RATE_HZ, SPEECH_ID_OFFSET
from cosyvoice_common.contracts import TOKENIZER_MODEL
from cosyvoice_tokenizer import SpeechTokenizer

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _request(wav: np.ndarray, padded_len: int) -> list:
    padded = np.zeros((1, padded_len), np.float32)
    padded[0, :wav.size] = wav
    wav_in = grpcclient.InferInput("reference_wav", list(padded.shape), "FP32")
    wav_in.set_data_from_numpy(padded)
    len_in = grpcclient.InferInput("reference_wav_len", [1, 1], "INT32")
    len_in.set_data_from_numpy(np.array([[wav.size]], np.int32))
    return [wav_in, len_in]


def test_tokenizer_codes_match_in_process_tokenizer(stage_servers, tiny_model_dir):
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(PROMPT_16K_SAMPLE_RATE_HZ)).astype(np.float32)
    client = grpcclient.InferenceServerClient(stage_servers.grpc_url("tokenizer"))
    # Zero-padding past reference_wav_len must not change the codes.
    result = client.infer(TOKENIZER_MODEL, _request(wav, wav.size + 800))
    codes = result.as_numpy("prompt_speech_tokens")
    assert codes.dtype == np.int32 and codes.shape[0] == 1
    expected = SpeechTokenizer(tiny_model_dir, "onnx", "cpu").tokenize([wav])[0] + SPEECH_ID_OFFSET
    np.testing.assert_array_equal(codes[0], expected)


def test_tokenizer_bad_prompt_fails_only_its_request(stage_servers):
    client = grpcclient.InferenceServerClient(stage_servers.grpc_url("tokenizer"))
    with pytest.raises(Exception, match="reference_wav_len"):
        client.infer(TOKENIZER_MODEL, _request(np.zeros(100, np.float32), 100)[:1] + [_bad_len()])
    ok = client.infer(TOKENIZER_MODEL, _request(np.full(3200, 0.05, np.float32), 3200))
    assert ok.as_numpy("prompt_speech_tokens").shape == (1, 5)


def _bad_len():
    len_in = grpcclient.InferInput("reference_wav_len", [1, 1], "INT32")
    len_in.set_data_from_numpy(np.array([[999]], np.int32))
    return len_in
