"""Redis stays bounded: a real redis-server started with the stack's own bound arguments (maxmemory +
volatile-lru, here with a small maxmemory) evicts cached prompts under pressure and never a named voice; the
registry caps the number of named voices; cached prompts carry a TTL."""
import asyncio
import subprocess
import time
import uuid

import numpy as np
import pytest
import redis

from cosyvoice_common.constants import REDIS_BOUND_ARGS, REDIS_EVICTION_POLICY
from cosyvoice_gateway.spk2info import PromptFeatures, SpeakerLimitError, Spk2InfoCache, Spk2InfoConfig
from cosyvoice_launcher.stack import redis_server_binary
from cosyvoice_launcher.triton import free_ports

SMALL_MAXMEMORY = "4mb"


def features(n_tokens: int, seed: int) -> PromptFeatures:
    rng = np.random.default_rng(seed)
    return PromptFeatures(speech_codes=rng.integers(0, 6561, n_tokens, dtype=np.int32),
                          speech_feat=rng.standard_normal((2 * n_tokens, 80), dtype=np.float32),
                          spk_embedding=rng.standard_normal(192, dtype=np.float32),
                          text_ids=np.arange(5, dtype=np.int32), prompt_text="hi", prompt_seconds=n_tokens / 25)


@pytest.fixture
def bounded_redis(tmp_path):
    port = free_ports(1)[0]
    args = list(REDIS_BOUND_ARGS)
    args[args.index("--maxmemory") + 1] = SMALL_MAXMEMORY
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                             "--save", "", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", client
    proc.terminate()
    proc.wait(10)


def test_the_stack_bounds_redis_and_evicts_only_what_expires():
    assert REDIS_EVICTION_POLICY == "volatile-lru"
    assert "--maxmemory" in REDIS_BOUND_ARGS and "--maxmemory-policy" in REDIS_BOUND_ARGS


def test_cached_prompts_are_evicted_under_pressure_named_voices_never(bounded_redis):
    url, client = bounded_redis
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"

    async def run():
        cache = Spk2InfoCache(Spk2InfoConfig(url=url, model_revision=f"b-{uuid.uuid4().hex[:6]}", ttl_s=3600))
        try:
            await cache.register_speaker("keeper", features(100, 0))
            stored = 0
            for i in range(300):                   # ~300 x 70 KB of cached prompts into 4 MB
                if await cache.put(cache.prompt_key(np.full(10, i, np.float32), "t"), features(200, i)):
                    stored += 1
            keeper = await cache.get_speaker("keeper")
            return stored, keeper
        finally:
            await cache.close()
    stored, keeper = asyncio.run(run())
    assert stored == 300                           # writes keep succeeding: old prompts make room
    assert client.info("stats")["evicted_keys"] > 0
    assert keeper is not None and keeper.speech_codes.shape == (100,)
    assert client.info("memory")["used_memory"] <= 4 * 1024 * 1024 * 1.1


def test_named_voices_are_capped(bounded_redis):
    url, _ = bounded_redis

    async def run():
        cache = Spk2InfoCache(Spk2InfoConfig(url=url, model_revision=f"c-{uuid.uuid4().hex[:6]}", max_speakers=2))
        try:
            await cache.register_speaker("a", features(5, 1))
            await cache.register_speaker("b", features(5, 2))
            with pytest.raises(SpeakerLimitError):
                await cache.register_speaker("c", features(5, 3))
            await cache.register_speaker("a", features(6, 4))          # replacing one is not a new one
            await cache.delete_speaker("b")
            await cache.register_speaker("c", features(5, 3))          # room again
            return sorted(s.speaker_id for s in await cache.list_speakers())
        finally:
            await cache.close()
    assert asyncio.run(run()) == ["a", "c"]
