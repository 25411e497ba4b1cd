"""Placement: where each stage runs, read from a YAML file and/or the launcher's variables."""
from pathlib import Path

import pytest
from cosyvoice_common.stages import PUBLIC_PORTS, STAGE_NAMES, STAGES
from cosyvoice_launcher.placement import (
    Placement,
    PlacementError,
    StagePlacement,
    deal_round_robin,
    default_placement,
    load_placement,
    parse_device,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "placement.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "placement.yaml"
    p.write_text(text)
    return p


def slots_of(placement: Placement, stage: str):
    return [s for s in placement.process_plan() if s.stage == stage]


def test_default_placement_runs_each_stage_once_on_gpu0():
    p = default_placement()
    plan = p.process_plan()
    assert [s.stage for s in plan] == list(STAGE_NAMES)
    assert all(s.device == "cuda:0" and s.cuda_visible_devices == "0" for s in plan)
    assert all(s.triton_kind == "KIND_GPU" and s.instance_count == 1 for s in plan)


def test_example_file_places_llm_token2wav_and_shared_gpu():
    p = load_placement(env={}, path=EXAMPLE)
    assert p.stage("llm").devices_per_replica == (("cuda:0",),)
    assert p.stage("token2wav").devices_per_replica == (("cuda:1",), ("cuda:2",))
    assert p.stage("token2wav").instances_per_device == 2
    assert p.stage("tokenizer").devices_per_replica == p.stage("speaker").devices_per_replica == (("cuda:3",),)
    t2w = slots_of(p, "token2wav")
    assert [(s.cuda_visible_devices, s.port_offset) for s in t2w] == [("1", 0), ("2", 10)]
    assert [s.grpc_port for s in t2w] == [8401, 8411]
    assert p.stage_urls("token2wav", host="h") == "h:8401,h:8411"


def test_placement_file_is_read_from_env_variable():
    p = load_placement(env={"PLACEMENT_FILE": str(EXAMPLE)})
    assert p.stage("token2wav").replicas == 2


def test_env_overrides_file_and_deals_devices_round_robin():
    env = {"TOKEN2WAV_REPLICAS": "3", "TOKEN2WAV_DEVICES": "cuda:1, CUDA:2", "LLM_INSTANCES": "2"}
    p = load_placement(env=env, path=EXAMPLE)
    assert p.stage("token2wav").devices_per_replica == (("cuda:1",), ("cuda:2",), ("cuda:1",))
    assert [s.http_port for s in slots_of(p, "token2wav")] == [8400, 8410, 8420]
    assert p.stage("llm").instances_per_device == 2
    assert p.stage("speaker").devices_per_replica == (("cuda:3",),)          # untouched by token2wav's variables


def test_more_devices_than_replicas_is_an_error_but_explicit_lists_give_several_gpus(tmp_path):
    with pytest.raises(PlacementError, match="llm: 4 devices .* for 2 replica"):
        load_placement(env={"LLM_REPLICAS": "2", "LLM_DEVICES": "cuda:0,cuda:1,cuda:2,cuda:3"})
    f = write(tmp_path, "stages:\n  llm:\n    devices: [[cuda:0, cuda:2], [cuda:1, cuda:3]]\n")
    p = load_placement(env={}, path=f)
    assert p.stage("llm").devices_per_replica == (("cuda:0", "cuda:2"), ("cuda:1", "cuda:3"))
    slots = slots_of(p, "llm")
    assert [s.cuda_visible_devices for s in slots] == ["0,2", "1,3"]
    assert slots[0].template_params() == {"device": "cuda:0", "device_kind": "KIND_GPU", "gpu_ids": "0, 1",
                                          "instance_count": "1"}


def test_env_replicas_redeal_an_explicit_file_list(tmp_path):
    f = write(tmp_path, "stages:\n  token2wav:\n    devices: [[cuda:1], [cuda:2]]\n")
    assert load_placement(env={}, path=f).stage("token2wav").replicas == 2
    p = load_placement(env={"TOKEN2WAV_REPLICAS": "4"}, path=f)
    assert p.stage("token2wav").devices_per_replica == (("cuda:1",), ("cuda:2",), ("cuda:1",), ("cuda:2",))


def test_cpu_replica_hides_every_gpu():
    p = load_placement(env={"PLACEMENT_DEFAULT_DEVICE": "cpu", "LLM_DEVICES": "cuda:0"})
    tok = slots_of(p, "tokenizer")[0]
    assert tok.device == "cpu" and tok.cuda_visible_devices == "" and tok.triton_kind == "KIND_CPU"
    assert tok.env()["CUDA_VISIBLE_DEVICES"] == ""
    assert "kind: KIND_CPU" in tok.instance_group_pbtxt()
    assert tok.template_params() == {"device": "cpu", "device_kind": "KIND_CPU", "gpu_ids": "", "instance_count": "1"}
    assert [s.cuda_visible_devices for s in slots_of(p, "llm")] == ["0"]


def test_empty_variables_count_as_unset():
    p = load_placement(env={"LLM_REPLICAS": "", "LLM_DEVICES": " ", "PLACEMENT_FILE": ""})
    assert p == default_placement()


def test_slot_env_and_instance_group_carry_the_placement():
    p = load_placement(env={"TOKEN2WAV_INSTANCES": "3", "TOKEN2WAV_DEVICES": "cuda:2"})
    slot = slots_of(p, "token2wav")[0]
    assert slot.env() == {"STAGE": "token2wav", "CUDA_VISIBLE_DEVICES": "2", "TRITON_HTTP_PORT": "8400",
                          "TRITON_GRPC_PORT": "8401", "TRITON_METRICS_PORT": "8402",
                          "TRITON_INSTANCE_COUNT": "3", "TRITON_INSTANCE_KIND": "KIND_GPU", "TRITON_GPU_COUNT": "1"}
    assert slot.instance_group_pbtxt() == "instance_group [ { count: 3 kind: KIND_GPU } ]"
    assert slot.triton_model == "token2wav"


def test_stage_url_variable_names():
    assert [s.urls_env for s in STAGES] == ["TOKENIZER_URLS", "SPEAKER_URLS", "LLM_URLS", "TOKEN2WAV_URLS"]


def test_round_robin_with_fewer_devices_reuses_them():
    assert deal_round_robin(("cuda:0", "cuda:1"), 3) == (("cuda:0",), ("cuda:1",), ("cuda:0",))


# --- errors: each names what is wrong ----------------------------------------------------------------

@pytest.mark.parametrize("text", ["gpu:1", "cuda:-1", "cuda:x", "cuda", "cuda:01", "", "cpu:0"])
def test_bad_device_syntax_is_rejected(text):
    with pytest.raises(PlacementError, match="expected 'cpu' or 'cuda:N'"):
        parse_device(text)


def test_bad_device_in_env_names_the_variable():
    with pytest.raises(PlacementError, match="LLM_DEVICES"):
        load_placement(env={"LLM_DEVICES": "cuda:0,gpu1"})


@pytest.mark.parametrize("env, match", [
    ({"LLM_REPLICAS": "-1"}, "LLM_REPLICAS: must not be negative"),
    ({"LLM_REPLICAS": "0"}, "llm: replicas must be >= 1"),
    ({"TOKEN2WAV_INSTANCES": "0"}, "token2wav: instances must be >= 1"),
    ({"SPEAKER_INSTANCES": "two"}, "SPEAKER_INSTANCES: expected an integer"),
])
def test_bad_counts_in_env_are_rejected(env, match):
    with pytest.raises(PlacementError, match=match):
        load_placement(env=env)


@pytest.mark.parametrize("text, match", [
    ("stages:\n  vocoder: {replicas: 1}\n", "unknown stage 'vocoder'"),
    ("stages:\n  llm: {replica: 1}\n", r"stages.llm: unknown keys \['replica'\]"),
    ("stages:\n  llm: {replicas: -3}\n", "stages.llm.replicas: must not be negative"),
    ("stages:\n  llm: {replicas: true}\n", "expected an integer"),
    ("stages:\n  llm: {devices: [cuda:0, tpu:1]}\n", "stages.llm.devices"),
    ("stages:\n  llm: {devices: []}\n", "non-empty list"),
    ("stages:\n  llm: {replicas: 3, devices: [[cuda:0], [cuda:1]]}\n", "replicas = 3 but devices lists 2"),
    ("stages:\n  llm: {devices: [[cpu, cuda:1]]}\n", "'cpu' cannot be mixed"),
    ("stages:\n  llm: {devices: [[cuda:1, cuda:1]]}\n", "listed twice"),
    ("stage:\n  llm: {}\n", "unknown keys"),
    ("- llm\n", "top level must be a mapping"),
    ("stages: [llm]\n", "'stages' must map"),
    ("stages: {llm: {replicas: 1}\n", "not valid YAML"),
])
def test_bad_files_are_rejected_with_the_field_named(tmp_path, text, match):
    with pytest.raises(PlacementError, match=match):
        load_placement(env={}, path=write(tmp_path, text))


def test_missing_file_is_a_placement_error(tmp_path):
    with pytest.raises(PlacementError, match="placement file"):
        load_placement(env={}, path=tmp_path / "nope.yaml")


def test_port_collisions_are_rejected():
    with pytest.raises(PlacementError, match="port 8200 already used by tokenizer replica 10"):
        load_placement(env={"TOKENIZER_REPLICAS": "11", "TOKENIZER_DEVICES": "cpu"})
    with pytest.raises(PlacementError, match="already used by a public port"):
        load_placement(env={"LLM_BASE_PORT": "8010"})
    assert 8000 in PUBLIC_PORTS and 50051 in PUBLIC_PORTS


def test_stage_placement_validates_when_built_directly():
    with pytest.raises(PlacementError, match="lists 1 replicas, replicas = 2"):
        StagePlacement(2, (("cuda:0",),))
    with pytest.raises(PlacementError, match="not normalised"):
        StagePlacement(1, (("CUDA:0",),))
    with pytest.raises(PlacementError, match="no device"):
        StagePlacement(1, ((),))
    with pytest.raises(PlacementError, match="instances_per_device must be >= 1"):
        StagePlacement(1, (("cpu",),), instances_per_device=0)


def test_placement_covers_exactly_the_registry_stages():
    p = default_placement()
    assert [name for name, _ in p.items()] == list(STAGE_NAMES)
    with pytest.raises(PlacementError, match="stages must name exactly"):
        Placement({name: sp for name, sp in p.items() if name != "llm"})
    with pytest.raises(PlacementError, match="unknown stage 'vocoder'"):
        p.stage("vocoder")


def test_a_gateway_section_is_no_longer_a_placement_key(tmp_path):
    # Gateway replicas are a Helm value (gateway.replicas); compose runs one gateway on the published ports.
    with pytest.raises(PlacementError, match="unknown keys"):
        load_placement(env={}, path=write(tmp_path, "gateway: {replicas: 2}\n"))
