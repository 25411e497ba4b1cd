"""The HTTP API over the real stack (tiny model, tritonserver stage processes, Redis, gateway process),
driven by the official `openai` client: voices, every response format, resampling, OpenAI's streaming
semantics (every streamable format streams by default, from the first chunk), speed, cancel, the model list."""
import io
import time
import uuid

import av
import grpc
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import tritonclient.grpc as triton_grpc

from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.constants import OUTPUT_SAMPLE_RATE_HZ, SAMPLES_PER_TOKEN
from cosyvoice_gateway.testing import prompt_wav_bytes, register_http_voice

pytestmark = [pytest.mark.stack, pytest.mark.slow]
N_TOKENS = 20           # forced length: first chunk (15 + 3 lookahead) then the final one; fast on CPU
PCM16_BYTES = 2


@pytest.fixture(scope="module")
def http_url(stack_http_url) -> str:
    return stack_http_url


@pytest.fixture(scope="module")
def client(http_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def voice(http_url) -> str:
    name = f"http-{uuid.uuid4().hex[:8]}"
    registered = register_http_voice(http_url, name, seed=3)
    assert registered["id"] == name and registered["prompt_speech_tokens"] > 0
    return name


def _forced(tokens: int = N_TOKENS, **extra) -> dict:
    return {"min_speech_tokens": tokens, "max_speech_tokens": tokens, "seed": 7, **extra}


def _decoded_samples(audio: bytes) -> tuple[int, int]:
    """(samples, sample rate) of a compressed stream, decoded by FFmpeg (soundfile cannot read aac)."""
    with av.open(io.BytesIO(audio)) as container:
        rate = container.streams.audio[0].rate
        return sum(frame.samples for frame in container.decode(audio=0)), rate


def test_registered_voice_is_listed(http_url, voice):
    listed = httpx.get(f"{http_url}/v1/audio/voices").json()["data"]
    assert voice in [v["id"] for v in listed]


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_lossless_formats_decode_to_the_forced_length(client, voice, fmt):
    audio = client.audio.speech.create(model="cosyvoice2", voice=voice, input="Hello world.",
                                       response_format=fmt, extra_body=_forced()).content
    wav, rate = sf.read(io.BytesIO(audio), dtype="float32")
    assert np.all(np.isfinite(wav)) and np.abs(wav).max() > 0
    assert rate == OUTPUT_SAMPLE_RATE_HZ and wav.shape[0] == N_TOKENS * SAMPLES_PER_TOKEN


@pytest.mark.parametrize("fmt, media_type, rate", [("mp3", "audio/mpeg", 24000), ("opus", "audio/ogg; codecs=opus", 48000),
                                                   ("aac", "audio/aac", 24000)])
def test_compressed_formats_stream_in_pieces_and_decode_to_the_forced_length(client, voice, fmt, media_type, rate):
    """Encoded chunk by chunk (PyAV): several body pieces, together one valid stream (opus decodes at 48 kHz)."""
    tokens = 70                      # several schedule hops -> several chunks
    pieces = []
    with client.audio.speech.with_streaming_response.create(
            model="cosyvoice2", voice=voice, input="Hello world.", response_format=fmt,
            extra_body=_forced(tokens)) as response:
        assert response.headers["content-type"] == media_type and "content-length" not in response.headers
        pieces = list(response.iter_bytes())
    samples, decoded_rate = _decoded_samples(b"".join(pieces))
    expected = tokens * SAMPLES_PER_TOKEN * decoded_rate // OUTPUT_SAMPLE_RATE_HZ
    assert len(pieces) >= 2 and decoded_rate == rate
    assert abs(samples - expected) < 0.05 * expected          # encoder delay and padding: a frame or two


def test_openai_client_with_no_extras_gets_mp3_bytes_at_the_first_chunk(client, voice, http_url, capsys):
    """The official client, nothing but model/voice/input: mp3 (OpenAI's default), streamed. The first bytes
    reach the client before the gateway has finished the request (a buffered body would arrive only after),
    about when the gateway reports its first chunk."""
    first_sum = "cosyvoice_gateway_first_chunk_seconds_sum"
    total_sum = 'cosyvoice_gateway_request_seconds_sum{rpc="http.speech.stream"}'
    before_first, before_total = _metric(http_url, first_sum), _metric(http_url, total_sum)
    text = ("The quick brown fox jumps over the lazy dog, and then it runs across the wide green field "
            "towards the river, where it stops to drink and rest for a while.")     # the model's rule: >= 2x its tokens
    arrivals = []
    start = time.perf_counter()
    with client.audio.speech.with_streaming_response.create(model="cosyvoice2", voice=voice, input=text) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        for piece in response.iter_bytes():
            arrivals.append((time.perf_counter() - start, piece))
    _wait_counted(http_url, total_sum, before_total)
    server_first_s = _metric(http_url, first_sum) - before_first
    server_total_s = _metric(http_url, total_sum) - before_total
    client_first_s = arrivals[0][0]
    samples, rate = _decoded_samples(b"".join(p for _, p in arrivals))
    assert rate == OUTPUT_SAMPLE_RATE_HZ and samples > 0
    assert len(arrivals) >= 2
    assert client_first_s < server_total_s, (client_first_s, server_first_s, server_total_s)
    with capsys.disabled():
        print(f"\nopenai client, no extras: first bytes {client_first_s * 1000:.0f} ms, gateway first chunk "
              f"{server_first_s * 1000:.0f} ms, gateway total {server_total_s * 1000:.0f} ms, "
              f"{samples / rate:.2f} s of audio in {len(arrivals)} pieces")


def test_models_list_says_the_weights_are_random(http_url, stack):
    model = httpx.get(f"{http_url}/v1/models").json()["data"][0]
    assert model["id"] == "cosyvoice2" and model["random_weights"] is True
    assert "RANDOM WEIGHTS" in model["notice"] and "not speech" in model["notice"]
    log = next(r.log for r in stack.records if r.name == "gateway")
    assert model["notice"] in open(log).read()


@pytest.mark.parametrize("speed", [2.0, 0.5])
def test_offline_speed_scales_the_audio_length(client, voice, speed):
    """OpenAI `speed` through the real token2wav stage: the whole utterance's mel stretched to int(F / speed)."""
    audio = client.audio.speech.create(model="cosyvoice2", voice=voice, input="Hello world.", response_format="wav",
                                       speed=speed, extra_body=_forced()).content
    wav, rate = sf.read(io.BytesIO(audio), dtype="float32")
    assert rate == OUTPUT_SAMPLE_RATE_HZ and np.all(np.isfinite(wav))
    assert wav.shape[0] == int(N_TOKENS * 2 / speed) * SAMPLES_PER_TOKEN // 2


def test_a_stream_asked_with_a_speed_is_served_whole_and_out_of_range_is_a_400(client, voice):
    """speed != 1 needs the whole utterance (CosyVoice2 stretches its mel): the body comes whole (Content-Length),
    not refused, whether streaming was the default or asked for."""
    for extra in ({}, {"stream": True}):
        with client.audio.speech.with_streaming_response.create(
                model="cosyvoice2", voice=voice, input="Hello world.", response_format="pcm", speed=2.0,
                extra_body=_forced(**extra)) as response:
            data = response.read()
            assert int(response.headers["content-length"]) == len(data)
        assert len(data) == int(N_TOKENS * 2 / 2.0) * SAMPLES_PER_TOKEN // 2 * PCM16_BYTES
    with pytest.raises(openai.BadRequestError, match=r"\[0.5, 2.0\]"):
        client.audio.speech.create(model="cosyvoice2", voice=voice, input="Hello world.", response_format="wav",
                                   speed=4.0, extra_body=_forced())


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_server_side_resampling(client, voice, rate):
    audio = client.audio.speech.create(model="cosyvoice2", voice=voice, input="Hello world.",
                                       response_format="wav", extra_body=_forced(sample_rate=rate)).content
    wav, got_rate = sf.read(io.BytesIO(audio), dtype="float32")
    assert got_rate == rate
    assert abs(wav.shape[0] - N_TOKENS * SAMPLES_PER_TOKEN * rate / OUTPUT_SAMPLE_RATE_HZ) <= 2


def test_opus_at_an_unsupported_rate_is_a_400(client, voice):
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="cosyvoice2", voice=voice, input="Hello world.", response_format="opus",
                                   extra_body=_forced(sample_rate=44100))
    error = info.value.response.json()["error"]
    assert "opus" in error["message"] and "48000" in error["message"] and error["param"] == "sample_rate"


