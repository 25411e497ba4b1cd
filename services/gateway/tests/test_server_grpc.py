"""The gRPC surface without stage servers: errors on both RPCs, health gating, speaker registry, reflection."""
import asyncio
import re
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.stages import STAGE_NAMES, TOKEN2WAV
from cosyvoice_gateway.pipeline import StageTimings
from cosyvoice_gateway.server import SERVICE_NAME, Gateway, GatewayConfig, timings_proto
from cosyvoice_gateway.stage_client import CallTiming
from cosyvoice_gateway.testing import char_encoder, free_port, prompt_wav_bytes

UNREACHABLE = "127.0.0.1:1"


def _config(redis_url: str) -> GatewayConfig:
    return GatewayConfig(model_dir=Path("unused"), tokenizer_urls=UNREACHABLE, speaker_urls=UNREACHABLE,
                         llm_urls=UNREACHABLE, token2wav_urls=UNREACHABLE, redis_url=redis_url,
                         model_revision="test", grpc_port=free_port(), http_port=0, metrics_port=0,
                         stage_timeout_s=0.5, readiness_interval_s=0.2, grace_s=1.0)


def run_with_gateway(redis_url: str, body):
    async def run():
        gateway = Gateway(_config(redis_url), encode_text=char_encoder)
        await gateway.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                await body(channel)
        finally:
            await gateway.stop()
    asyncio.run(run())


async def _both_rpcs_fail(stub, request) -> list[grpc.aio.AioRpcError]:
    errors = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Synthesize(request)
    errors.append(info.value)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.SynthesizeStream(request):
            pass
    errors.append(info.value)
    return errors


def _no_addresses(message: str) -> str:
    return re.sub(r"0x[0-9a-f]+", "0x", message)   # libsndfile names the BytesIO object by address


BAD = [
    (tts_pb2.SynthesizeRequest(text="", prompt_audio=prompt_wav_bytes()), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (tts_pb2.SynthesizeRequest(text="hi"), grpc.StatusCode.INVALID_ARGUMENT, "no voice"),
    (tts_pb2.SynthesizeRequest(text="hi", prompt_audio=b"garbage"), grpc.StatusCode.INVALID_ARGUMENT, "decode"),
    (tts_pb2.SynthesizeRequest(text="hi", prompt_audio=prompt_wav_bytes(0.1)), grpc.StatusCode.INVALID_ARGUMENT, "short"),
    (tts_pb2.SynthesizeRequest(text="hi", speaker_id="ghost"), grpc.StatusCode.NOT_FOUND, "ghost"),
    (tts_pb2.SynthesizeRequest(text="hi", prompt_audio=prompt_wav_bytes(), min_speech_tokens=9, max_speech_tokens=3),
     grpc.StatusCode.INVALID_ARGUMENT, "min_speech_tokens"),
    (tts_pb2.SynthesizeRequest(text="hi", prompt_audio=prompt_wav_bytes(), max_speech_tokens=99999),
     grpc.StatusCode.INVALID_ARGUMENT, "limit"),
    (tts_pb2.SynthesizeRequest(text="hi", prompt_audio=prompt_wav_bytes(), sample_rate=11111),
     grpc.StatusCode.INVALID_ARGUMENT, "sample_rate"),
    (tts_pb2.SynthesizeRequest(text="hi", prompt_audio=prompt_wav_bytes(), encoding=42),
     grpc.StatusCode.INVALID_ARGUMENT, "encoding"),
]


def test_bad_input_gets_the_same_status_and_message_on_both_rpcs(gateway_redis):
    async def body(channel):
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        for request, code, fragment in BAD:
            unary, stream = await _both_rpcs_fail(stub, request)
            assert unary.code() == stream.code() == code, (request, unary.details())
            assert fragment in unary.details()
            assert _no_addresses(unary.details()) == _no_addresses(stream.details())
    run_with_gateway(gateway_redis.url, body)


def test_stage_outage_is_unavailable_not_a_traceback(gateway_redis):
    async def body(channel):
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        request = tts_pb2.SynthesizeRequest(text="hello", prompt_audio=prompt_wav_bytes(), prompt_text="hi")
        for error in await _both_rpcs_fail(stub, request):
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "tokenizer" in error.details() or "speaker" in error.details()
    run_with_gateway(gateway_redis.url, body)


def test_health_is_not_serving_while_stages_are_down_and_reflection_lists_the_service(gateway_redis):
    async def body(channel):
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for reply in reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
            names = {s.name for s in reply.list_services_response.service}
            assert SERVICE_NAME in names and "grpc.health.v1.Health" in names
    run_with_gateway(gateway_redis.url, body)


def test_speaker_registry_rpcs_and_unavailable_registry(gateway_redis):
    async def body(channel):
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        assert list((await stub.ListSpeakers(tts_pb2.ListSpeakersRequest())).speakers) == []
        assert not (await stub.DeleteSpeaker(tts_pb2.DeleteSpeakerRequest(speaker_id="nobody"))).deleted
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(speaker_id="bad id!", prompt_audio=b"x"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        gateway_redis.stop()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListSpeakers(tts_pb2.ListSpeakersRequest())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    run_with_gateway(gateway_redis.url, body)


def test_each_registered_stage_has_its_timing_field_in_the_reply_under_its_name():
    """The message's field names are a public contract; timings_proto fills them by stage name."""
    timings = StageTimings()
    timings.record(TOKEN2WAV, CallTiming(queue_ms=1.0, compute_ms=2.0))
    message = timings_proto(timings)
    stage_fields = {f.name for f in tts_pb2.StageTimings.DESCRIPTOR.fields if f.message_type is not None}
    assert stage_fields == set(STAGE_NAMES)
    assert message.token2wav.calls == 1 and message.token2wav.compute_ms == 2.0 and message.llm.calls == 0
