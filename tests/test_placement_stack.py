"""`make up` places stages from the same placement as docker compose: the launcher's plan (no process started)
has the devices, CUDA_VISIBLE_DEVICES, instance counts and ports the placement names, and the compose rendering
of that placement runs the same replicas on the same GPUs. (Kubernetes: the Helm chart's values, deploy/tests.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cosyvoice_common.settings import ConfigError
from cosyvoice_launcher import stack as stack_mod
from cosyvoice_launcher.placement import (
    PlacementError,
    compose_service_names,
    load_placement,
    to_compose,
)
from cosyvoice_launcher.stack import StackConfig, StageSettings, process_plan
from cosyvoice_launcher.triton import render_model_repository

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "deploy" / "placement.example.yaml"


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(stack_mod, "detect_default_device", lambda: "cpu")


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(stack_mod, "detect_default_device", lambda: "cuda:0")


def plan_of(env: dict) -> list:
    return process_plan(StackConfig.from_env(env))


def rows(plan) -> list[tuple]:
    return [(f"{s.stage}-{s.replica_index}", s.device, s.cuda_visible_devices, s.instance_count, s.grpc_port)
            for s in plan]


def test_example_file_gives_each_replica_its_gpus_and_instances(no_gpu):
    assert rows(plan_of({"PLACEMENT_FILE": str(EXAMPLE)})) == [
        ("tokenizer-0", "cuda:3", "3", 1, 8101),
        ("speaker-0", "cuda:3", "3", 1, 8201),
        ("llm-0", "cuda:0", "0", 1, 8301),
        ("token2wav-0", "cuda:1", "1", 2, 8401),
        ("token2wav-1", "cuda:2", "2", 2, 8411),
    ]


def test_each_process_sees_its_gpus_renumbered_from_zero_in_env_and_config(no_gpu, tmp_path):
    config = StackConfig.from_env({"PLACEMENT_FILE": str(EXAMPLE)})
    slot = next(s for s in process_plan(config) if s.stage == "token2wav" and s.replica_index == 1)
    assert slot.env()["CUDA_VISIBLE_DEVICES"] == "2" and slot.env()["TRITON_GPU_COUNT"] == "1"
    settings = config.stage("token2wav")
    params = settings.template_params(config.model_dir, slot)
    assert (params["device"], params["device_kind"], params["gpu_ids"], params["instance_count"]) == \
        ("cuda:0", "KIND_GPU", "0", "2")
    repo = render_model_repository(settings.template_dir, tmp_path / "repo", params)
    pbtxt = (repo / "token2wav" / "config.pbtxt").read_text()
    assert "instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0 ] } ]" in pbtxt
    assert 'string_value: "cuda:0"' in pbtxt


def test_a_gpu_replica_can_run_a_cpu_kind_triton_instance_on_its_gpu(no_gpu, tmp_path):
    env = {"PLACEMENT_DEFAULT_DEVICE": "cuda:0", "LLM_TRITON_KIND": "KIND_CPU"}
    config = StackConfig.from_env(env)
    (slot,) = [s for s in process_plan(config) if s.stage == "llm"]
    params = config.stage("llm").template_params(config.model_dir, slot)
    assert (params["device"], params["device_kind"], params["gpu_ids"]) == ("cuda:0", "KIND_CPU", "")
    pbtxt = (render_model_repository(config.stage("llm").template_dir, tmp_path / "repo", params)
             / "llm" / "config.pbtxt").read_text()
    assert "kind: KIND_CPU gpus: [  ]" in pbtxt and 'string_value: "cuda:0"' in pbtxt
    (t2w,) = [s for s in process_plan(config) if s.stage == "token2wav"]   # other stages keep KIND_GPU
    assert config.stage("token2wav").template_params(config.model_dir, t2w)["device_kind"] == "KIND_GPU"
    with pytest.raises(ConfigError, match="LLM_TRITON_KIND='KIND_TPU': expected one of"):
        StackConfig.from_env({**env, "LLM_TRITON_KIND": "KIND_TPU"})


def test_a_replica_holding_two_gpus_sees_both(no_gpu, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  llm: {devices: [[cuda:2, cuda:3]], instances: 1}\n")
    config = StackConfig.from_env({"PLACEMENT_FILE": str(path), "PLACEMENT_DEFAULT_DEVICE": "cpu"})
    (slot,) = [s for s in process_plan(config) if s.stage == "llm"]
    assert (slot.device, slot.cuda_visible_devices) == ("cuda:2,cuda:3", "2,3")
    assert config.stage("llm").template_params(config.model_dir, slot)["gpu_ids"] == "0, 1"


def test_variables_override_the_file_and_deal_devices_round_robin(no_gpu):
    env = {"PLACEMENT_FILE": str(EXAMPLE), "TOKEN2WAV_REPLICAS": "3", "TOKEN2WAV_DEVICES": "cuda:1,cuda:2",
           "TOKEN2WAV_INSTANCES": "1", "LLM_BASE_PORT": "9300"}
    got = [r for r in rows(plan_of(env)) if r[0].startswith(("token2wav", "llm"))]
    assert got == [("llm-0", "cuda:0", "0", 1, 9301), ("token2wav-0", "cuda:1", "1", 1, 8401),
                   ("token2wav-1", "cuda:2", "2", 1, 8411), ("token2wav-2", "cuda:1", "1", 1, 8421)]


def test_without_a_gpu_everything_defaults_to_cpu_and_hides_gpus(no_gpu):
    plan = plan_of({})
    assert [(s.device, s.cuda_visible_devices, s.triton_kind) for s in plan] == [("cpu", "", "KIND_CPU")] * 4


def test_with_a_gpu_the_default_is_gpu0_like_compose_and_helm(one_gpu):
    assert {(s.device, s.cuda_visible_devices) for s in plan_of({})} == {("cuda:0", "0")}
    # explicit choice wins over detection, and a file's default_device wins over detection too
    assert {s.device for s in plan_of({"PLACEMENT_DEFAULT_DEVICE": "cpu"})} == {"cpu"}


def test_file_default_device_is_not_overridden_by_detection(no_gpu, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("default_device: cuda:1\nstages:\n  token2wav: {devices: [cpu]}\n")
    plan = plan_of({"PLACEMENT_FILE": str(path)})
    assert [s.device for s in plan] == ["cuda:1", "cuda:1", "cuda:1", "cpu"]


def test_launcher_only_settings_zero_replicas_and_free_ports(no_gpu):
    config = StackConfig.from_env({"LLM_REPLICAS": "0", "TOKENIZER_REPLICAS": "2", "TOKENIZER_BASE_PORT": "0"})
    plan = process_plan(config)
    assert [f"{s.stage}-{s.replica_index}" for s in plan] == ["tokenizer-0", "tokenizer-1", "speaker-0", "token2wav-0"]
    assert [s.http_port for s in plan if s.stage == "tokenizer"] == [0, 0]      # chosen at start
    assert config.stage("llm").replicas == 0


def test_bad_placements_fail_before_anything_starts(no_gpu):
    with pytest.raises(PlacementError, match="TOKEN2WAV_DEVICES"):
        StackConfig.from_env({"TOKEN2WAV_DEVICES": "gpu:1"})
    with pytest.raises(PlacementError, match="token2wav"):
        StackConfig.from_env({"TOKEN2WAV_DEVICES": "cuda:0,cuda:1"})          # 2 devices, 1 replica
    with pytest.raises(PlacementError, match="port"):
        StackConfig.from_env({"TOKENIZER_BASE_PORT": "8190", "TOKENIZER_REPLICAS": "2", "SPEAKER_BASE_PORT": "8200"})
    with pytest.raises(PlacementError):
        StageSettings("llm", replicas=1, replica_devices=(("cpu", "cuda:0"),))


def _launcher_gpus(config: StackConfig) -> dict[str, list[tuple[int, ...]]]:
    out: dict[str, list[tuple[int, ...]]] = {}
    for slot in process_plan(config):
        out.setdefault(slot.stage, []).append(
            tuple(int(i) for i in slot.cuda_visible_devices.split(",")) if slot.cuda_visible_devices else ())
    return out


@pytest.mark.parametrize("env", [
    {"PLACEMENT_FILE": str(EXAMPLE)},
    {"PLACEMENT_FILE": str(EXAMPLE), "TOKEN2WAV_REPLICAS": "3", "TOKEN2WAV_DEVICES": "cuda:1,cuda:2"},
    {"PLACEMENT_DEFAULT_DEVICE": "cuda:0", "TOKEN2WAV_REPLICAS": "2"},     # same GPU: one scaled compose service
    {"PLACEMENT_DEFAULT_DEVICE": "cpu", "TOKENIZER_REPLICAS": "2"},
], ids=["example", "example-3-token2wav", "gpu0-scaled", "cpu"])
def test_compose_runs_what_the_launcher_runs(no_gpu, env):
    launcher = _launcher_gpus(StackConfig.from_env(env))
    placement = load_placement(env)
    compose = to_compose(placement)["services"]
    for stage, gpus in launcher.items():
        # compose: one service per replica, or one scaled service when all replicas share devices
        names = compose_service_names(placement, stage)
        compose_gpus = []
        for name in names:
            svc = compose[name]
            count = svc.get("deploy", {}).get("replicas", 1)
            devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            ids = tuple(int(i) for d in devices for i in d["device_ids"])
            compose_gpus += [ids] * count
        assert compose_gpus == gpus, stage
        assert compose[names[0]]["environment"]["TRITON_INSTANCE_COUNT"] == \
            str(placement.stage(stage).instances_per_device)


def test_plan_command_prints_devices_without_starting_anything(tmp_path):
    env = dict(os.environ, PLACEMENT_FILE=str(EXAMPLE), STACK_RUN_DIR=str(tmp_path / "run"))
    out = subprocess.run([sys.executable, "-m", "cosyvoice_launcher.stack", "plan", "--json"], env=env, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    procs = json.loads(out.stdout)
    assert [(p["stage"], p["device"], p["env"]["CUDA_VISIBLE_DEVICES"]) for p in procs][-2:] == \
        [("token2wav", "cuda:1", "1"), ("token2wav", "cuda:2", "2")]
    assert not (tmp_path / "run").exists()
    bad = subprocess.run([sys.executable, "-m", "cosyvoice_launcher.stack", "plan"], text=True, capture_output=True,
                         env=dict(env, LLM_DEVICES="tpu:0"), timeout=60)
    assert bad.returncode == 2 and "LLM_DEVICES" in bad.stderr
