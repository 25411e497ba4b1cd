"""The gateway image's seed-front entrypoint renders the real `cosyvoice2` template from the compose / Helm
environment: both variants, every `${...}` filled, and stops on a missing or wrong variable."""
import importlib.util
import re
import sys
from pathlib import Path

import helm_chart
import pytest
import render
from cosyvoice_common.settings import ConfigError
from cosyvoice_common.stages import template_names
from cosyvoice_launcher.placement import (
    SEED_FRONTS,
    load_placement,
    to_compose,
)

REPO = Path(render.REPO_ROOT)
sys.path.insert(0, str(REPO / "services" / "gateway"))        # cosyvoice_gateway.seed, as the image's PYTHONPATH
spec = importlib.util.spec_from_file_location("seed_front", REPO / "deploy" / "docker" / "seed_front.py")
seed_front = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = seed_front
spec.loader.exec_module(seed_front)
TEMPLATE_REPO = REPO / "services" / "gateway" / "model_repository"


def compose_env(name: str, **overrides) -> dict[str, str]:
    doc = to_compose(load_placement(env={}, path=REPO / "deploy" / "placement.example.yaml"))
    env = dict(doc["services"][name]["environment"])
    # what compose's `${VAR:-default}` interpolation gives when the variable is unset
    env = {k: v.split(":-", 1)[1].rstrip("}") if v.startswith("${") else v for k, v in env.items()}
    return {**env, **overrides}


@pytest.mark.parametrize("name, decoupled, ports", SEED_FRONTS, ids=[n for n, _, _ in SEED_FRONTS])
def test_front_repository_renders_its_variant_from_the_compose_environment(tmp_path, name, decoupled, ports):
    out = seed_front.render(TEMPLATE_REPO, tmp_path / "repo", compose_env(name))
    text = (out / "cosyvoice2" / "config.pbtxt").read_text()
    assert not template_names(text)
    assert f"decoupled: {'true' if decoupled else 'false'}" in text
    assert 'string_value: "token2wav-0:8401,token2wav-1:8401"' in text      # the example's two token2wav replicas
    assert 'string_value: "redis://redis:6379/0"' in text and 'string_value: "/models/cosyvoice2"' in text
    assert 'key: "default_speaker" value: { string_value: "001" }' in text
    assert (out / "cosyvoice2" / "1" / "model.py").exists()


@pytest.mark.parametrize("name", [n for n, _, _ in SEED_FRONTS])
def test_front_repository_renders_from_the_helm_environment(tmp_path, name):
    env = helm_chart.env_values(helm_chart.template()[("Deployment", f"rel-{name}")])
    text = (seed_front.render(TEMPLATE_REPO, tmp_path / "repo", env) / "cosyvoice2" / "config.pbtxt").read_text()
    assert not template_names(text) and 'string_value: "rel-llm:8301"' in text


def test_speaker_settings_reach_the_model_parameters(tmp_path):
    env = compose_env("seed-offline", SEED_SPEAKER="alice", SEED_PROMPT_WAV="/models/cosyvoice2/p.wav",
                      SEED_PROMPT_TEXT='say "hi"', SEED_LENGTH_FROM_TEXT="ratio")
    text = (seed_front.render(TEMPLATE_REPO, tmp_path / "repo", env) / "cosyvoice2" / "config.pbtxt").read_text()
    assert 'string_value: "alice"' in text and 'string_value: "/models/cosyvoice2/p.wav"' in text
    assert 'string_value: "say \\"hi\\""' in text and 'string_value: "ratio"' in text


@pytest.mark.parametrize("change, match", [
    ({"SEED_DECOUPLED": "maybe"}, "SEED_DECOUPLED='maybe': expected one of"),
    ({"LLM_URLS": ""}, "LLM_URLS is not set"),
    ({"TRITON_HTTP_PORT": ""}, "TRITON_HTTP_PORT is not set"),
    ({"SEED_LENGTH_FROM_TEXT": "words"}, "SEED_LENGTH_FROM_TEXT='words': expected one of off, ratio"),
    ({"SEED_LENGTH_K": "-1"}, "SEED_LENGTH_K='-1': must be >= 0.01"),
])
def test_missing_or_wrong_variables_stop_the_container(tmp_path, change, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        seed_front.render(TEMPLATE_REPO, tmp_path / "repo", compose_env("seed-stream", **change))
