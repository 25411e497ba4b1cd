"""Bounded soak on loopback: SOAK_REQUESTS (default 24) streaming requests at SOAK_CONCURRENCY (default 4) through
a gateway process over the session's stage servers, short forced lengths. Zero errors, and the gateway's RSS
(psutil) grows by less than SOAK_RSS_GROWTH_MB (default 64) from after warm-up to the end. Prints the figures
(requests, errors, p50/p99 latency, RSS start/end)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_gateway.testing import free_port, prompt_wav_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REQUESTS = int(os.environ.get("SOAK_REQUESTS", "24"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "4"))
RSS_GROWTH_MB = float(os.environ.get("SOAK_RSS_GROWTH_MB", "64"))
N_TOKENS = 6
REPO = Path(__file__).resolve().parents[1]
VOICES = [prompt_wav_bytes(seed=80 + i) for i in range(4)]


def _request(i: int) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text=f"Soak request {i}.", prompt_audio=VOICES[i % len(VOICES)], prompt_text="v",
                                     min_speech_tokens=N_TOKENS, max_speech_tokens=N_TOKENS,
                                     sampling=tts_pb2.SamplingParams(seed=i + 1))


async def _wait_serving(addr: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(addr) as channel:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "gateway exited"
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("gateway not SERVING")


def test_soak_has_no_errors_and_bounded_gateway_rss(stack, tiny_model_dir, tmp_path):
    port = free_port()
    env = dict(os.environ, GRPC_PORT=str(port), HTTP_PORT="0", METRICS_PORT="0", REDIS_URL=stack.redis_url,
               MODEL_DIR=str(tiny_model_dir), MODEL_REVISION="soak", STAGE_TIMEOUT_S="300", READINESS_INTERVAL_S="1",
               LOG_LEVEL="WARNING",
               **{f"{n.upper()}_URLS": ",".join(stack.stage_grpc_urls(n)) for n in ("tokenizer", "speaker", "llm", "token2wav")})
    log = tmp_path / "gateway.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cosyvoice_gateway.server"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO)
    addr = f"127.0.0.1:{port}"
    try:
        asyncio.run(_wait_serving(addr, proc))
        gateway = psutil.Process(proc.pid)

        async def run():
            latencies, errors = [], []
            async with grpc.aio.insecure_channel(addr) as channel:
                stub = tts_pb2_grpc.TextToSpeechStub(channel)
                for i in range(len(VOICES)):            # warm-up: every voice cached, code paths loaded
                    [c async for c in stub.SynthesizeStream(_request(i), timeout=300)]
                rss_start = gateway.memory_info().rss
                queue: asyncio.Queue[int] = asyncio.Queue()
                for i in range(REQUESTS):
                    queue.put_nowait(i)

                async def worker():
                    while not queue.empty():
                        i = queue.get_nowait()
                        start = time.perf_counter()
                        try:
                            chunks = [c async for c in stub.SynthesizeStream(_request(i), timeout=300)]
                            assert chunks[-1].is_final and chunks[-1].timings.speech_tokens == N_TOKENS
                            latencies.append(time.perf_counter() - start)
                        except (grpc.aio.AioRpcError, AssertionError) as exc:
                            errors.append(repr(exc)[:300])

                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
                return latencies, errors, rss_start, gateway.memory_info().rss, time.perf_counter() - started

        latencies, errors, rss_start, rss_end, wall_s = asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(30)
    mb = 1 / (1 << 20)
    p50, p99 = (np.percentile(latencies, q) if latencies else float("nan") for q in (50, 99))
    print(f"\nsoak: {REQUESTS} requests at concurrency {CONCURRENCY}, {N_TOKENS} tokens each, {wall_s:.1f} s: "
          f"errors {len(errors)}, latency p50 {p50:.2f} s p99 {p99:.2f} s, gateway RSS {rss_start * mb:.1f} -> "
          f"{rss_end * mb:.1f} MiB")
    assert not errors, errors[:5]
    assert len(latencies) == REQUESTS
    assert (rss_end - rss_start) * mb < RSS_GROWTH_MB
