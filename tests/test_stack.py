"""The stack launcher CLI: `up` starts real processes and records them, `ps` sees them, `down` leaves none behind."""
import json
import os
import subprocess
import sys
import time

import pytest
from cosyvoice_tools.triton import pid_alive

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _cli(command: str, env: dict, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosyvoice_tools.stack", command], env=env, text=True,
                          capture_output=True, timeout=timeout_s)


def test_stack_up_down_leaves_no_process_behind(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, MODEL_DIR=str(tiny_model_dir), STACK_RUN_DIR=str(run_dir), REDIS_PORT="0",
               TOKENIZER_BASE_PORT="0", TOKENIZER_REPLICAS="2", SPEAKER_REPLICAS="0", LLM_REPLICAS="0",
               TOKEN2WAV_REPLICAS="0", STACK_GATEWAY="0")
    up = _cli("up", env)
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((run_dir / "stack.json").read_text())
    names = [p["name"] for p in state["processes"]]
    assert names == ["redis", "tokenizer-0", "tokenizer-1"]
    pids = [p["pid"] for p in state["processes"]]
    assert all(pid_alive(pid) for pid in pids)
    ps = _cli("ps", env)
    assert ps.returncode == 0 and ps.stdout.count("True  True") == 3, ps.stdout
    # tritonserver's python stubs are children of the server: remember them to check they go too.
    stubs = subprocess.run(["pgrep", "-f", f"{run_dir}/repos"], capture_output=True, text=True).stdout.split()
    down = _cli("down", env)
    assert down.returncode == 0, down.stdout + down.stderr
    deadline = time.monotonic() + 10
    while any(pid_alive(int(p)) for p in pids + stubs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids + stubs if pid_alive(int(p))]
    assert not (run_dir / "stack.json").exists()