def test_stream_false_gets_the_whole_body_with_a_length(client, voice):
    with client.audio.speech.with_streaming_response.create(
            model="cosyvoice2", voice=voice, input="Hello world.", response_format="mp3",
            extra_body=_forced(stream=False)) as response:
        data = response.read()
        assert int(response.headers["content-length"]) == len(data)
    samples, _ = _decoded_samples(data)
    assert abs(samples - N_TOKENS * SAMPLES_PER_TOKEN) < 0.1 * N_TOKENS * SAMPLES_PER_TOKEN


def test_stream_sends_pcm_chunks_as_they_are_produced(client, voice):
    tokens = 70                      # several schedule hops -> several token2wav calls -> several chunks
    arrivals, data = [], b""
    start = time.perf_counter()
    with client.audio.speech.with_streaming_response.create(
            model="cosyvoice2", voice=voice, input="Streaming speech.", response_format="pcm",
            extra_body=_forced(tokens, stream=True)) as response:
        assert response.headers["content-type"] == "audio/pcm"
        assert response.headers["x-sample-rate"] == str(OUTPUT_SAMPLE_RATE_HZ)
        for chunk in response.iter_bytes():
            arrivals.append((time.perf_counter() - start, len(data)))
            data += chunk
    total_s = time.perf_counter() - start
    assert len(data) == tokens * SAMPLES_PER_TOKEN * PCM16_BYTES
    assert len(arrivals) >= 2
    first_s, _ = arrivals[0]
    assert first_s < 0.8 * total_s, (arrivals, total_s)      # audio began before synthesis ended

    offline = client.audio.speech.create(model="cosyvoice2", voice=voice, input="Streaming speech.",
                                         response_format="pcm", extra_body=_forced(tokens)).content
    assert len(offline) == len(data)


