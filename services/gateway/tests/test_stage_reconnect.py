"""A replica that comes up after the gateway (slow start, a restart) is seen ready about a second after it serves,
not after gRPC's reconnect backoff, which grows to 120 s by default. This race once failed the slow-start fault
test on CI: the surviving token2wav replica was still "not ready" in the gateway's eyes when it was needed.
Real tritonserver (a trivial Python model under the stage's model name), real gRPC channels."""
from __future__ import annotations

import asyncio
import time

import pytest

from cosyvoice_gateway.stage_client import MAX_RECONNECT_BACKOFF_MS, StageClient, stage_config
from cosyvoice_tools.triton import TritonServer, TritonServerConfig, free_ports

DOWN_FOR_S = 20.0        # long enough for gRPC's default backoff to reach ~10 s
SEEN_WITHIN_S = MAX_RECONNECT_BACKOFF_MS / 1000 + 2.0

CONFIG = """name: "token2wav"
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.get_input_tensor_by_name(r, "X")]) for r in requests]
"""


@pytest.fixture
def late_server(tmp_path):
    repo = tmp_path / "models"
    (repo / "token2wav" / "1").mkdir(parents=True)
    (repo / "token2wav" / "config.pbtxt").write_text(CONFIG)
    (repo / "token2wav" / "1" / "model.py").write_text(MODEL)
    http_port, grpc_port, metrics_port = free_ports(3)
    server = TritonServer(TritonServerConfig(repo, http_port, grpc_port, metrics_port, tmp_path / "triton.log"))
    yield server
    server.stop()


def test_a_replica_that_starts_late_is_seen_within_the_capped_backoff(late_server):
    async def run() -> float:
        client = StageClient(stage_config("token2wav", late_server.grpc_url, timeout_s=2.0))   # in this loop
        try:
            # Nothing listens yet: every check fails, and the channel's reconnect backoff grows meanwhile.
            down_until = time.monotonic() + DOWN_FOR_S
            while time.monotonic() < down_until:
                assert not await client.check_ready()
                await asyncio.sleep(0.3)
            await asyncio.to_thread(late_server.start().wait_ready, 120.0)
            serving_at = time.monotonic()
            while not await client.check_ready():
                assert time.monotonic() - serving_at < 60, "the late replica was never seen ready"
                await asyncio.sleep(0.1)
            return time.monotonic() - serving_at
        finally:
            await client.close()

    seen_after_s = asyncio.run(run())
    print(f"late replica seen ready {seen_after_s:.2f} s after it served")
    assert seen_after_s < SEEN_WITHIN_S
