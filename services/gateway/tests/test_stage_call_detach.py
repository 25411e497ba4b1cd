"""A unary stage call whose request is cancelled or runs out of time is left to finish, never cancelled in flight:
Triton 2.51 can crash or wedge its gRPC server on in-flight cancellations (seen in CI as a token2wav server that
stopped answering readiness checks right after the deadline test). A real tritonserver with a Python model that
takes SLOW_S per request and writes to a file whether its request was cancelled."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cosyvoice_gateway.admission import DEADLINE_S
from cosyvoice_gateway.stage_client import StageClient, StageError, stage_config
from cosyvoice_gateway.testing import STANDIN_TOKENIZER_CONFIG
from cosyvoice_launcher.triton import TritonServer, TritonServerConfig, free_ports

pytestmark = [pytest.mark.stack, pytest.mark.slow]
SLOW_S = 2.0

OUTCOME_PARAMETER = 'parameters { key: "outcome_file" value: { string_value: "%s" } }\n'

MODEL = """import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from cosyvoice_common.triton_io import to_triton


class TritonPythonModel:
    def initialize(self, args):
        self.path = json.loads(args["model_config"])["parameters"]["outcome_file"]["string_value"]

    def execute(self, requests):
        deadline = time.monotonic() + %r
        while time.monotonic() < deadline and not any(r.is_cancelled() for r in requests):
            time.sleep(0.02)
        with open(self.path, "a") as f:
            f.writelines("cancelled\\n" if r.is_cancelled() else "done\\n" for r in requests)
        return [pb_utils.InferenceResponse([to_triton("n", np.array([1], np.int32))]) for _ in requests]
""" % SLOW_S


@pytest.fixture
def slow_server(tmp_path):
    outcomes = tmp_path / "outcomes.txt"
    repo = tmp_path / "models"
    (repo / "audio_tokenizer" / "1").mkdir(parents=True)
    (repo / "audio_tokenizer" / "config.pbtxt").write_text(STANDIN_TOKENIZER_CONFIG + OUTCOME_PARAMETER % outcomes)
    (repo / "audio_tokenizer" / "1" / "model.py").write_text(MODEL)
    server = TritonServer(TritonServerConfig(repo, *free_ports(3), tmp_path / "triton.log")).start()
    try:
        server.wait_ready(180.0)
        yield server, outcomes
    finally:
        server.stop()


def _inputs() -> dict[str, np.ndarray]:
    return {"reference_wav": np.zeros(160, np.float32), "reference_wav_len": np.array([160], np.int32)}


def _outcomes(path, n: int) -> list[str]:
    deadline = time.monotonic() + 60
    while (lines := path.read_text().split() if path.exists() else []) and len(lines) < n or not lines:
        assert time.monotonic() < deadline, f"the model recorded {lines}, expected {n} outcomes"
        time.sleep(0.05)
    return lines


def test_a_call_past_its_deadline_or_cancelled_is_left_to_finish_and_still_counted(slow_server):
    server, outcomes = slow_server

    async def main():
        client = StageClient(stage_config("tokenizer", server.grpc_url, 60.0))
        try:
            assert await client.check_ready()
            replica = client._replicas[0]

            async def within(seconds: float):      # a request (its own task and context) with a deadline
                DEADLINE_S.set(time.monotonic() + seconds)
                return await client.infer(_inputs(), ["n"])

            start = time.monotonic()
            with pytest.raises(StageError) as info:
                await asyncio.ensure_future(within(0.3))
            assert info.value.timed_out and time.monotonic() - start < SLOW_S     # the request stopped waiting,
            assert replica.outstanding == 1                                       # the call did not

            task = asyncio.ensure_future(client.infer(_inputs(), ["n"]))        # a caller that is cancelled
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert replica.outstanding >= 1

            deadline = time.monotonic() + 30
            while replica.outstanding and time.monotonic() < deadline:          # both calls finish on their own
                await asyncio.sleep(0.05)
            assert replica.outstanding == 0
            out, _ = await client.infer(_inputs(), ["n"])                       # and the replica still serves
            assert out["n"].tolist() == [1]
        finally:
            await client.close()

    asyncio.run(main())
    assert _outcomes(outcomes, 3) == ["done", "done", "done"]    # Triton never saw a cancellation