def test_streamed_wav_has_one_header_and_plays(client, voice):
    with client.audio.speech.with_streaming_response.create(
            model="cosyvoice2", voice=voice, input="Hello world.", response_format="wav",
            extra_body=_forced(stream=True, sample_rate=16000)) as response:
        data = response.read()
    assert data[:4] == b"RIFF" and data.count(b"RIFF") == 1
    pcm = np.frombuffer(data[44:], "<i2")
    assert abs(pcm.shape[0] - N_TOKENS * SAMPLES_PER_TOKEN * 16000 / OUTPUT_SAMPLE_RATE_HZ) <= 2


def test_long_input_is_split_and_synthesised_back_to_back(client, voice):
    # No forced length (explicit bounds disable splitting), so the model's own rule decides; streamed, so
    # each token2wav call stays one chunk long even on a busy CPU.
    text = " ".join(["This sentence is here to make the input long enough to be split into segments."] * 6)
    with client.audio.speech.with_streaming_response.create(
            model="cosyvoice2", voice=voice, input=text, response_format="pcm",
            extra_body={"seed": 3, "stream": True}) as response:
        pcm = np.frombuffer(response.read(), "<i2")
    assert pcm.shape[0] > 0 and np.abs(pcm).max() > 0


def test_voice_registered_over_grpc_works_over_http_and_http_delete_removes_it(stack, client, http_url):
    name = f"grpc-{uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel(stack.gateway_grpc_url) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(speaker_id=name, prompt_audio=prompt_wav_bytes(seed=4),
                                                            prompt_text="Hi."), timeout=120)
        audio = client.audio.speech.create(model="cosyvoice2", voice=name, input="Hello.", response_format="pcm",
                                           extra_body=_forced()).content
        assert len(audio) == N_TOKENS * SAMPLES_PER_TOKEN * PCM16_BYTES
        assert httpx.delete(f"{http_url}/v1/audio/voices/{name}").json()["deleted"] is True
        listed = stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), timeout=10)
        assert name not in [s.speaker_id for s in listed.speakers]
    with pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model="cosyvoice2", voice=name, input="Hello.", extra_body=_forced())


