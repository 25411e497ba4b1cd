"""The gateway's one configuration: read once at start, validated, every part (HTTP, spk2info cache, admission)
built from it; a bad variable stops the process with a message naming it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cosyvoice_common.settings import from_env
from cosyvoice_common.stages import RELEASED_MODEL_DIR, STAGES
from cosyvoice_gateway.server import GatewayConfig

URLS = {s.env("URLS"): "127.0.0.1:1" for s in STAGES}
START_TIMEOUT_S = 120     # python start-up and imports on a loaded 2-core machine


def test_default_model_dir_is_the_released_models_location():
    config = from_env(GatewayConfig, {**URLS, "MODEL_REVISION": "r"})
    assert config.model_dir == Path(RELEASED_MODEL_DIR) and "tiny" not in str(config.model_dir)


def test_cache_http_and_key_settings_reach_their_parts():
    config = from_env(GatewayConfig, {**URLS, "MODEL_REVISION": "r", "REDIS_TIMEOUT_S": "0.5",
                                      "REDIS_RETRY_AFTER_S": "9", "CACHE_TTL_S": "60", "MAX_SPEAKERS": "3",
                                      "HTTP_OPENAI_VOICE": "alice", "HTTP_MAX_UPLOAD_BYTES": "1000",
                                      "COSYVOICE_API_KEY": "k1,k2"})
    cache = config.spk2info_config()
    assert (cache.socket_timeout_s, cache.retry_after_s, cache.ttl_s, cache.max_speakers) == (0.5, 9.0, 60, 3)
    http = config.http_config()
    assert (http.openai_voice, http.max_upload_bytes, http.api_keys) == ("alice", 1000, ("k1", "k2"))


def _start(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_URLS")}
    return subprocess.run([sys.executable, "-m", "cosyvoice_gateway.server"], env={**clean, **env},
                          capture_output=True, text=True, timeout=START_TIMEOUT_S)


def test_gateway_process_refuses_a_bad_variable_naming_it_and_the_allowed_values():
    done = _start(**URLS, MODEL_REVISION="r", HTTP_DEFAULT_RESPONSE_FORMAT="ogg")
    assert done.returncode != 0
    assert "HTTP_DEFAULT_RESPONSE_FORMAT='ogg': expected one of (empty), wav, pcm, flac, mp3, opus, aac" in done.stderr


def test_gateway_process_refuses_to_start_without_a_stage_url():
    done = _start(**{k: v for k, v in URLS.items() if k != "LLM_URLS"}, MODEL_REVISION="r")
    assert done.returncode != 0 and "LLM_URLS is not set" in done.stderr
