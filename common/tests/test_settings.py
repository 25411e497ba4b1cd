"""Typed configuration from the environment: defaults, parsing, and errors that name the variable."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from cosyvoice_common.settings import ConfigError, document, from_env, knob, template_values, variables
from cosyvoice_common.stage_params import STAGE_PARAMS, LLMParams, stage_params
from cosyvoice_common.stages import STAGE_NAMES, stage, template_names

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class Example:
    port: int = knob("PORT", 8080, "where it listens", low=0, high=65535)
    ratio: float = knob("RATIO", 0.5, "a share", low=0.0, high=1.0)
    mode: str = knob("MODE", "off", "a switch", choices=("off", "on"))
    fast: bool = knob("FAST", False, "a flag")
    keys: tuple[str, ...] = knob("KEYS", (), "a list", secret=True)
    home: Path = knob("HOME_DIR", Path("/srv"), "a path")
    url: str = knob("URL", "", "needed", required=True)


def test_unset_and_empty_variables_take_the_defaults():
    config = from_env(Example, {"URL": "x", "PORT": "", "MODE": "  "})
    assert config == Example(url="x")


def test_values_are_parsed_by_the_field_type():
    config = from_env(Example, {"URL": "x", "PORT": "9000", "RATIO": "0.25", "MODE": "on", "FAST": "yes",
                                "KEYS": " a, b ,,", "HOME_DIR": "/data"})
    assert (config.port, config.ratio, config.mode, config.fast, config.keys, config.home) == (
        9000, 0.25, "on", True, ("a", "b"), Path("/data"))


@pytest.mark.parametrize("env, message", [
    ({"PORT": "http"}, "PORT='http': expected an integer"),
    ({"PORT": "70000"}, "PORT='70000': must be <= 65535"),
    ({"RATIO": "-0.1"}, "RATIO='-0.1': must be >= 0"),
    ({"MODE": "maybe"}, "MODE='maybe': expected one of off, on"),
    ({"FAST": "2"}, "FAST='2': expected one of 1, true"),
    ({"URL": ""}, "URL is not set; it is required (needed)"),
])
def test_a_bad_value_is_refused_naming_the_variable_and_what_it_allows(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_env(Example, {"URL": "x", **env})


def test_a_prefix_selects_one_stage_and_ignores_the_others():
    llm = stage_params("llm", {"LLM_MAX_BATCH_SIZE": "32", "TOKEN2WAV_MAX_BATCH_SIZE": "2", "MAX_BATCH_SIZE": "7"})
    assert llm.max_batch_size == 32
    with pytest.raises(ConfigError, match=re.escape("LLM_BATCH_SLOTS='many': expected auto or a positive number")):
        stage_params("llm", {"LLM_BATCH_SLOTS": "many"})
    assert variables(LLMParams, "LLM_")[:2] == ("LLM_MAX_BATCH_SIZE", "LLM_MAX_QUEUE_DELAY_US")


def test_secrets_and_required_values_are_not_shown_in_the_table():
    rows = {row.variable: row for row in document(Example)}
    assert rows["KEYS"].default == "(empty)" and rows["URL"].default == "(required)" and rows["FAST"].type == "bool"


@dataclass(frozen=True, slots=True)
class WithSecret:
    token: str = knob("TOKEN", "", "a secret", choices=("", "right-one"), secret=True)


def test_a_refused_secret_is_not_echoed():
    with pytest.raises(ConfigError) as err:
        from_env(WithSecret, {"TOKEN": "hunter2"})
    assert "TOKEN=(hidden)" in str(err.value) and "hunter2" not in str(err.value)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_settings_and_placement_fill_every_name_of_the_stage_template(name):
    """The explicit list is complete (nothing in a stage's config.pbtxt is left to a catch-all) and every
    setting reaches the template (none is read by nobody)."""
    (template,) = (REPO / stage(name).service_dir / "model_repository").glob("*/config.pbtxt")
    names = template_names(template.read_text())
    placement = {"model_dir", "device", "device_kind", "gpu_ids", "instance_count"}
    settings = set(template_values(STAGE_PARAMS[name]()))
    assert names <= placement | settings and settings <= names


def test_a_config_built_directly_is_checked_too():
    with pytest.raises(ConfigError, match=re.escape("MAX_BATCH_SIZE=0: must be >= 1")):
        STAGE_PARAMS["token2wav"](max_batch_size=0)
    with pytest.raises(ConfigError, match=re.escape("DTYPE='fp8': expected one of")):
        LLMParams(dtype="fp8")


def _model_config(params) -> dict:
    """Triton's model config JSON of a template filled from `params` (the batching fields where the template
    puts them; a zero queue delay left out, as proto3 JSON does)."""
    values = template_values(params)
    batching = {"max_batch_size": int(values.pop("max_batch_size"))}
    delay = values.pop("max_queue_delay_us")
    if delay != "0":
        batching["dynamic_batching"] = {"max_queue_delay_microseconds": delay}
    parameters = {key: {"string_value": value} for key, value in values.items()}
    parameters["model_dir"] = {"string_value": "/models/x"}     # placement: not a setting
    return {**batching, "parameters": parameters}


@pytest.mark.parametrize("env", [{}, {"LLM_BATCH_SLOTS": "12", "LLM_CUDA_GRAPHS": "0", "LLM_REPETITION": "off",
                                      "LLM_MAX_QUEUE_DELAY_US": "300", "LLM_KV_CACHE_MEMORY_FRACTION": "0.35"}])
def test_a_stage_reads_back_the_settings_its_template_was_filled_from(env):
    params = stage_params("llm", env)
    assert LLMParams.from_model_config(_model_config(params)) == params


def test_an_unfilled_or_bad_parameter_is_refused_naming_it():
    config = _model_config(LLMParams())
    config["parameters"]["dtype"] = {"string_value": "${dtype}"}
    with pytest.raises(ConfigError, match=re.escape("config.pbtxt parameter 'dtype' is not set")):
        LLMParams.from_model_config(config)
    config["parameters"]["dtype"] = {"string_value": "fp8"}
    with pytest.raises(ConfigError, match=re.escape("dtype='fp8': expected one of")):
        LLMParams.from_model_config(config)
