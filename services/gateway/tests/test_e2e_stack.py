"""End to end: a real gateway process over real tritonserver stage processes and Redis.

Stage URLs come from the root conftest's `stack` fixture; for development, GATEWAY_TEST_STACK_JSON may
name a JSON file {tokenizer, speaker, llm, token2wav, redis} of stages already running.
"""
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.constants import MEL_HOP_SAMPLES, SAMPLES_PER_TOKEN, SPEECH_ID_OFFSET, TOKEN_MEL_RATIO
from cosyvoice_gateway.testing import TEST_STAGE_TIMEOUT_S, free_port, prompt_wav_bytes

pytestmark = [pytest.mark.stack, pytest.mark.slow]
STAGE_NAMES = ("tokenizer", "speaker", "llm", "token2wav")
REPO = Path(__file__).resolve().parents[3]
N_TOKENS = 20     # first chunk (15 + 3) then the final chunk: two token2wav calls, fast on CPU


@pytest.fixture(scope="module")
def stage_urls(request):
    path = os.environ.get("GATEWAY_TEST_STACK_JSON")
    if path:
        return json.loads(Path(path).read_text())
    stack = request.getfixturevalue("stack")
    urls = {name: ",".join(stack.stage_grpc_urls(name)) for name in STAGE_NAMES}
    urls["redis"] = stack.redis_url
    urls["model_dir"] = str(request.getfixturevalue("tiny_model_dir"))   # the model the stages serve
    return urls


class GatewayProcess:
    def __init__(self, urls: dict, revision: str, tmp: Path) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = dict(os.environ, TOKENIZER_URLS=urls["tokenizer"], SPEAKER_URLS=urls["speaker"],
                        LLM_URLS=urls["llm"], TOKEN2WAV_URLS=urls["token2wav"], REDIS_URL=urls["redis"],
                        MODEL_REVISION=revision, GRPC_PORT=str(self.port), HTTP_PORT="0",
                        METRICS_PORT=str(self.metrics_port),
                        MODEL_DIR=urls.get("model_dir") or os.environ.get("MODEL_DIR", str(REPO / "models/cosyvoice2-tiny")),
                        READINESS_INTERVAL_S="0.5", STAGE_TIMEOUT_S=TEST_STAGE_TIMEOUT_S)
        self.log = tmp / f"gateway-{self.port}.log"
        self.proc = None

    def start(self) -> "GatewayProcess":
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "cosyvoice_gateway.server"], env=self.env,
                                         stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        asyncio.run(self._wait_serving())
        return self

    async def _wait_serving(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.addr) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"gateway not SERVING after {timeout_s} s:\n{self.log.read_text()}")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, needle: str) -> float:
        """The value of the Prometheus sample whose line starts with `needle` (0 before it is first counted)."""
        for line in httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text.splitlines():
            if line.startswith(needle):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture(scope="module")
def gateway(stage_urls, tmp_path_factory):
    proc = GatewayProcess(stage_urls, f"test-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("gw")).start()
    yield proc
    proc.stop()


def _request(**kw) -> tts_pb2.SynthesizeRequest:
    kw.setdefault("prompt_audio", prompt_wav_bytes(seed=kw.pop("voice_seed", 0)))
    kw.setdefault("prompt_text", "a short prompt")
    kw.setdefault("text", "Hello world, this is a test.")
    return tts_pb2.SynthesizeRequest(min_speech_tokens=N_TOKENS, max_speech_tokens=N_TOKENS,
                                     sampling=tts_pb2.SamplingParams(seed=7), **kw)


async def _stream(addr: str, request) -> list[tts_pb2.AudioChunk]:
    async with grpc.aio.insecure_channel(addr) as channel:
        return [c async for c in tts_pb2_grpc.TextToSpeechStub(channel).SynthesizeStream(request)]


async def _unary(addr: str, request) -> tts_pb2.SynthesizeResponse:
    async with grpc.aio.insecure_channel(addr) as channel:
        return await tts_pb2_grpc.TextToSpeechStub(channel).Synthesize(request)


def test_streaming_chunks_concatenate_to_960_samples_per_token_with_one_wav_header(gateway):
    chunks = asyncio.run(_stream(gateway.addr, _request(encoding=tts_pb2.WAV, voice_seed=1)))
    assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) >= 3
    assert chunks[-1].is_final and not any(c.is_final for c in chunks[:-1])
    assert chunks[0].audio[:4] == b"RIFF" and not any(c.audio[:4] == b"RIFF" for c in chunks[1:])
    wav, rate = sf.read(io.BytesIO(b"".join(c.audio for c in chunks)), dtype="int16")
    assert rate == 24000 and wav.shape[0] == N_TOKENS * SAMPLES_PER_TOKEN
    timings = chunks[-1].timings
    assert timings.speech_tokens == N_TOKENS and timings.token2wav.calls == 2 and 0 < timings.first_chunk_ms <= timings.total_ms


