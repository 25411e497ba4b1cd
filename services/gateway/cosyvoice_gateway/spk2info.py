"""spk2info: Redis cache of prompt features, and the registry of named speakers (spec 8.4).

Prompt features (speech codes, 24 kHz prompt mel, x-vector, prompt text ids) cost a tokenizer and a
speaker call per request; they depend only on the model, the trimmed 16 kHz prompt audio and the
prompt text, so they are cached under

    <prefix>:prompt:<model revision>:<sha256 of float32 16 kHz PCM>:<sha256 of prompt text>

with a TTL. Named speakers live under `<prefix>:speaker:<revision>:<name>` without expiry and are
listed in the index hash `<prefix>:speakers:<revision>` (name -> small JSON: prompt text, sizes), so
every gateway replica sees them and they survive restarts. Each entry is a Redis hash: the raw bytes
of each array plus a `meta` JSON field with dtype and shape, checked on read.

Redis being down or slow is a cache miss (logged, counted in `cosyvoice_spk2info_errors_total`),
never an error: sockets time out quickly and, after a failure, Redis is not tried again for
`retry_after_s` so requests do not each pay a connect timeout. Operations on named speakers cannot be
served without Redis and raise `RegistryUnavailableError` (gRPC UNAVAILABLE) instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from cosyvoice_common.constants import MAX_NAMED_SPEAKERS, MEL_BINS, SPEAKER_EMBEDDING_DIM, TOKEN_MEL_RATIO
from cosyvoice_common.contracts import GatewayMetric

log = logging.getLogger(__name__)

SPK2INFO_LOOKUPS = Counter(GatewayMetric.SPK2INFO_LOOKUPS, "prompt-feature cache lookups", ["result"])
SPK2INFO_ERRORS = Counter(GatewayMetric.SPK2INFO_ERRORS, "Redis failures (served as misses)", ["op"])

_FORMAT_VERSION = 1
_ARRAY_FIELDS = ("speech_codes", "speech_feat", "spk_embedding", "text_ids")


class RegistryUnavailableError(RuntimeError):
    """The speaker registry (Redis) cannot be reached: named-speaker operations cannot be served."""


class SpeakerLimitError(RuntimeError):
    """The registry holds its maximum of named speakers (`max_speakers`)."""


class SpeakerExistsError(KeyError):
    """A speaker of that name is registered and the registration did not ask to replace it."""


# One Redis call (and its connect). Long enough for a loaded host; a Redis that is down costs it once per
# retry_after_s, not per request.
REDIS_SOCKET_TIMEOUT_S = 1.0

@dataclass(frozen=True, slots=True)
class PromptFeatures:
    """Everything the LLM and token2wav need from a prompt, already aligned (spec 3.5)."""
    speech_codes: np.ndarray    # int32[T], codes 0..6560 (no flat-vocabulary offset)
    speech_feat: np.ndarray     # float32[2T, 80], 24 kHz prompt mel
    spk_embedding: np.ndarray   # float32[192]
    text_ids: np.ndarray        # int32[P], prompt transcript token ids (empty in cross-lingual use)
    prompt_text: str
    prompt_seconds: float

    def __post_init__(self) -> None:
        n_tokens = self.speech_codes.shape[0]
        if self.speech_codes.ndim != 1 or self.speech_feat.shape != (TOKEN_MEL_RATIO * n_tokens, MEL_BINS):
            raise ValueError(f"misaligned prompt: codes {self.speech_codes.shape}, mel {self.speech_feat.shape}")
        if self.spk_embedding.shape != (SPEAKER_EMBEDDING_DIM,):
            raise ValueError(f"x-vector shape {self.spk_embedding.shape}")


@dataclass(frozen=True, slots=True)
class SpeakerInfo:
    speaker_id: str
    prompt_text: str
    prompt_speech_tokens: int
    prompt_seconds: float


@dataclass(frozen=True, slots=True)
class Spk2InfoConfig:
    url: str                      # redis://host:port/db; empty = no cache (every lookup misses)
    model_revision: str
    ttl_s: int = 24 * 3600        # ad-hoc prompts
    socket_timeout_s: float = REDIS_SOCKET_TIMEOUT_S
    retry_after_s: float = 5.0    # after a failure, treat Redis as down this long
    key_prefix: str = "cosyvoice"
    max_speakers: int = MAX_NAMED_SPEAKERS   # named voices per model revision

    def __post_init__(self) -> None:
        if not self.model_revision:
            raise ValueError("model_revision is required (cache entries are only valid for one model)")
        if self.ttl_s <= 0 or self.socket_timeout_s <= 0 or self.retry_after_s < 0 or self.max_speakers < 1:
            raise ValueError(f"bad spk2info config: {self}")


def prompt_key_digest(wav_16k: np.ndarray, prompt_text: str) -> str:
    """Content part of the cache key: sha256 of the trimmed 16 kHz float32 PCM and of the prompt text."""
    pcm = np.ascontiguousarray(wav_16k, dtype=np.float32).tobytes()
    return f"{hashlib.sha256(pcm).hexdigest()}:{hashlib.sha256(prompt_text.encode()).hexdigest()}"


def _encode(features: PromptFeatures) -> dict[str, bytes]:
    arrays = {name: np.ascontiguousarray(getattr(features, name)) for name in _ARRAY_FIELDS}
    meta = {
        "version": _FORMAT_VERSION,
        "prompt_text": features.prompt_text,
        "prompt_seconds": features.prompt_seconds,
        "arrays": {name: {"dtype": a.dtype.str, "shape": list(a.shape)} for name, a in arrays.items()},
    }
    fields = {name: a.tobytes() for name, a in arrays.items()}
    fields["meta"] = json.dumps(meta).encode()
    return fields


def _decode(fields: dict[bytes, bytes]) -> PromptFeatures:
    """Raises ValueError/KeyError on any mismatch (then the entry is treated as a miss)."""
    meta = json.loads(fields[b"meta"])
    if meta["version"] != _FORMAT_VERSION:
        raise ValueError(f"entry format {meta['version']}")
    arrays = {}
    for name in _ARRAY_FIELDS:
        spec = meta["arrays"][name]
        arrays[name] = np.frombuffer(fields[name.encode()], dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
    return PromptFeatures(**arrays, prompt_text=meta["prompt_text"], prompt_seconds=float(meta["prompt_seconds"]))


def _speaker_info(name: str, features: PromptFeatures) -> SpeakerInfo:
    return SpeakerInfo(name, features.prompt_text, int(features.speech_codes.shape[0]), features.prompt_seconds)


class Spk2InfoCache:
    """Async cache and speaker registry over one Redis connection pool (shared by all requests)."""

    def __init__(self, config: Spk2InfoConfig) -> None:
        self.config = config
        self._redis = (
            aioredis.Redis.from_url(
                config.url,
                socket_timeout=config.socket_timeout_s,
                socket_connect_timeout=config.socket_timeout_s,
                retry_on_timeout=False,
                health_check_interval=0,
            )
            if config.url
            else None
        )
        self._down_until_s = 0.0
        p, rev = config.key_prefix, config.model_revision
        self._prompt_prefix = f"{p}:prompt:{rev}:"
        self._speaker_prefix = f"{p}:speaker:{rev}:"
        self._index_key = f"{p}:speakers:{rev}"

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def prompt_key(self, wav_16k: np.ndarray, prompt_text: str) -> str:
        return self._prompt_prefix + prompt_key_digest(wav_16k, prompt_text)

    # --- ad-hoc prompts: failures are misses ----------------------------------------------------
    def _usable(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._down_until_s

    def _failed(self, op: str, exc: Exception) -> None:
        SPK2INFO_ERRORS.labels(op=op).inc()
        if time.monotonic() >= self._down_until_s:   # one warning per outage window, not per request
            log.warning("spk2info: Redis %s failed (%s: %s); serving without cache for %.1f s",
                        op, type(exc).__name__, exc, self.config.retry_after_s)
        self._down_until_s = time.monotonic() + self.config.retry_after_s

    async def get(self, key: str) -> PromptFeatures | None:
        if not self._usable():
            SPK2INFO_LOOKUPS.labels(result="unavailable").inc()
            return None
        try:
            fields = await self._redis.hgetall(key)
        except (RedisError, OSError) as exc:
            self._failed("get", exc)
            SPK2INFO_LOOKUPS.labels(result="unavailable").inc()
            return None
        if not fields:
            SPK2INFO_LOOKUPS.labels(result="miss").inc()
            return None
        try:
            features = _decode(fields)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("spk2info: dropping unreadable entry %s: %s", key, exc)
            SPK2INFO_LOOKUPS.labels(result="corrupt").inc()
            return None
        SPK2INFO_LOOKUPS.labels(result="hit").inc()
        return features

    async def put(self, key: str, features: PromptFeatures) -> bool:
        if not self._usable():
            return False
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key).hset(key, mapping=_encode(features)).expire(key, self.config.ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("put", exc)
            return False
        return True

    # --- named speakers: no Redis, no registry ------------------------------------------------------
    async def _registry(self, op: str, coro_fn):
        if self._redis is None:
            raise RegistryUnavailableError("no speaker registry configured (REDIS_URL is empty)")
        try:
            result = await coro_fn()
        except (RedisError, OSError) as exc:
            self._failed(op, exc)
            raise RegistryUnavailableError(f"speaker registry unavailable: {type(exc).__name__}: {exc}") from exc
        self._down_until_s = 0.0     # it answered: ad-hoc lookups may use it again at once
        return result

    async def register_speaker(self, name: str, features: PromptFeatures, replace: bool = True) -> SpeakerInfo:
        """Store a named speaker. `replace=False`: the name is claimed in the index first (HSETNX), and an
        existing one raises SpeakerExistsError."""
        info = _speaker_info(name, features)
        key = self._speaker_prefix + name
        index_entry = json.dumps({
            "prompt_text": info.prompt_text,
            "prompt_speech_tokens": info.prompt_speech_tokens,
            "prompt_seconds": info.prompt_seconds,
        })

        async def run():
            exists = await self._redis.hexists(self._index_key, name)
            if exists and not replace:
                raise SpeakerExistsError(name)
            if not exists and await self._redis.hlen(self._index_key) >= self.config.max_speakers:
                raise SpeakerLimitError(f"the registry holds its maximum of {self.config.max_speakers} speakers")
            if not replace and not await self._redis.hsetnx(self._index_key, name, index_entry):
                raise SpeakerExistsError(name)      # registered meanwhile
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key).hset(key, mapping=_encode(features)).hset(self._index_key, name, index_entry)
                await pipe.execute()

        await self._registry("register", run)
        return info

    async def get_speaker(self, name: str) -> PromptFeatures | None:
        fields = await self._registry("get_speaker", lambda: self._redis.hgetall(self._speaker_prefix + name))
        if not fields:
            return None
        try:
            return _decode(fields)
        except (KeyError, ValueError, TypeError) as exc:
            raise RegistryUnavailableError(f"speaker {name!r} entry is unreadable: {exc}") from exc

    async def list_speakers(self) -> list[SpeakerInfo]:
        index = await self._registry("list", lambda: self._redis.hgetall(self._index_key))
        speakers = []
        for raw_name, raw in sorted(index.items()):
            entry = json.loads(raw)
            speakers.append(SpeakerInfo(raw_name.decode(), entry["prompt_text"],
                                        int(entry["prompt_speech_tokens"]), float(entry["prompt_seconds"])))
        return speakers

    async def delete_speaker(self, name: str) -> bool:
        async def run():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(self._index_key, name).delete(self._speaker_prefix + name)
                removed_index, removed_entry = await pipe.execute()
            return bool(removed_index or removed_entry)

        return await self._registry("delete", run)
