"""The stage image's entrypoint fills config.pbtxt templates from the placement's variables."""
import importlib.util
from pathlib import Path

import pytest

import render

spec = importlib.util.spec_from_file_location("triton_stage", Path(render.DEPLOY_DIR) / "docker" / "triton_stage.py")
triton_stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(triton_stage)


def test_fills_variables_and_the_instance_group_placeholder():
    env = {"MODEL_DIR": "/models/x", "TRITON_INSTANCE_COUNT": "2", "TRITON_INSTANCE_KIND": "KIND_GPU"}
    text, missing = triton_stage.fill(
        'name: "llm"\nparameters { key: "model_dir" value: { string_value: "${model_dir}" } }\n'
        '${TRITON_INSTANCE_GROUP}\nparameters { key: "x" value: { string_value: "${unknown_knob}" } }\n', env)
    assert '"/models/x"' in text and "instance_group [ { count: 2 kind: KIND_GPU } ]" in text
    assert missing == ["unknown_knob"] and "${unknown_knob}" in text


def test_appends_an_instance_group_when_the_template_has_none_and_keeps_an_explicit_one():
    env = {"TRITON_INSTANCE_COUNT": "1", "TRITON_INSTANCE_KIND": "KIND_CPU"}
    text, _ = triton_stage.fill('name: "speaker_embedding"\n', env)
    assert text.endswith("instance_group [ { count: 1 kind: KIND_CPU } ]\n")
    fixed = 'name: "m"\ninstance_group [ { count: 4 kind: KIND_GPU } ]\n'
    assert triton_stage.fill(fixed, env)[0] == fixed


def test_bad_instance_settings_stop_the_container():
    with pytest.raises(SystemExit):
        triton_stage.instance_group({"TRITON_INSTANCE_COUNT": "0"})
    with pytest.raises(SystemExit):
        triton_stage.instance_group({"TRITON_INSTANCE_KIND": "KIND_TPU"})
