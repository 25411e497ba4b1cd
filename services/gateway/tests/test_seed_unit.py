"""Seed front semantics without servers: tensor parsing, request mapping, config, client helpers."""
import numpy as np
import pytest

from cosyvoice_gateway.seed import (
    DEFAULT_SPEAKER,
    SeedFrontConfig,
    SeedRequestError,
    SeedSemantics,
    forced_length,
    parse_seed_inputs,
    to_synthesis_request,
)
from cosyvoice_tools.seed_client import load_manifest, padded_prompt, seed_inputs


def char_ids(text):
    return list(range(len(text)))


def test_padded_reference_wav_is_trimmed_to_reference_wav_len():
    wav = np.zeros((1, 32000), np.float32)
    wav[0, :100] = 0.5
    inputs = parse_seed_inputs({"reference_wav": wav, "reference_wav_len": np.array([[100]], np.int32),
                                "reference_text": np.array([[b"hi"]], object),
                                "target_text": np.array([["t\xe9xt".encode()]], object)})
    assert inputs.reference_wav.shape == (100,) and inputs.target_text == "t\xe9xt" and inputs.reference_text == "hi"


@pytest.mark.parametrize("tensors, message", [
    ({}, "target_text"),
    ({"target_text": np.array([[b"  "]], object)}, "target_text"),
    ({"target_text": np.array([[b"a", b"b"]], object)}, "one string"),
    ({"target_text": np.array([[b"a"]], object), "reference_wav": np.zeros((1, 10), np.float32),
      "reference_wav_len": np.array([[11]], np.int32)}, "reference_wav_len"),
    ({"target_text": np.array([[b"a"]], object), "reference_wav_len": np.array([[11]], np.int32)}, "without"),
])
def test_bad_seed_tensors_are_rejected_with_the_tensor_named(tensors, message):
    with pytest.raises(SeedRequestError, match=message):
        parse_seed_inputs(tensors)


def test_target_text_only_speaks_with_the_default_speaker():
    request = to_synthesis_request(parse_seed_inputs({"target_text": np.array([[b"hello"]], object)}),
                                   SeedSemantics(), char_ids)
    assert request.speaker_id == DEFAULT_SPEAKER and not request.prompt_audio
    assert request.min_speech_tokens == request.max_speech_tokens == 0     # model's own rule


def test_length_from_text_ratio_forces_round_k_times_text_tokens_and_extras_win():
    semantics = SeedSemantics(length_from_text="ratio", length_k=2.5)
    inputs = parse_seed_inputs({"target_text": np.array([[b"abcde"]], object)})
    request = to_synthesis_request(inputs, semantics, char_ids)
    assert request.min_speech_tokens == request.max_speech_tokens == forced_length(5, semantics) == 12  # round(12.5)
    explicit = parse_seed_inputs({"target_text": np.array([[b"abcde"]], object),
                                  "min_speech_tokens": np.array([[7]], np.int32),
                                  "max_speech_tokens": np.array([[9]], np.int32)})
    request = to_synthesis_request(explicit, semantics, char_ids)
    assert (request.min_speech_tokens, request.max_speech_tokens) == (7, 9)


def test_reference_wav_becomes_a_prompt_upload_with_its_transcript():
    import io
    import soundfile as sf

    wav = (0.1 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    inputs = parse_seed_inputs({"reference_wav": wav[None], "reference_text": np.array([[b"p"]], object),
                                "target_text": np.array([[b"t"]], object)})
    request = to_synthesis_request(inputs, SeedSemantics(), char_ids)
    decoded, rate = sf.read(io.BytesIO(request.prompt_audio), dtype="float32")
    assert rate == 16000 and np.array_equal(decoded, wav) and request.prompt_text == "p" and not request.speaker_id


def test_unfilled_template_parameter_is_an_error():
    with pytest.raises(ValueError, match="not filled"):
        SeedFrontConfig.from_parameters({"model_dir": "${model_dir}", "tokenizer_urls": "a", "speaker_urls": "b",
                                         "llm_urls": "c", "token2wav_urls": "d"})
    with pytest.raises(ValueError, match="length_from_text"):
        SeedFrontConfig.from_parameters({"model_dir": "m", "tokenizer_urls": "a", "speaker_urls": "b",
                                         "llm_urls": "c", "token2wav_urls": "d", "length_from_text": "bogus"})


def test_manifest_in_the_seed_format_resolves_relative_wavs(tmp_path):
    (tmp_path / "m.txt").write_text("a/utt1.wav|prompt one|wavs/p1.wav|target one\n\n"
                                    "utt2|prompt two|/abs/p2.wav|target two\n", encoding="utf-8")
    items = load_manifest(tmp_path / "m.txt")
    assert [i.utt for i in items] == ["utt1", "utt2"]
    assert items[0].prompt_wav == tmp_path / "wavs/p1.wav" and str(items[1].prompt_wav) == "/abs/p2.wav"
    (tmp_path / "bad.txt").write_text("only|three|fields\n")
    with pytest.raises(ValueError, match="expected"):
        load_manifest(tmp_path / "bad.txt")


def test_client_builds_the_seed_tensors_and_pads_to_whole_seconds():
    import tritonclient.grpc as grpcclient

    wav = np.ones(16000 + 5, np.float32)
    padded = padded_prompt(wav, "abcd", "abcd", padding_s=10)
    assert padded.shape == (1, 160000) and padded[0, :16005].all() and not padded[0, 16005:].any()
    names = [i.name() for i in seed_inputs(grpcclient, wav, "p", "t", padding_s=1)]
    assert names == ["reference_wav", "reference_wav_len", "reference_text", "target_text"]
    cached = seed_inputs(grpcclient, None, "", "t", min_speech_tokens=5, max_speech_tokens=5)
    assert [(i.name(), i.datatype(), i.shape()) for i in cached] == [
        ("target_text", "BYTES", [1, 1]), ("min_speech_tokens", "INT32", [1, 1]), ("max_speech_tokens", "INT32", [1, 1])]
