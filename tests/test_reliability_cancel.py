"""Cancellation and deadlines free the llm stage's slot: its `llm_active_requests` gauge (Triton metrics port)
returns to 0 after a client cancels a stream or a deadline expires, on both RPCs, and its `llm_generated_tokens`
counter shows the request stopped short of its length (waits on those metrics, bounded generously)."""
from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import grpc
import pytest
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.contracts import LLMMetric
from cosyvoice_gateway.testing import prompt_wav_bytes

pytestmark = [pytest.mark.stack, pytest.mark.slow]
EVENT_BOUND_S = 120.0   # overall bound on waiting for an event (a loaded 2-core CI machine)
DEADLINE_S = 4.0        # the client's deadline: long before LONG tokens are made
LONG = 3000             # tokens (the API's bound): two minutes of audio, far longer than any test waits


def _metric(metrics_url: str, name: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    values = [float(m) for m in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)]
    assert values, f"{name} is not exported"
    return sum(values)


def _active(metrics_url: str) -> float:
    return _metric(metrics_url, LLMMetric.ACTIVE_REQUESTS)


def _generated(metrics_url: str) -> float:
    return _metric(metrics_url, LLMMetric.GENERATED_TOKENS)


def _wait_for(condition, failure: str, timeout_s: float = EVENT_BOUND_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.1)


def _wait_active(metrics_url: str, predicate, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        value = _active(metrics_url)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _long_request(seed: int) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text="A very long utterance.", prompt_audio=prompt_wav_bytes(seed=60), prompt_text="p",
                                     min_speech_tokens=LONG, max_speech_tokens=LONG,
                                     sampling=tts_pb2.SamplingParams(seed=seed))


@pytest.fixture(scope="module")
def llm_metrics(stage_servers) -> str:
    return stage_servers.metrics_url("llm")


def test_client_cancel_of_a_stream_frees_the_llm_slot(stack, llm_metrics):
    before = _generated(llm_metrics)

    async def run():
        async with grpc.aio.insecure_channel(stack.gateway_grpc_url) as channel:
            call = tts_pb2_grpc.TextToSpeechStub(channel).SynthesizeStream(_long_request(1))
            # Cancel while the llm decodes (the tiny model may finish many tokens before the first audio chunk).
            assert await asyncio.to_thread(_wait_active, llm_metrics, lambda v: v >= 1, EVENT_BOUND_S) >= 1
            call.cancel()
            cancelled_at = time.monotonic()
        value = await asyncio.to_thread(_wait_active, llm_metrics, lambda v: v == 0, EVENT_BOUND_S)
        return value, time.monotonic() - cancelled_at

    value, waited_s = asyncio.run(run())
    generated = _generated(llm_metrics) - before
    print(f"llm slot freed {waited_s:.2f} s after the stream was cancelled, {generated:.0f} of {LONG} tokens made")
    assert value == 0
    assert generated < LONG, "the llm ran to the end: the cancel did not reach it"


@pytest.mark.parametrize("streaming", [False, True], ids=["Synthesize", "SynthesizeStream"])
def test_deadline_is_propagated_and_frees_the_llm_slot(stack, llm_metrics, streaming):
    before = _generated(llm_metrics)
    with grpc.insecure_channel(stack.gateway_grpc_url) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        if streaming:
            call = stub.SynthesizeStream(_long_request(2), timeout=DEADLINE_S)
        else:
            call = stub.Synthesize.future(_long_request(3), timeout=DEADLINE_S)
        with pytest.raises(grpc.RpcError) as info:
            if streaming:
                for _ in call:
                    pass
            else:
                call.result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    # The llm stage took the request (it counted tokens for it: a counter, so there is no moment to miss), so what
    # stopped it short of the end below was the deadline.
    _wait_for(lambda: _generated(llm_metrics) > before, "the llm stage never generated a token for the request")
    _wait_for(lambda: _active(llm_metrics) == 0, "the llm stage kept the request after the client's deadline")
    generated = _generated(llm_metrics) - before
    print(f"{generated:.0f} of {LONG} tokens made before the deadline stopped the llm")
    assert generated < LONG, "the llm ran to the end: the deadline did not reach it"


def test_stream_handler_closed_at_its_yield_logs_cancelled_and_frees_the_llm_slot(stack, llm_metrics, tiny_model_dir,
                                                                                  caplog):
    """A client that cancels while grpc is still writing its last chunk: grpc's own task takes the cancel and the
    handler generator is closed at its `yield` (GeneratorExit, not CancelledError). Seen once under CI load as a
    stream that never logged CANCELLED. Driven here by hand: first chunk, then aclose()."""
    from cosyvoice_gateway.server import Gateway, GatewayConfig, TextToSpeechService

    urls = {name: ",".join(stack.stage_grpc_urls(name)) for name in ("tokenizer", "speaker", "llm", "token2wav")}
    config = GatewayConfig(model_dir=tiny_model_dir, tokenizer_urls=urls["tokenizer"], speaker_urls=urls["speaker"],
                           llm_urls=urls["llm"], token2wav_urls=urls["token2wav"], redis_url=stack.redis_url,
                           model_revision="test-handler-close", grpc_port=0, http_port=0)

    async def run():
        gateway = Gateway(config)
        try:
            handler = TextToSpeechService(gateway.pipeline).SynthesizeStream(_long_request(4), context=None)
            first = await handler.__anext__()
            assert first.audio and not first.is_final
            await handler.aclose()
            # Closed with the handler, not left to the garbage collector: no llm reader still running.
            readers = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.endswith("_read_llm")]
            assert all(t.done() for t in readers), readers
        finally:
            await gateway.stages.close()

    with caplog.at_level("INFO", logger="cosyvoice_gateway"):
        asyncio.run(run())
    assert any("status=CANCELLED" in record.getMessage() for record in caplog.records)
    # (The tiny model may have made all its tokens before the first chunk, so no token count is asserted.)
    assert _wait_active(llm_metrics, lambda v: v == 0, EVENT_BOUND_S) == 0
