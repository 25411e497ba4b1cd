#!/usr/bin/env python3
"""Container entrypoint of a stage image: fill the stage's config.pbtxt templates, exec tritonserver.

The image holds one stage's model repository under /opt/cosyvoice/services/$STAGE/model_repository. It is
copied to a writable place and every `${name}` is filled, as cosyvoice_tools.triton.render_model_repository
does for `make up`, from (first hit wins): the environment as `{STAGE}_{NAME}` or `{NAME}` (upper case,
e.g. LLM_MAX_BATCH_SIZE, TOKENIZER_BACKEND, MODEL_DIR), then the placement's variables that compose/helm
set (TRITON_INSTANCE_KIND/COUNT, TRITON_GPU_COUNT: the container's GPUs, numbered from 0), then the
launcher's defaults. An unfilled name stops the container with a message (house rule: no silent unsets).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from cosyvoice_common.constants import LLM_MAX_SEQ_LEN   # the image's PYTHONPATH holds the common package

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# cosyvoice_tools.stack's defaults (default_stage_params, StageSettings), so a container starts like `make up`.
DEFAULTS = {"max_batch_size": "16", "max_queue_delay_us": "0", "tokenizer_backend": "onnx",
            "speaker_backend": "onnx", "llm_dtype": "auto", "llm_max_seq_len": str(LLM_MAX_SEQ_LEN),
            "llm_batch_slots": "auto", "token2wav_dtype": "auto", "token2wav_compile": "auto"}


def placement_params(env: dict[str, str]) -> dict[str, str]:
    kind = env.get("TRITON_INSTANCE_KIND", "KIND_GPU")
    count = int(env.get("TRITON_INSTANCE_COUNT", "1"))
    gpus = int(env.get("TRITON_GPU_COUNT", "1" if kind == "KIND_GPU" else "0"))
    if count < 1 or kind not in ("KIND_GPU", "KIND_CPU") or (kind == "KIND_GPU") != (gpus > 0):
        raise SystemExit(f"bad placement: TRITON_INSTANCE_KIND={kind} TRITON_INSTANCE_COUNT={count} "
                         f"TRITON_GPU_COUNT={gpus}")
    return {"device_kind": kind, "instance_count": str(count), "device": "cuda:0" if gpus else "cpu",
            "gpu_ids": ", ".join(str(i) for i in range(gpus))}


def fill(text: str, env: dict[str, str], stage: str, source: str = "config.pbtxt") -> str:
    params = {**DEFAULTS, **placement_params(env)}
    missing: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group(1)
        for key in (f"{stage.upper()}_{name.upper()}", name.upper()):
            if env.get(key):
                return env[key]
        if name in params:
            return params[name]
        missing.append(name)
        return m.group(0)

    out = _VAR.sub(sub, text)
    if missing:
        raise SystemExit(f"{source}: no value for {', '.join(sorted(set(missing)))}; set it in the environment")
    return out


def main() -> None:
    env = dict(os.environ)
    stage = env["STAGE"]
    src = Path(env.get("COSYVOICE_ROOT", "/opt/cosyvoice")) / "services" / stage / "model_repository"
    dst = Path(env.get("MODEL_REPOSITORY", "/tmp/model_repository"))
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for cfg in dst.glob("*/config.pbtxt"):
        cfg.write_text(fill(cfg.read_text(), env, stage, source=str(cfg)))
    args = ["tritonserver", f"--model-repository={dst}",
            f"--http-port={env['TRITON_HTTP_PORT']}", f"--grpc-port={env['TRITON_GRPC_PORT']}",
            f"--metrics-port={env['TRITON_METRICS_PORT']}", "--allow-metrics=true", *sys.argv[1:]]
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()
