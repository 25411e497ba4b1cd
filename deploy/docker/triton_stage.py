#!/usr/bin/env python3
"""Container entrypoint of a stage image: fill the stage's config.pbtxt templates, exec tritonserver.

The image holds one stage's model repository under $COSYVOICE_ROOT/services/$STAGE/model_repository. It is
copied to a writable place and filled, as `make up` fills it (cosyvoice_launcher.stack), with the one filler
(cosyvoice_common.stages.fill_template) from three typed sources, each validated before anything starts:
  - StageContainerEnv below: which stage, MODEL_DIR, ports, and the placement compose/Helm set
    (TRITON_INSTANCE_KIND/COUNT, TRITON_GPU_COUNT: the container's GPUs, numbered from 0);
  - the stage's settings, `{STAGE}_{NAME}` (cosyvoice_common.stage_params: e.g. LLM_MAX_BATCH_SIZE,
    TOKENIZER_BACKEND, TOKEN2WAV_DTYPE); docs/CONFIGURATION.md lists them all.
A bad or missing value stops the container with a message naming the variable.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# The image's PYTHONPATH holds the common package.
from cosyvoice_common.settings import ConfigError, from_env, knob, template_values
from cosyvoice_common.stage_params import stage_params
from cosyvoice_common.stages import STAGE_NAMES, fill_template

TRITON_KINDS = ("KIND_GPU", "KIND_CPU")


@dataclass(frozen=True, slots=True)
class StageContainerEnv:
    stage: str = knob("STAGE", "", "which stage this container serves", choices=STAGE_NAMES, required=True)
    model_dir: str = knob("MODEL_DIR", "", "model directory inside the container", required=True)
    http_port: int = knob("TRITON_HTTP_PORT", 0, "tritonserver HTTP port", low=1, high=65535, required=True)
    grpc_port: int = knob("TRITON_GRPC_PORT", 0, "tritonserver gRPC port", low=1, high=65535, required=True)
    metrics_port: int = knob("TRITON_METRICS_PORT", 0, "tritonserver metrics port", low=1, high=65535,
                             required=True)
    instance_kind: str = knob("TRITON_INSTANCE_KIND", "KIND_GPU", "Triton instance kind", choices=TRITON_KINDS)
    instance_count: int = knob("TRITON_INSTANCE_COUNT", 1, "Triton instances (per GPU on KIND_GPU)", low=1)
    gpu_count: int = knob("TRITON_GPU_COUNT", -1, "GPUs the container sees, used as cuda:0..N-1 "
                          "(-1: 1 on KIND_GPU, 0 on KIND_CPU)", low=-1)
    root: str = knob("COSYVOICE_ROOT", "/opt/cosyvoice", "where the image holds services/<stage>/model_repository")
    model_repository: str = knob("MODEL_REPOSITORY", "/tmp/model_repository", "where the filled repository goes")

    def __post_init__(self) -> None:
        gpus = self.gpus
        if (self.instance_kind == "KIND_GPU") != (gpus > 0):
            raise ConfigError(f"bad placement: TRITON_INSTANCE_KIND={self.instance_kind} "
                              f"TRITON_GPU_COUNT={gpus} (KIND_GPU needs GPUs, KIND_CPU none)")

    @property
    def gpus(self) -> int:
        if self.gpu_count >= 0:
            return self.gpu_count
        return 1 if self.instance_kind == "KIND_GPU" else 0

    def placement_values(self) -> dict[str, str]:
        return {"device_kind": self.instance_kind, "instance_count": str(self.instance_count),
                "device": "cuda:0" if self.gpus else "cpu", "gpu_ids": ", ".join(str(i) for i in range(self.gpus)),
                "model_dir": self.model_dir}


def template_values_from_env(env: Mapping[str, str]) -> tuple[StageContainerEnv, dict[str, str]]:
    """The container's settings and every `${name}` value of its stage's config.pbtxt."""
    container = from_env(StageContainerEnv, env)
    return container, {**template_values(stage_params(container.stage, env)), **container.placement_values()}


def render(env: Mapping[str, str]) -> tuple[StageContainerEnv, Path]:
    container, values = template_values_from_env(env)
    src = Path(container.root) / "services" / container.stage / "model_repository"
    dst = Path(container.model_repository)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for cfg in dst.glob("*/config.pbtxt"):
        cfg.write_text(fill_template(cfg.read_text(), values, source=str(cfg)))
    return container, dst


def main() -> None:
    try:
        container, repo = render(os.environ)
    except (ConfigError, ValueError) as exc:   # TemplateError is a ValueError
        raise SystemExit(f"stage container: {exc}") from None
    args = ["tritonserver", f"--model-repository={repo}", f"--http-port={container.http_port}",
            f"--grpc-port={container.grpc_port}", f"--metrics-port={container.metrics_port}",
            "--allow-metrics=true", *sys.argv[1:]]
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()