# The chunk schedule of spec 7, written out here rather than taken from `cosyvoice_gateway.schedule`, for
# N_TOKENS = 20: (token_offset, end, finalize). Chunk 0 emits the first 15 tokens once 15 + 3 lookahead exist;
# the final chunk emits the rest from the whole sequence.
SPEC_SCHEDULE = ((0, 18, False), (15, 20, True))
SAME_AUDIO = dict(rtol=1e-4, atol=1e-4)   # a served call may run padded in a batch bucket
# tts.proto's bound for a seeded request served again (SamplingParams.seed), and the state cache's against a full
# recompute (services/token2wav/tests/test_engine_state_cache.py): HiFT's phase drift, not a different computation
SEEDED_REPEAT = dict(rtol=0, atol=2e-3)


@pytest.fixture(scope="module")
def in_process_token2wav(stage_urls):
    """The engine the served token2wav wraps, in this process on the same model dir (float32, cpu)."""
    from cosyvoice_token2wav.engine import Token2WavEngine
    return Token2WavEngine(Path(stage_urls["model_dir"]), "cpu", torch.float32)


def _recorded_token2wav_inputs(model_dir: str, request, record_dir: Path) -> list[dict[str, np.ndarray]]:
    """The token2wav inputs of the in-process pipeline (same stage code, no Triton, no gRPC, no Redis) for
    `request`, one dict per call in call order."""
    from cosyvoice_tools.local import LocalPipeline
    from cosyvoice_gateway.server import to_request

    async def run():
        local = LocalPipeline.create(model_dir, "cpu", record_dir=record_dir)
        try:
            await local.synthesize(to_request(request), streaming=True)
        finally:
            await local.close()
    asyncio.run(run())
    return [dict(np.load(f)) for f in sorted((record_dir / "token2wav").glob("*.npz"))]


def _reference_chunks(runner, recorded: dict[str, np.ndarray], seed: int, schedule) -> list[np.ndarray]:
    """In-process token2wav over `schedule`, the vocoder cache carried from chunk to chunk."""
    from cosyvoice_token2wav.sequence import ChunkRequest, chunk_seed

    codes = lambda name: torch.from_numpy(recorded[name].astype(np.int64).reshape(1, -1) - SPEECH_ID_OFFSET)  # noqa: E731
    tokens, cache, chunks = codes("target_speech_tokens"), None, []
    for token_offset, end, finalize in schedule:
        result = runner.run_chunks([ChunkRequest(
            tokens=tokens[:, :end], prompt_tokens=codes("prompt_speech_tokens"),
            prompt_feat=torch.from_numpy(recorded["prompt_speech_feat"].astype(np.float32))[None],
            embedding=torch.from_numpy(recorded["prompt_spk_embedding"].astype(np.float32)).reshape(1, -1),
            token_offset=token_offset, finalize=finalize, streaming=not finalize, cache=cache,
            seed=chunk_seed(seed, token_offset))])[0]
        assert result.error is None, result.error
        cache = result.cache
        chunks.append(result.waveform.numpy().reshape(-1))
    return chunks


