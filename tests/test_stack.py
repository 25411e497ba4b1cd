"""The stack launcher CLI: `up` starts real processes and records them, `ps` sees them, `down` leaves none behind."""
import json
import os
import subprocess
import sys
import time

import pytest
from cosyvoice_launcher.stack import StackConfig
from cosyvoice_launcher.triton import pid_alive

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _cli(command: str, env: dict, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosyvoice_launcher.stack", command], env=env, text=True,
                          capture_output=True, timeout=timeout_s)


def test_stack_up_down_leaves_no_process_behind(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, MODEL_DIR=str(tiny_model_dir), STACK_RUN_DIR=str(run_dir), REDIS_PORT="0",
               TOKENIZER_BASE_PORT="0", TOKENIZER_REPLICAS="2", SPEAKER_REPLICAS="0", LLM_REPLICAS="0",
               TOKEN2WAV_REPLICAS="0", STACK_GATEWAY="0")
    up = _cli("up", env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "RANDOM WEIGHTS" in up.stdout and "not speech" in up.stdout      # a generated model is announced
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


def test_a_model_dir_that_does_not_exist_is_an_error_unless_generation_is_asked(tmp_path):
    missing = tmp_path / "cosyvoice2-typo"
    env = dict(os.environ, MODEL_DIR=str(missing), STACK_RUN_DIR=str(tmp_path / "run"), REDIS_PORT="0",
               STACK_GATEWAY="0", SEED_FRONT="0")
    env.pop("MODEL_GENERATE", None)
    up = _cli("up", env, timeout_s=120)
    assert up.returncode == 1 and not missing.exists()
    assert f"MODEL_DIR {missing} does not exist" in up.stderr and "MODEL_GENERATE=1" in up.stderr, up.stderr
    assert "Traceback" not in up.stderr and not (tmp_path / "run" / "stack.json").exists()
    # the default directory (no MODEL_DIR) and MODEL_GENERATE=1 are the two ways a random model is made
    assert StackConfig.from_env({}).generate_model
    assert StackConfig.from_env({"MODEL_DIR": str(missing), "MODEL_GENERATE": "1"}).generate_model
    assert not StackConfig.from_env({"MODEL_DIR": str(missing)}).generate_model
