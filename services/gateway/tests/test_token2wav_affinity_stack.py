"""A stream's token2wav calls follow it to one replica, and a replica that dies mid-stream costs only speed.

Two token2wav tritonservers on CPU behind one gateway: a seeded stream's prefill and chunks all land on one
replica (its state cache serves the later chunks); when that replica is killed after the first chunk, the rest of
the stream goes to the other one, which recomputes from the whole prefix, and the audio equals the same request
served whole by the survivor (within the state cache's bound: HiFT's phase drift, services/token2wav tests)."""
import asyncio
import os
import re
import signal
import time
import urllib.request
from dataclasses import replace

import grpc
import numpy as np
import pytest

from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.constants import SAMPLES_PER_TOKEN
from cosyvoice_gateway.testing import prompt_wav_bytes
from cosyvoice_launcher.stack import Stack
from cosyvoice_tools.testing import make_stack_config

pytestmark = [pytest.mark.stack, pytest.mark.slow]
N_TOKENS = 120       # chunks end at 18, 43, 93 tokens, then the final one: four calls after the prefill
WAVE_ATOL = 2e-3


@pytest.fixture(scope="module")
def two_token2wav(tiny_model_dir, tmp_path_factory):
    config = make_stack_config(tiny_model_dir, tmp_path_factory.mktemp("affinity"), gateway=True, redis=True)
    config = config.with_stage("token2wav", replicas=2)
    config = replace(config, gateway_env={**config.gateway_env, "READINESS_INTERVAL_S": "0.5", "METRICS_PORT": "0"})
    stack = Stack(config).start()
    yield stack
    stack.stop()


def _request() -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text="Hello world, this is a test of a longer stream.",
                                     prompt_audio=prompt_wav_bytes(seed=3), prompt_text="a short prompt",
                                     min_speech_tokens=N_TOKENS, max_speech_tokens=N_TOKENS,
                                     encoding=tts_pb2.FLOAT32, sampling=tts_pb2.SamplingParams(seed=11))


def _counts(record) -> dict[str, float]:
    """token2wav_chunks by kind on one replica (its Triton metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{record.ports['metrics']}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^token2wav_chunks\{[^}]*kind="(\w+)"[^}]*\} ([0-9.e+]+)$', text, re.M)}


async def _stream(addr: str, after_first=None) -> list[np.ndarray]:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        chunks = []
        async for chunk in stub.SynthesizeStream(_request(), timeout=300):
            if chunk.audio:
                chunks.append(np.frombuffer(chunk.audio, "<f4"))
            if len(chunks) == 1 and after_first is not None:
                after_first()
                after_first = None
        return chunks


def test_a_stream_stays_on_one_replica_and_survives_its_death(two_token2wav):
    stack = two_token2wav
    records = stack.stage_records("token2wav")
    before = [_counts(r) for r in records]
    whole = asyncio.run(_stream(stack.gateway_grpc_url))
    assert sum(c.size for c in whole) == N_TOKENS * SAMPLES_PER_TOKEN
    served = [{k: after.get(k, 0) - b.get(k, 0) for k in ("prefill", "first", "middle", "final")}
              for after, b in zip((_counts(r) for r in records), before)]
    holder = [i for i, s in enumerate(served) if any(s.values())]
    assert len(holder) == 1, f"one stream's calls spread over replicas: {served}"
    assert served[holder[0]] == {"prefill": 1, "first": 1, "middle": 2, "final": 1}

    # Again, and kill the replica that holds the stream as soon as the first chunk is out.
    before = [_counts(r) for r in records]
    killed: list[int] = []

    def kill_the_holder() -> None:
        deadline = time.monotonic() + 30      # the stage counts a chunk just after answering it
        while not (holders := [i for i, (r, b) in enumerate(zip(records, before))
                               if _counts(r).get("first", 0) > b.get("first", 0)]):
            assert time.monotonic() < deadline, "no replica counted the first chunk"
            time.sleep(0.05)
        os.kill(records[holders[0]].pid, signal.SIGKILL)
        killed.append(holders[0])
    split = asyncio.run(_stream(stack.gateway_grpc_url, after_first=kill_the_holder))
    assert killed and sum(c.size for c in split) == N_TOKENS * SAMPLES_PER_TOKEN
    survivor = records[1 - killed[0]]
    assert _counts(survivor).get("final", 0) > before[1 - killed[0]].get("final", 0)
    # the survivor alone, start to end: the reference for the split stream
    alone = asyncio.run(_stream(stack.gateway_grpc_url))
    assert [c.size for c in split] == [c.size for c in alone]
    np.testing.assert_allclose(np.concatenate(split), np.concatenate(alone), atol=WAVE_ATOL, rtol=0)
