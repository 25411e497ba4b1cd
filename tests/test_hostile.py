"""The hostile-load suite (`cosyvoice_tools.hostile`, `make hostile`) against the tiny CPU stack, auth off and on: a
real gateway process (admission bound 2) over the session's real stage servers and Redis. Asserts the functional
outcomes only: every bomb gets its refusal code, overload is refused with RESOURCE_EXHAUSTED / 429 and a retry-after
hint while the accepted requests succeed, and afterwards every process still runs and the gateway is ready.
Timings are the tool's report, not asserted here."""
import json
import os
import subprocess
import sys
import uuid

import pytest
from cosyvoice_gateway.testing import free_port, gateway_process

pytestmark = [pytest.mark.stack, pytest.mark.slow]
ADMISSION_BOUND = 2
API_KEY = "hostile-key"


@pytest.fixture(params=["auth-off", "auth-on"])
def gateway(request, stage_servers, redis_server, tiny_model_dir, tmp_path):
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, **stage_servers.urls_env(), REDIS_URL=redis_server.url, MODEL_DIR=str(tiny_model_dir),
               MODEL_REVISION=f"hostile-{uuid.uuid4().hex[:8]}", GRPC_PORT=str(grpc_port), HTTP_PORT=str(http_port),
               METRICS_PORT="0", READINESS_INTERVAL_S="0.5", MAX_INFLIGHT_REQUESTS=str(ADMISSION_BOUND),
               COSYVOICE_API_KEY=API_KEY if request.param == "auth-on" else "")
    log = tmp_path / "gateway.log"
    url = f"http://127.0.0.1:{http_port}"
    with gateway_process(env, log, f"{url}/readyz") as proc:
        yield {"grpc": f"127.0.0.1:{grpc_port}", "http": url, "pid": proc.pid, "log": log,
               "api_key": API_KEY if request.param == "auth-on" else ""}


def test_hostile_suite_refuses_bombs_and_overload_and_nothing_falls_over(gateway, stage_servers, redis_server,
                                                                          tmp_path):
    report_path = tmp_path / "hostile.json"
    env = dict(os.environ, COSYVOICE_API_KEY=gateway["api_key"])
    client_processes = 2 if gateway["api_key"] else 1    # the keyed run spreads its workers over two processes
    done = subprocess.run(
        [sys.executable, "-m", "cosyvoice_tools.hostile", "--grpc", gateway["grpc"], "--http", gateway["http"],
         "--run-dir", str(stage_servers.stack.config.run_dir), "--pid", str(gateway["pid"]),
         "--pid", str(redis_server.pid), "--concurrency", str(ADMISSION_BOUND), "--overload-factor", "10",
         "--requests", "2", "--tokens", "10", "--client-processes", str(client_processes), "--out", str(report_path)],
        env=env, capture_output=True, text=True, timeout=900)
    assert report_path.exists(), done.stdout + done.stderr + gateway["log"].read_text()[-3000:]
    report = json.loads(report_path.read_text())
    assert report["failures"] == [], done.stdout
    assert done.returncode == 0, done.stdout + done.stderr

    names = {b["name"] for b in report["bombs"]}
    assert {"flac decode bomb (Synthesize)", "flac decode bomb (voice upload)", "upload beyond the bound",
            "1 MiB text", "random bytes as audio"} <= names
    assert all(b["got"] in b["expected"] for b in report["bombs"])
    unauthenticated = [b for b in report["bombs"] if "key" in b["name"]]
    if gateway["api_key"]:
        assert {b["got"] for b in unauthenticated} == {"UNAUTHENTICATED", "401"}
    else:
        assert unauthenticated == []

    assert report["settings"]["client_processes"] == {"baseline": client_processes, "overload": client_processes}
    for protocol in ("grpc", "http"):
        baseline, overload = report["overload"][protocol]["baseline"], report["overload"][protocol]["overload"]
        assert baseline["accepted"] == baseline["requests"] == ADMISSION_BOUND * 2
        assert overload["workers"] == 10 * ADMISSION_BOUND and overload["refused"] > 0
        assert overload["accepted"] + overload["refused"] == overload["requests"]
        assert overload["refusals_without_retry_after"] == 0
    after = report["aftermath"]
    assert after["processes"] and all(after["processes"].values())
    assert after["readyz"] == 200 and after["grpc_health"] == "SERVING"
