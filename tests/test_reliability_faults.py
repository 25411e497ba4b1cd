"""Faults: a stage slow to start, a replica killed mid-stream, Redis stopped and restarted.

One extra stack of two llm and two token2wav replicas (tokenizer/speaker: the session's), and an in-process
gateway over it with a private Redis:
- while the replicas start, gateway health is NOT_SERVING; SERVING once they are ready;
- kill -9 one token2wav replica during streams: token2wav calls are stateless, so they are retried on the
  other replica and every stream completes; kill the llm replica that holds one of two
  streams: a stream that had audio fails UNAVAILABLE (or completes), never hangs; afterwards every request succeeds on the survivors;
- Redis down: requests still succeed (cache misses); Redis back: the cache hits again.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
import urllib.request
from dataclasses import replace

import grpc
import pytest
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.contracts import LLMMetric
from cosyvoice_common.stages import LLM, TOKEN2WAV
from cosyvoice_gateway.server import Gateway, GatewayConfig
from cosyvoice_gateway.testing import RedisProcess, free_port, prompt_wav_bytes
from cosyvoice_launcher.stack import Stack
from cosyvoice_launcher.triton import free_port_block
from cosyvoice_tools.testing import make_stack_config
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.stack, pytest.mark.slow]
OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE


def _request(i: int, n: int = 40, voice: int = 0) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text=f"Fault request {i}.", prompt_audio=prompt_wav_bytes(seed=90 + voice),
                                     prompt_text="v", min_speech_tokens=n, max_speech_tokens=n,
                                     sampling=tts_pb2.SamplingParams(seed=i + 1))


async def _stream(stub, request, first_chunk: asyncio.Event | None = None):
    """(status, audio bytes, cache_hit)."""
    audio, hit = [], False
    try:
        async for chunk in stub.SynthesizeStream(request, timeout=300):
            audio.append(chunk.audio)
            if first_chunk is not None:
                first_chunk.set()
            if chunk.is_final:
                hit = chunk.timings.cache_hit
        return OK, b"".join(audio), hit
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details(), hit
    finally:
        if first_chunk is not None:
            first_chunk.set()


def _llm_active(record) -> float:
    """Requests an llm replica holds now (its `llm_active_requests` gauge)."""
    url = f"http://127.0.0.1:{record.ports['metrics']}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    values = [float(v) for v in re.findall(rf"^{LLMMetric.ACTIVE_REQUESTS}\{{[^}}]*\}} (\S+)$", text, re.M)]
    assert values, f"{LLMMetric.ACTIVE_REQUESTS} is not exported at {url}"
    return sum(values)


async def _health(channel) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


def test_slow_start_replica_kill_and_redis_restart(stage_servers, tiny_model_dir, tmp_path):
    base = free_port_block(213)    # replica r of a stage at base_port + 10 r + (0, 1, 2): llm at +100, token2wav at +200
    config = make_stack_config(tiny_model_dir, tmp_path / "faults", stages=("llm", "token2wav"))
    # Fixed ports (free right now, below the ephemeral range) so the gateway can point at replicas not up yet.
    config = config.with_stage("llm", replicas=2, base_port=base + 100).with_stage("token2wav", replicas=2,
                                                                                    base_port=base + 200)
    grpc_urls = {s: f"127.0.0.1:{base + off + 1},127.0.0.1:{base + off + 11}" for s, off in (("llm", 100), ("token2wav", 200))}
    redis = RedisProcess(tmp_path).start()
    stack = Stack(replace(config, stage_urls={}))
    starter = threading.Thread(target=stack.start, daemon=True)

    async def run():
        gateway = Gateway(GatewayConfig(
            model_dir=tiny_model_dir, redis_url=redis.url, model_revision="faults", grpc_port=free_port(), http_port=0,
            tokenizer_urls=stage_servers.grpc_url("tokenizer"), speaker_urls=stage_servers.grpc_url("speaker"),
            llm_urls=grpc_urls["llm"], token2wav_urls=grpc_urls["token2wav"], stage_timeout_s=120.0,
            readiness_interval_s=0.3))
        await gateway.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = tts_pb2_grpc.TextToSpeechStub(channel)
                # 1. slow start: NOT_SERVING until every stage has a ready replica.
                starter.start()
                seen_not_serving = False
                while starter.is_alive():
                    status = await _health(channel)
                    seen_not_serving |= status == health_pb2.HealthCheckResponse.NOT_SERVING
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        # SERVING = every stage has a ready replica (not all of them: the second may still load)
                        health = stack.health()
                        for stage in ("llm", "token2wav"):
                            assert any(health.get(r.name) for r in stack.stage_records(stage)), \
                                f"SERVING before a {stage} replica was ready: {health}"
                    await asyncio.sleep(0.3)
                assert seen_not_serving and stack.records, "the stack did not start"
                deadline = time.monotonic() + 30
                while await _health(channel) != health_pb2.HealthCheckResponse.SERVING:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
                assert (await _stream(stub, _request(0, n=6)))[0] == OK
                # SERVING needs one ready replica per stage; the kill below needs a second one to fail over to.
                deadline = time.monotonic() + 180
                while not all(stack.health().values()):
                    assert time.monotonic() < deadline, stack.health()
                    await asyncio.sleep(0.5)
                # the gateway's readiness loop sees every replica ready (else both streams below go to one)
                deadline = time.monotonic() + 60
                while not all(r.ready for s in (gateway.stages[LLM], gateway.stages[TOKEN2WAV]) for r in s._replicas):
                    assert time.monotonic() < deadline, "the gateway never saw every replica ready"
                    await asyncio.sleep(0.2)

                # 2. kill a token2wav replica mid-stream: retried on the other one, streams complete.
                firsts = [asyncio.Event() for _ in range(2)]
                tasks = [asyncio.create_task(_stream(stub, _request(10 + i), firsts[i])) for i in range(2)]
                await asyncio.gather(*(e.wait() for e in firsts))
                os.killpg(stack.stage_records("token2wav")[0].pid, signal.SIGKILL)   # the whole replica: server and its stub
                results = await asyncio.gather(*tasks)
                assert [r[0] for r in results] == [OK, OK], results
                assert all(len(r[1]) == 2 * 40 * 960 for r in results)

                # 3. kill an llm replica while it generates a stream: UNAVAILABLE (audio was already sent) or OK,
                # never a hang. Killed once its llm_active_requests shows it holds a stream (the tiny llm may end
                # 400 tokens before the first audio chunk, so the first chunk is no sign that it still does).
                tasks = [asyncio.create_task(_stream(stub, _request(20 + i, n=400))) for i in range(2)]
                victim = stack.stage_records("llm")[0]
                deadline = time.monotonic() + 120
                while await asyncio.to_thread(_llm_active, victim) < 1:
                    assert time.monotonic() < deadline, "no stream was ever on the llm replica about to be killed"
                    await asyncio.sleep(0.05)
                os.killpg(victim.pid, signal.SIGKILL)   # the whole replica: server and its stub
                results = await asyncio.wait_for(asyncio.gather(*tasks), 300)
                assert {r[0] for r in results} <= {OK, UNAVAILABLE}, results
                # 4. later requests succeed on the surviving replicas (dead ones marked down / retried).
                for i in range(4):
                    code, audio, _ = await _stream(stub, _request(30 + i, n=6))
                    assert code == OK, audio

                # 5. Redis stopped: no errors (misses); restarted: the cache resumes.
                redis.stop()
                for i in range(2):
                    code, audio, hit = await _stream(stub, _request(40 + i, n=6, voice=5))
                    assert code == OK and not hit, audio
                redis.start()
                # Redis is retried once Spk2InfoCache.retry_after_s has passed: requests with one voice go on until
                # one of them hits (an earlier one stored its features), within a generous bound.
                deadline = time.monotonic() + 90
                hit, i = False, 0
                while not hit:
                    assert time.monotonic() < deadline, "the prompt cache did not resume after Redis came back"
                    code, audio, hit = await _stream(stub, _request(50 + i, n=6, voice=6))
                    assert code == OK, audio
                    i += 1
        finally:
            await gateway.stop()

    try:
        asyncio.run(run())
    finally:
        starter.join(300)
        stack.stop()
        redis.stop()
