#!/usr/bin/env python3
"""Container entrypoint of a seed-compatible front: render the `cosyvoice2` repository, exec tritonserver.

Runs in the gateway image (which holds services/gateway/model_repository and tritonserver). One template,
two variants, as `make up` renders them (cosyvoice_launcher.stack): SEED_DECOUPLED=true is the streaming front
(compose service `seed-stream`, 8000/8001/8002), false the offline one (`seed-offline`, 8010/8011/8012).
Filled with the one filler (cosyvoice_common.stages.fill_template) from SeedContainerEnv below (what
compose/Helm set: MODEL_DIR, REDIS_URL, {STAGE}_URLS, SEED_DECOUPLED, TRITON_*_PORT) and the front settings
cosyvoice_gateway.seed.SeedFrontSettings (SEED_SPEAKER, SEED_PROMPT_WAV, SEED_LENGTH_FROM_TEXT, ...);
docs/CONFIGURATION.md lists them. A bad or missing value stops the container with a message naming it.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cosyvoice_common.settings import ConfigError, from_env, knob
from cosyvoice_common.stages import (
    DEFAULT_REDIS_URL,
    LLM,
    SPEAKER,
    STAGES,
    TOKEN2WAV,
    TOKENIZER,
    fill_template,
    stage,
)
from cosyvoice_gateway.seed import SeedFrontSettings, template_params


def _urls(name: str):
    return knob(stage(name).urls_env, "", f"gRPC host:port of the {name} stage (comma-separated replicas)",
                required=True)


@dataclass(frozen=True, slots=True)
class SeedContainerEnv:
    decoupled: bool = knob("SEED_DECOUPLED", False, "true: the streaming front; false: the offline one",
                           required=True)
    model_dir: str = knob("MODEL_DIR", "", "model directory inside the container", required=True)
    redis_url: str = knob("REDIS_URL", DEFAULT_REDIS_URL, "spk2info cache and speaker registry")
    # one `{stage}_urls` per stage of the registry (stage_urls() reads them by name)
    tokenizer_urls: str = _urls(TOKENIZER)
    speaker_urls: str = _urls(SPEAKER)
    llm_urls: str = _urls(LLM)
    token2wav_urls: str = _urls(TOKEN2WAV)
    http_port: int = knob("TRITON_HTTP_PORT", 0, "tritonserver HTTP port", low=1, high=65535, required=True)
    grpc_port: int = knob("TRITON_GRPC_PORT", 0, "tritonserver gRPC port", low=1, high=65535, required=True)
    metrics_port: int = knob("TRITON_METRICS_PORT", 0, "tritonserver metrics port", low=1, high=65535,
                             required=True)
    root: str = knob("COSYVOICE_ROOT", "/opt/cosyvoice", "where the image holds services/gateway/model_repository")
    model_repository: str = knob("MODEL_REPOSITORY", "/tmp/seed_model_repository",
                                 "where the filled repository goes")

    def stage_urls(self) -> dict[str, str]:
        return {s.urls_env: getattr(self, f"{s.name}_urls") for s in STAGES}


def template_values(env: Mapping[str, str]) -> tuple[SeedContainerEnv, dict[str, str]]:
    """The container's settings and the config.pbtxt values of the variant SEED_DECOUPLED names."""
    container = from_env(SeedContainerEnv, env)
    return container, template_params(container.decoupled, Path(container.model_dir), container.stage_urls(),
                                      container.redis_url, from_env(SeedFrontSettings, env))


def render(src: Path, dst: Path, env: Mapping[str, str]) -> Path:
    """Copy the template repository to `dst` and fill every config.pbtxt; returns `dst`."""
    _, values = template_values(env)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for cfg in dst.glob("*/config.pbtxt"):
        cfg.write_text(fill_template(cfg.read_text(), values, source=str(cfg)))
    return dst


def main() -> None:
    try:
        container = from_env(SeedContainerEnv, os.environ)
        dst = render(Path(container.root) / "services" / "gateway" / "model_repository",
                     Path(container.model_repository), os.environ)
    except (ConfigError, ValueError) as exc:   # TemplateError is a ValueError
        raise SystemExit(f"seed front: {exc}") from None
    args = ["tritonserver", f"--model-repository={dst}", f"--http-port={container.http_port}",
            f"--grpc-port={container.grpc_port}", f"--metrics-port={container.metrics_port}",
            "--allow-metrics=true", *sys.argv[1:]]
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()