def _audio_chunks(chunks: list[tts_pb2.AudioChunk]) -> list[np.ndarray]:
    """The float32 audio of each chunk; the final chunk may be an empty end-of-stream marker with the timings."""
    assert chunks and chunks[-1].is_final
    if not chunks[-1].audio:
        chunks = chunks[:-1]
    return [np.frombuffer(c.audio, "<f4") for c in chunks]


def test_served_stream_is_the_in_process_token2wav_chunk_by_chunk(gateway, stage_urls, in_process_token2wav,
                                                                      tmp_path):
    """Served chunks (gateway -> Redis -> four tritonservers) against token2wav run here over the spec's schedule
    on the tokens and prompt features the in-process pipeline produces for the same request and seed."""
    request = _request(encoding=tts_pb2.FLOAT32, voice_seed=2)
    served = _audio_chunks(asyncio.run(_stream(gateway.addr, request)))
    recorded = _recorded_token2wav_inputs(stage_urls["model_dir"], request, tmp_path)
    whole = recorded[-1]                       # the final call holds every token
    assert whole["target_speech_tokens"].size == N_TOKENS
    reference = _reference_chunks(in_process_token2wav, whole, request.sampling.seed, SPEC_SCHEDULE)
    assert [c.size for c in served] == [c.size for c in reference]
    assert sum(c.size for c in served) == N_TOKENS * SAMPLES_PER_TOKEN
    for index, (got, want) in enumerate(zip(served, reference)):
        # the served stream read its prompt's blocks from the state cache (the prefill): the state cache's bound
        np.testing.assert_allclose(got, want, **SEEDED_REPEAT, err_msg=f"chunk {index}")
    again = _audio_chunks(asyncio.run(_stream(gateway.addr, request)))
    for a, b in zip(again, served, strict=True):   # the proto's bound: the state cache now holds this stream
        np.testing.assert_allclose(a, b, **SEEDED_REPEAT)
    # Offline: one token2wav call over every token, without offset or cache.
    offline = np.frombuffer(asyncio.run(_unary(gateway.addr, request)).audio, "<f4")
    (offline_reference,) = _reference_chunks(in_process_token2wav, whole, request.sampling.seed,
                                             ((0, N_TOKENS, True),))
    np.testing.assert_allclose(offline, offline_reference, **SAME_AUDIO)


def test_seeded_streams_repeat_within_the_proto_bound_alone_or_together(gateway):
    """Seeded streams long enough for the state cache to matter (four chunks), each alone, then both at once,
    then both again: the speech tokens repeat exactly (same lengths), the audio within SamplingParams.seed's
    bound, whatever the company and whatever the state cache held."""
    def request(voice_seed: int) -> tts_pb2.SynthesizeRequest:
        r = _request(encoding=tts_pb2.FLOAT32, voice_seed=voice_seed)
        r.min_speech_tokens = r.max_speech_tokens = 120
        return r

    async def together():
        return await asyncio.gather(_stream(gateway.addr, request(8)), _stream(gateway.addr, request(9)))
    alone = [np.concatenate(_audio_chunks(asyncio.run(_stream(gateway.addr, request(v))))) for v in (8, 9)]
    for run in range(2):
        both = [np.concatenate(_audio_chunks(chunks)) for chunks in asyncio.run(together())]
        for got, want in zip(both, alone):
            assert got.shape == want.shape == (120 * SAMPLES_PER_TOKEN,), f"run {run}"
            np.testing.assert_allclose(got, want, **SEEDED_REPEAT, err_msg=f"run {run}")
            assert np.linalg.norm(got - want) <= 2e-3 * np.linalg.norm(want)


