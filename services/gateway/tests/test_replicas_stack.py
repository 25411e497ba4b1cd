"""Replicas for real: the launcher starts two tokenizer and two token2wav tritonservers on CPU, the gateway
spreads requests over both (each replica's Triton statistics count executions), and once one token2wav
replica is stopped later requests still succeed on the other."""
import asyncio
import json
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.constants import SAMPLES_PER_TOKEN
from cosyvoice_gateway.testing import prompt_wav_bytes
from cosyvoice_launcher.stack import Stack
from cosyvoice_tools.testing import make_stack_config
from cosyvoice_launcher.triton import stop_pid

pytestmark = [pytest.mark.stack, pytest.mark.slow]
N_TOKENS = 20      # streaming: first chunk (15 + 3 lookahead) and the final one, two token2wav calls


@pytest.fixture(scope="module")
def replicated(tiny_model_dir, tmp_path_factory):
    config = make_stack_config(tiny_model_dir, tmp_path_factory.mktemp("replicas"), gateway=True, redis=True)
    config = config.with_stage("tokenizer", replicas=2).with_stage("token2wav", replicas=2)
    # Keep make_stack_config's long stage timeout (a loaded 2-core CI host): replacing it dropped it once.
    config = replace(config, gateway_env={**config.gateway_env, "READINESS_INTERVAL_S": "0.5", "METRICS_PORT": "0"})
    stack = Stack(config).start()
    yield stack
    stack.stop()


def executions(stack: Stack, stage: str) -> list[int]:
    """Per replica of `stage`: Triton's execution count of its model (/v2/models/stats)."""
    counts = []
    for record in stack.stage_records(stage):
        with urllib.request.urlopen(f"http://127.0.0.1:{record.ports['http']}/v2/models/stats", timeout=5) as r:
            stats = json.load(r)["model_stats"]
        counts.append(sum(int(m.get("execution_count", 0)) for m in stats))
    return counts


def _request(seed: int) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text="Hello world, this is a test.", prompt_audio=prompt_wav_bytes(seed=seed),
                                     prompt_text="a short prompt", min_speech_tokens=N_TOKENS,
                                     max_speech_tokens=N_TOKENS, sampling=tts_pb2.SamplingParams(seed=7))


async def _synthesize(addr: str, seeds: list[int]) -> list[list[tts_pb2.AudioChunk]]:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)

        async def one(seed):
            return [c async for c in stub.SynthesizeStream(_request(seed), timeout=120)]
        return await asyncio.gather(*(one(s) for s in seeds))


def _audio_samples(chunks) -> int:
    return sum(len(c.audio) for c in chunks) // 2      # PCM16 default


def test_two_replicas_each_serve_and_a_stopped_one_is_skipped(replicated):
    stack = replicated
    records = stack.stage_records("token2wav")
    assert [(r.name, r.device, r.cuda_visible_devices, r.instances) for r in records] == \
        [("token2wav-0", "cpu", "", 1), ("token2wav-1", "cpu", "", 1)]
    before = {s: executions(stack, s) for s in ("tokenizer", "token2wav")}

    # Four new prompts (cache misses: a tokenizer call each), two token2wav calls each, two at a time.
    results = asyncio.run(_synthesize(stack.gateway_grpc_url, [101, 102, 103, 104]))
    assert all(_audio_samples(r) == N_TOKENS * SAMPLES_PER_TOKEN for r in results)
    for stage in ("tokenizer", "token2wav"):
        served = [a - b for a, b in zip(executions(stack, stage), before[stage])]
        assert all(n > 0 for n in served), f"{stage} per-replica executions {served}"

    # Take token2wav-1 down; the gateway retries its first failed call elsewhere, then marks it not ready.
    gone = records[1]
    stop_pid(gone.pid, 30.0, stack._popens.get(gone.pid))
    count0 = _single_count(stack, records[0])
    results = asyncio.run(_synthesize(stack.gateway_grpc_url, [105, 106]))
    assert all(_audio_samples(r) == N_TOKENS * SAMPLES_PER_TOKEN for r in results)
    # A readiness round marks it gone (the gateway's log line), so later requests never try it first.
    gone_url = f"127.0.0.1:{gone.ports['grpc']}"
    log = Path(stack._record("gateway").log)
    deadline = time.monotonic() + 120                    # generous: a loaded 2-core machine
    while f"stage token2wav replica {gone_url} NOT ready" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the gateway never marked the stopped replica not ready"
        time.sleep(0.2)
    results = asyncio.run(_synthesize(stack.gateway_grpc_url, [107, 108, 109]))
    assert all(_audio_samples(r) == N_TOKENS * SAMPLES_PER_TOKEN for r in results)
    assert _single_count(stack, records[0]) - count0 >= 2 * 5   # all five requests' chunks on token2wav-0


def _single_count(stack: Stack, record) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{record.ports['http']}/v2/models/stats", timeout=5) as r:
        stats = json.load(r)["model_stats"]
    return sum(int(m.get("inference_stats", {}).get("success", {}).get("count", 0)) for m in stats)
