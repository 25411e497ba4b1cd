"""Pytest fixtures over real processes: a tiny model, Redis, one tritonserver per stage, the whole stack.

Exposed to every test by the root conftest.py (`pytest_plugins`). All session-scoped and on free ports
bound to 127.0.0.1, so parallel runs by different engineers never collide:

    tiny_model_dir  Path of a complete tiny random model (COSYVOICE_TINY_MODEL_DIR, else generated once
                    per session with cosyvoice_tools.modelgen into a tmp dir)
    redis_server    RedisServer(url, port) of a real redis-server
    stage_servers   StageServers: .grpc_url(stage), .http_url(stage), .metrics_url(stage), .urls_env()
    stack           the Stack (stage servers + Redis + gateway when cosyvoice_gateway.server exists)
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cosyvoice_common.stage_params import STAGE_PARAMS
from cosyvoice_common.stages import STAGES
from cosyvoice_gateway.testing import TEST_STAGE_TIMEOUT_S
from cosyvoice_launcher.stack import (
    Stack,
    StackConfig,
    StageSettings,
    redis_server_binary,
    stop_records,
)
from cosyvoice_launcher.triton import REPO_ROOT, free_ports, stop_pid

TINY_MODEL_ENV = "COSYVOICE_TINY_MODEL_DIR"


def generate_tiny_model(out_dir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "cosyvoice_tools.modelgen", "--size", "tiny", "--out", str(out_dir)],
                   check=True, cwd=str(REPO_ROOT), stdout=subprocess.DEVNULL)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    given = os.environ.get(TINY_MODEL_ENV)
    if given:
        return Path(given)
    return generate_tiny_model(tmp_path_factory.mktemp("model") / "cosyvoice2-tiny")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """torch on one intra-op thread for a module (`pytestmark = pytest.mark.usefixtures(...)`): the CI box has 2
    shared cores, and two intra-op threads under load run tiny matmuls ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True, slots=True)
class RedisServer:
    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    import redis

    port = free_ports(1)[0]
    data_dir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                                "--dir", str(data_dir), "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.05)
    yield RedisServer(port, process.pid)
    stop_pid(process.pid, 10.0, popen=process)


def make_stack_config(model_dir: Path, run_dir: Path, stages: tuple[str, ...] = tuple(s.name for s in STAGES),
                      gateway: bool = False, redis: bool = False, **stage_changes) -> StackConfig:
    """A StackConfig for tests: one CPU replica per listed stage, free ports, small batches, quiet."""
    settings = tuple(
        StageSettings(s.name, replicas=1 if s.name in stages else 0, devices=("cpu",), base_port=0,
                      params=STAGE_PARAMS[s.name](max_batch_size=4), **stage_changes.get(s.name, {}))
        for s in STAGES)
    return StackConfig(model_dir=model_dir, run_dir=run_dir, stages=settings, redis_port=0, start_redis=redis,
                       gateway=gateway, gateway_grpc_port=0, gateway_http_port=0, ready_timeout_s=180.0,
                       generate_model=False, quiet=True, seed_front=False,
                       # a stage call on a loaded 2-core CI machine can take far longer than the 30 s default
                       gateway_env={"STAGE_TIMEOUT_S": TEST_STAGE_TIMEOUT_S})


class StageServers:
    """One tritonserver per stage (a Stack without Redis or gateway), with address helpers."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def _record(self, stage: str):
        records = self.stack.stage_records(stage)
        if not records:
            raise KeyError(f"stage {stage} is not running")
        return records[0]

    def grpc_url(self, stage: str) -> str:
        return f"127.0.0.1:{self._record(stage).ports['grpc']}"

    def http_url(self, stage: str) -> str:
        return f"127.0.0.1:{self._record(stage).ports['http']}"

    def metrics_url(self, stage: str) -> str:
        return f"http://127.0.0.1:{self._record(stage).ports['metrics']}/metrics"

    def log_path(self, stage: str) -> Path:
        return Path(self._record(stage).log)

    def urls_env(self) -> dict[str, str]:
        """TOKENIZER_URLS, SPEAKER_URLS, LLM_URLS, TOKEN2WAV_URLS as the gateway reads them."""
        return {s.urls_env: ",".join(self.stack.stage_grpc_urls(s.name)) for s in STAGES}


@pytest.fixture(scope="session")
def stage_servers(tiny_model_dir, tmp_path_factory):
    stack = Stack(make_stack_config(tiny_model_dir, tmp_path_factory.mktemp("stage-servers")))
    stack.start()
    yield StageServers(stack)
    stack.stop()


@pytest.fixture(scope="session")
def stack(stage_servers, tiny_model_dir, tmp_path_factory):
    """Redis + gateway (when cosyvoice_gateway.server exists) over the session's stage servers, free ports.

    `stack.gateway_grpc_url`, `.gateway_http_url`, `.redis_url`, `.stage_grpc_urls(stage)`."""
    from dataclasses import replace
    config = make_stack_config(tiny_model_dir, tmp_path_factory.mktemp("stack"), stages=(), gateway=True, redis=True)
    stack = Stack(replace(config, stage_urls=stage_servers.urls_env()))
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def seed_front(stage_servers, tiny_model_dir, tmp_path_factory):
    """Redis + the two seed-compatible `cosyvoice2` servers (streaming, offline) over the stage servers, free
    ports; the default speaker "001" is registered at start-up from a synthetic prompt.

    `seed_front.seed_ports("seed-stream" | "seed-offline")` -> {"http", "grpc", "metrics"}."""
    from dataclasses import replace

    from cosyvoice_gateway.seed import SeedFrontSettings
    from cosyvoice_gateway.testing import prompt_wav_bytes

    run_dir = tmp_path_factory.mktemp("seed-front")
    prompt = run_dir / "prompt_001.wav"
    prompt.write_bytes(prompt_wav_bytes(seconds=2.0))
    settings = SeedFrontSettings(prompt_wav=str(prompt), prompt_text="a default voice.")
    config = replace(make_stack_config(tiny_model_dir, run_dir, stages=(), gateway=False, redis=True),
                     stage_urls=stage_servers.urls_env(), seed_front=True, seed_stream_base_port=0,
                     seed_offline_base_port=0, seed=settings)
    stack = Stack(config)
    stack.start()
    yield stack
    stack.stop()


__all__ = ["seed_front", "RedisServer", "StageServers", "generate_tiny_model", "redis_server", "stack", "stage_servers",
           "stop_records", "make_stack_config", "tiny_model_dir"]