def test_speed_stretches_an_offline_utterance_and_a_stream_refuses_it(gateway):
    """gRPC `speed` (0 = 1.0) is the reference's: the whole utterance's mel stretched to int(2 T / speed) frames."""
    for speed in (2.0, 0.5):
        reply = asyncio.run(_unary(gateway.addr, _request(speed=speed, voice_seed=4)))
        assert len(reply.audio) == int(N_TOKENS * TOKEN_MEL_RATIO / speed) * MEL_HOP_SAMPLES * 2   # 16-bit PCM
    default = asyncio.run(_unary(gateway.addr, _request(voice_seed=4)))
    assert len(default.audio) == N_TOKENS * SAMPLES_PER_TOKEN * 2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(_stream(gateway.addr, _request(speed=2.0, voice_seed=4)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs offline synthesis" in info.value.details()


def test_stream_chunks_say_which_text_segment_they_speak(gateway):
    """A long text under the text frontend is split into sentences; each chunk names its segment (progress)."""
    sentence = "This sentence is here to make the input long enough to be split into segments."
    request = tts_pb2.SynthesizeRequest(text=" ".join([sentence] * 6), prompt_audio=prompt_wav_bytes(seed=5),
                                        prompt_text="a short prompt", text_frontend=True,
                                        sampling=tts_pb2.SamplingParams(seed=3))
    chunks = asyncio.run(_stream(gateway.addr, request))
    total = chunks[0].segments
    assert total >= 2 and all(c.segments == total for c in chunks)
    indices = [c.segment for c in chunks]
    assert indices == sorted(indices) and indices[0] == 0 and indices[-1] == total - 1
    assert set(indices) == set(range(total))        # every segment spoke (the final chunk names the last one)


def test_second_request_with_the_same_prompt_hits_the_cache(gateway):
    first = asyncio.run(_unary(gateway.addr, _request(voice_seed=3)))
    second = asyncio.run(_unary(gateway.addr, _request(voice_seed=3)))
    assert not first.timings.cache_hit and first.timings.tokenizer.calls == 1 and first.timings.speaker.calls == 1
    assert second.timings.cache_hit and second.timings.tokenizer.calls == 0 and second.timings.speaker.calls == 0


def test_registered_speaker_works_and_survives_a_gateway_restart(stage_urls, tmp_path):
    revision = f"test-{uuid.uuid4().hex[:8]}"
    gw = GatewayProcess(stage_urls, revision, tmp_path).start()

    async def register_and_use(addr):
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = tts_pb2_grpc.TextToSpeechStub(channel)
            reply = await stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(
                speaker_id="alice", prompt_audio=prompt_wav_bytes(seed=4), prompt_text="alice speaking"))
            assert reply.speaker.prompt_speech_tokens > 0
            response = await stub.Synthesize(_request(speaker_id="alice", prompt_audio=b"", prompt_text=""))
            assert len(response.audio) == 2 * N_TOKENS * SAMPLES_PER_TOKEN

    asyncio.run(register_and_use(gw.addr))
    assert gw.stop() == 0        # graceful SIGTERM exit
    gw = GatewayProcess(stage_urls, revision, tmp_path).start()

    async def still_there(addr):
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = tts_pb2_grpc.TextToSpeechStub(channel)
            speakers = (await stub.ListSpeakers(tts_pb2.ListSpeakersRequest())).speakers
            by_id = {s.speaker_id: s for s in speakers}    # plus "001", imported from the model's spk2info.pt
            assert set(by_id) - {"001"} == {"alice"} and by_id["alice"].prompt_text == "alice speaking"
            chunks = [c async for c in stub.SynthesizeStream(_request(speaker_id="alice", prompt_audio=b"", prompt_text=""))]
            assert chunks[-1].timings.cache_hit and chunks[-1].timings.speech_tokens == N_TOKENS
            assert (await stub.DeleteSpeaker(tts_pb2.DeleteSpeakerRequest(speaker_id="alice"))).deleted

    try:
        asyncio.run(still_there(gw.addr))
    finally:
        gw.stop()


def _token2wav_count(url: str) -> int:
    stats = triton_grpc.InferenceServerClient(url.split(",")[0]).get_inference_statistics("token2wav", as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


def test_cancelled_stream_stops_issuing_stage_calls(gateway, stage_urls):
    issued = 'cosyvoice_gateway_stage_calls_total{stage="token2wav"}'
    issued_before = gateway.metric(issued)
    served_before = _token2wav_count(stage_urls["token2wav"])
    cancels_before = gateway.log.read_text().count("status=CANCELLED")

    async def run():
        async with grpc.aio.insecure_channel(gateway.addr) as channel:
            call = tts_pb2_grpc.TextToSpeechStub(channel).SynthesizeStream(tts_pb2.SynthesizeRequest(
                text="A long one.", prompt_audio=prompt_wav_bytes(seed=5), prompt_text="p",
                min_speech_tokens=1500, max_speech_tokens=1500))
            async for _ in call:
                break                  # first chunk arrived: leave
            call.cancel()
    asyncio.run(run())
    # The handler logs once its pipeline is closed: wait for that line (generous bound: a loaded 2-core CI machine).
    deadline = time.monotonic() + 120
    while gateway.log.read_text().count("status=CANCELLED") <= cancels_before:
        assert time.monotonic() < deadline, gateway.log.read_text()
        time.sleep(0.2)
    # The gateway issued few token2wav calls (the whole request would make ~60) and issues none later: across a
    # barrier request only that request's own calls are added. (Counted where they are issued: a call the cancel
    # abandoned in flight may still be executed by Triton after the handler has ended.)
    at_cancel = gateway.metric(issued)
    assert at_cancel - issued_before <= 4, at_cancel - issued_before
    barrier = asyncio.run(_unary(gateway.addr, _request(voice_seed=6)))
    assert gateway.metric(issued) == at_cancel + barrier.timings.token2wav.calls
    # What the stage served is bounded by what was issued: nothing reached it behind the gateway's back.
    assert _token2wav_count(stage_urls["token2wav"]) - served_before <= gateway.metric(issued) - issued_before


def test_sigterm_lets_an_http_request_in_flight_finish_and_stops_without_a_traceback(stage_urls, tmp_path):
    """SIGTERM while an HTTP synthesis is running: the request still gets its whole audio (uvicorn's own graceful
    shutdown, bounded by GRACE_S), the process exits 0, and the log ends with the gateway's own line, not a traceback
    from a cancelled HTTP server."""
    from concurrent.futures import ThreadPoolExecutor

    gw = GatewayProcess(stage_urls, f"test-{uuid.uuid4().hex[:8]}", tmp_path)
    http_port = free_port()
    gw.env.update(HTTP_PORT=str(http_port), GRACE_S="60")
    gw.start()

    async def register(addr):
        async with grpc.aio.insecure_channel(addr) as channel:
            await tts_pb2_grpc.TextToSpeechStub(channel).RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(
                speaker_id="bob", prompt_audio=prompt_wav_bytes(seed=5), prompt_text="bob speaking"))

    asyncio.run(register(gw.addr))
    tokens = 60
    llm_calls = 'cosyvoice_gateway_stage_calls_total{stage="llm"}'
    before = gw.metric(llm_calls)
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(httpx.post, f"http://127.0.0.1:{http_port}/v1/audio/speech", timeout=120, json={
            "model": "cosyvoice2", "voice": "bob", "input": "Still speaking when told to stop.",
            "response_format": "pcm", "min_speech_tokens": tokens, "max_speech_tokens": tokens})
        deadline = time.monotonic() + 60
        while gw.metric(llm_calls) == before:         # the request is in flight once its llm call is issued
            assert time.monotonic() < deadline and not reply.done(), "the HTTP request never reached the llm"
            time.sleep(0.05)
        exit_code = gw.stop()
        response = reply.result(timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.content) == tokens * SAMPLES_PER_TOKEN * 2
    assert exit_code == 0
    log = gw.log.read_text()
    assert "gateway: stopped" in log and "Traceback" not in log, log[-3000:]
