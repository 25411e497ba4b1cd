"""A replica that comes up after the gateway (slow start, a restart) is retried about every second while it is down
(counted connection attempts), not at gRPC's reconnect backoff, which grows to 120 s by default, and is seen ready
once it serves. This race once failed the slow-start fault test on CI: the surviving token2wav replica was still
"not ready" in the gateway's eyes when it was needed.
Real tritonserver (a trivial Python model under the stage's model name), real gRPC channels."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from cosyvoice_gateway.stage_client import MAX_RECONNECT_BACKOFF_MS, StageClient, stage_config
from cosyvoice_launcher.triton import TritonServer, TritonServerConfig, free_ports

DOWN_FOR_S = 20.0        # long enough for gRPC's default backoff to reach ~10 s
MIN_ATTEMPTS = int(0.7 * DOWN_FOR_S * 1000 / MAX_RECONNECT_BACKOFF_MS)   # ~one per capped backoff, less 30 %

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


class _ConnectCounter:
    """Listens on the replica's port while it is "down": accepts each connection attempt, counts it and closes
    it (a failed handshake to gRPC, like a refused connect), so the channel's reconnect attempts are counted."""

    def __init__(self, port: int) -> None:
        self.attempts = 0
        self._sock = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.attempts += 1
            conn.close()

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self._sock.close()


def test_a_late_replica_is_retried_at_the_capped_backoff_and_seen_ready(late_server):
    port = int(late_server.grpc_url.rsplit(":", 1)[1])

    async def run() -> int:
        client = StageClient(stage_config("token2wav", late_server.grpc_url, timeout_s=2.0))   # in this loop
        counter = _ConnectCounter(port)
        try:
            # Nothing serves yet: every check fails; the channel reconnects at its backoff, counted.
            down_until = time.monotonic() + DOWN_FOR_S
            while time.monotonic() < down_until:
                assert not await client.check_ready()
                await asyncio.sleep(0.3)
            counter.close()
            await asyncio.to_thread(late_server.start().wait_ready, 120.0)
            deadline = time.monotonic() + 120        # generous: a loaded 2-core machine
            while not await client.check_ready():
                assert time.monotonic() < deadline, "the late replica was never seen ready"
                await asyncio.sleep(0.1)
            return counter.attempts
        finally:
            counter.close()
            await client.close()

    attempts = asyncio.run(run())
    print(f"{attempts} reconnect attempts in {DOWN_FOR_S:.0f} s down")
    # capped at 1 s: ~20 attempts in 20 s (24 measured); uncapped, growing x1.6 from 100 ms: ~10
    assert attempts >= MIN_ATTEMPTS, attempts