def _token2wav_count(stack) -> int:
    url = stack.stage_grpc_urls("token2wav")[0]
    stats = triton_grpc.InferenceServerClient(url).get_inference_statistics("token2wav", as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


def _metric(http_url: str, needle: str) -> float:
    for line in httpx.get(f"{http_url}/metrics").text.splitlines():
        if line.startswith(needle):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_counted(http_url: str, needle: str, above: float) -> None:
    """Until the gateway's request counter `needle` passes `above` (it counts once the handler has ended, so
    its pipeline and every stage call it made are done)."""
    deadline = time.monotonic() + 120      # generous: a loaded 2-core machine
    while _metric(http_url, needle) <= above:
        assert time.monotonic() < deadline, f"the gateway never counted {needle}"
        time.sleep(0.2)


def _calls_of_a_barrier_request(stack) -> int:
    """One short gRPC request through the same gateway; its own token2wav call count."""
    with grpc.insecure_channel(stack.gateway_grpc_url) as channel:
        reply = tts_pb2_grpc.TextToSpeechStub(channel).Synthesize(tts_pb2.SynthesizeRequest(
            text="Barrier.", prompt_audio=prompt_wav_bytes(seed=9), prompt_text="p", min_speech_tokens=N_TOKENS,
            max_speech_tokens=N_TOKENS), timeout=120)
    return reply.timings.token2wav.calls


_ISSUED = 'cosyvoice_gateway_stage_calls_total{stage="token2wav"}'


def _assert_no_stage_call_after_the_cancel(stack, http_url: str, issued_before: float, served_before: int) -> None:
    """The cancelled request's handler has ended: the gateway issued few token2wav calls (a whole 1500-token
    request makes ~60) and issues none later: across a barrier request only that request's own calls are added.
    Counted where they are issued: a call the cancel abandoned in flight may still be executed by Triton after
    the handler has ended."""
    at_cancel = _metric(http_url, _ISSUED)
    assert at_cancel - issued_before <= 4, at_cancel - issued_before
    barrier = _calls_of_a_barrier_request(stack)
    assert _metric(http_url, _ISSUED) == at_cancel + barrier
    # What the stage served is bounded by what was issued: nothing reached it behind the gateway's back.
    assert _token2wav_count(stack) - served_before <= _metric(http_url, _ISSUED) - issued_before


def test_client_disconnect_cancels_the_stream_and_its_stage_work(client, voice, stack, http_url):
    cancelled = 'cosyvoice_gateway_requests_total{code="CANCELLED",rpc="http.speech.stream"}'
    before_cancels = _metric(http_url, cancelled)
    issued_before, served_before = _metric(http_url, _ISSUED), _token2wav_count(stack)
    with client.audio.speech.with_streaming_response.create(
            model="cosyvoice2", voice=voice, input="A very long one.", response_format="pcm",
            extra_body=_forced(1500, stream=True)) as response:
        next(response.iter_bytes())                       # first chunk arrived: leave (closes the connection)
    _wait_counted(http_url, cancelled, before_cancels)
    _assert_no_stage_call_after_the_cancel(stack, http_url, issued_before, served_before)


def test_client_timeout_cancels_an_offline_request(voice, stack, http_url):
    cancelled = 'cosyvoice_gateway_requests_total{code="CANCELLED",rpc="http.speech"}'
    before_cancels = _metric(http_url, cancelled)
    issued_before, served_before = _metric(http_url, _ISSUED), _token2wav_count(stack)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{http_url}/v1/audio/speech", timeout=1.0,
                   json={"model": "cosyvoice2", "voice": voice, "input": "A very long one.",
                         **_forced(1500, stream=False)})
    _wait_counted(http_url, cancelled, before_cancels)
    _assert_no_stage_call_after_the_cancel(stack, http_url, issued_before, served_before)
