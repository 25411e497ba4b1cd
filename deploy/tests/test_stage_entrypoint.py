"""The stage image's entrypoint fills the stage's real config.pbtxt templates from what compose and the Helm
chart set."""
import importlib.util
from pathlib import Path

import pytest

import helm_chart
import render
from cosyvoice_common.stages import STAGES
from cosyvoice_tools.placement import load_placement, to_compose

spec = importlib.util.spec_from_file_location("triton_stage", Path(render.DEPLOY_DIR) / "docker" / "triton_stage.py")
triton_stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(triton_stage)
REPO = Path(render.REPO_ROOT)
STAGE_MODELS = {s.name: s.triton_model for s in STAGES}


@pytest.mark.parametrize("stage", STAGE_MODELS)
def test_every_stage_template_fills_from_the_compose_environment(stage):
    template = REPO / "services" / stage / "model_repository" / STAGE_MODELS[stage] / "config.pbtxt"
    assert template.exists(), template
    doc = to_compose(load_placement(env={}, path=REPO / "deploy" / "placement.example.yaml"))
    name = stage if stage in doc["services"] else f"{stage}-0"
    env = doc["services"][name]["environment"]
    text = triton_stage.fill(template.read_text(), env, stage)
    assert not triton_stage._VAR.search(text)
    assert "/models/cosyvoice2" in text and "KIND_GPU" in text


@pytest.mark.parametrize("values_file, kind", [(None, "KIND_GPU"), ("cpu-only.yaml", "KIND_CPU")],
                         ids=["default", "cpu-only"])
def test_every_stage_template_fills_from_the_helm_environment(values_file, kind):
    objs = helm_chart.template(*([helm_chart.EXAMPLES / values_file] if values_file else []))
    for stage, model in STAGE_MODELS.items():
        template = REPO / "services" / stage / "model_repository" / model / "config.pbtxt"
        env = helm_chart.env_values(objs[("Deployment", f"rel-{stage}")])
        text = triton_stage.fill(template.read_text(), env, stage)
        assert not triton_stage._VAR.search(text)
        assert "/models/cosyvoice2" in text and kind in text


def test_gpu_container_sees_its_gpus_from_zero():
    env = {"TRITON_INSTANCE_KIND": "KIND_GPU", "TRITON_INSTANCE_COUNT": "2", "TRITON_GPU_COUNT": "2",
           "MODEL_DIR": "/m", "LLM_MAX_BATCH_SIZE": "64", "MAX_BATCH_SIZE": "8"}
    text = triton_stage.fill("${device} [${gpu_ids}] ${instance_count} ${model_dir} ${max_batch_size} ${llm_dtype}",
                             env, "llm")
    assert text == "cuda:0 [0, 1] 2 /m 64 auto"            # stage-specific variable beats the generic one


def test_cpu_container_and_unfilled_names():
    env = {"TRITON_INSTANCE_KIND": "KIND_CPU", "TRITON_GPU_COUNT": "0"}
    assert triton_stage.fill("${device_kind} ${device} [${gpu_ids}]", env, "speaker") == "KIND_CPU cpu []"
    with pytest.raises(SystemExit, match="no value for mystery_knob"):
        triton_stage.fill("${mystery_knob}", env, "speaker")


@pytest.mark.parametrize("env", [{"TRITON_INSTANCE_COUNT": "0"}, {"TRITON_INSTANCE_KIND": "KIND_TPU"},
                                 {"TRITON_INSTANCE_KIND": "KIND_CPU", "TRITON_GPU_COUNT": "1"}])
def test_inconsistent_placement_variables_stop_the_container(env):
    with pytest.raises(SystemExit, match="bad placement"):
        triton_stage.placement_params(env)
