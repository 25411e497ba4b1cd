"""The stage image's entrypoint fills the stage's real config.pbtxt templates from what compose and the Helm chart
set and the stage's explicit settings (cosyvoice_common.stage_params), and stops on a bad or unknown value."""
import importlib.util
import re
import sys
from pathlib import Path

import helm_chart
import pytest
import render
from cosyvoice_common.settings import ConfigError
from cosyvoice_common.stages import STAGES, TemplateError, fill_template, template_names
from cosyvoice_launcher.placement import load_placement, to_compose

spec = importlib.util.spec_from_file_location("triton_stage", Path(render.DEPLOY_DIR) / "docker" / "triton_stage.py")
triton_stage = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = triton_stage
spec.loader.exec_module(triton_stage)
REPO = Path(render.REPO_ROOT)
STAGE_MODELS = {s.name: s.triton_model for s in STAGES}


def compose_env(stage: str) -> dict[str, str]:
    doc = to_compose(load_placement(env={}, path=Path(render.REPO_ROOT) / "deploy" / "placement.example.yaml"))
    name = stage if stage in doc["services"] else f"{stage}-0"
    return dict(doc["services"][name]["environment"])


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_every_stage_repository_renders_from_the_compose_environment(stage, tmp_path):
    env = {**compose_env(stage), "COSYVOICE_ROOT": str(render.REPO_ROOT), "MODEL_REPOSITORY": str(tmp_path / "repo")}
    container, repo = triton_stage.render(env)
    (config,) = repo.glob("*/config.pbtxt")
    text = config.read_text()
    assert container.stage == stage and not template_names(text)
    assert "/models/cosyvoice2" in text and "KIND_GPU" in text


@pytest.mark.parametrize("values_file, kind", [(None, "KIND_GPU"), ("cpu-only.yaml", "KIND_CPU")],
                         ids=["default", "cpu-only"])
def test_every_stage_template_fills_from_the_helm_environment(values_file, kind):
    objs = helm_chart.template(*([helm_chart.EXAMPLES / values_file] if values_file else []))
    for stage, model in STAGE_MODELS.items():
        template = REPO / "services" / stage / "model_repository" / model / "config.pbtxt"
        env = helm_chart.env_values(objs[("Deployment", f"rel-{stage}")])
        _, values = triton_stage.template_values_from_env(env)
        text = fill_template(template.read_text(), values, source=str(template))
        assert not template_names(text)
        assert "/models/cosyvoice2" in text and kind in text


def test_gpu_container_sees_its_gpus_from_zero_and_takes_its_stage_settings():
    env = {"STAGE": "llm", "MODEL_DIR": "/m", "TRITON_HTTP_PORT": "8300", "TRITON_GRPC_PORT": "8301",
           "TRITON_METRICS_PORT": "8302", "TRITON_INSTANCE_KIND": "KIND_GPU", "TRITON_INSTANCE_COUNT": "2",
           "TRITON_GPU_COUNT": "2", "LLM_MAX_BATCH_SIZE": "64", "LLM_CUDA_GRAPHS": "0", "LLM_REPETITION": "off",
           "TOKENIZER_MAX_BATCH_SIZE": "3"}
    _, values = triton_stage.template_values_from_env(env)
    assert (values["device"], values["gpu_ids"], values["instance_count"], values["model_dir"]) == (
        "cuda:0", "0, 1", "2", "/m")
    assert (values["max_batch_size"], values["dtype"], values["cuda_graphs"], values["repetition"]) == (
        "64", "auto", "0", "off")                          # another stage's variable is not this stage's


def test_cpu_container_has_no_gpus():
    env = {"STAGE": "speaker", "MODEL_DIR": "/m", "TRITON_HTTP_PORT": "1", "TRITON_GRPC_PORT": "2",
           "TRITON_METRICS_PORT": "3", "TRITON_INSTANCE_KIND": "KIND_CPU"}
    _, values = triton_stage.template_values_from_env(env)
    assert (values["device_kind"], values["device"], values["gpu_ids"], values["backend"]) == (
        "KIND_CPU", "cpu", "", "onnx")


BASE = {"STAGE": "token2wav", "MODEL_DIR": "/m", "TRITON_HTTP_PORT": "8400", "TRITON_GRPC_PORT": "8401",
        "TRITON_METRICS_PORT": "8402"}


@pytest.mark.parametrize("change, match", [
    ({"TRITON_INSTANCE_COUNT": "0"}, "TRITON_INSTANCE_COUNT='0': must be >= 1"),
    ({"TRITON_INSTANCE_KIND": "KIND_TPU"}, "TRITON_INSTANCE_KIND='KIND_TPU': expected one of KIND_GPU, KIND_CPU"),
    ({"TRITON_INSTANCE_KIND": "KIND_CPU", "TRITON_GPU_COUNT": "1"}, "bad placement"),
    ({"STAGE": "vocoder"}, "STAGE='vocoder': expected one of tokenizer, speaker, llm, token2wav"),
    ({"TRITON_GRPC_PORT": ""}, "TRITON_GRPC_PORT is not set"),
    ({"TOKEN2WAV_DTYPE": "fp8"}, "TOKEN2WAV_DTYPE='fp8': expected one of auto, float32"),
    ({"TOKEN2WAV_CUDA_GRAPHS": "maybe"}, "TOKEN2WAV_CUDA_GRAPHS='maybe'"),
])
def test_a_bad_variable_stops_the_container_naming_it(change, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        triton_stage.template_values_from_env({**BASE, **change})


def test_a_template_name_no_setting_fills_stops_the_container(tmp_path):
    root = tmp_path / "root"
    model = root / "services" / "speaker" / "model_repository" / "speaker_embedding"
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text("max_batch_size: ${max_batch_size} ${mystery_knob}")
    env = {**BASE, "STAGE": "speaker", "COSYVOICE_ROOT": str(root), "MODEL_REPOSITORY": str(tmp_path / "out")}
    with pytest.raises(TemplateError, match=re.escape("no value for ${mystery_knob}")):
        triton_stage.render(env)
