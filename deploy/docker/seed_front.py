#!/usr/bin/env python3
"""Container entrypoint of a seed-compatible front: render the `cosyvoice2` repository, exec tritonserver.

Runs in the gateway image (which holds services/gateway/model_repository and tritonserver). One template,
two variants, as `make up` renders them (cosyvoice_tools.stack._start_seed_fronts): SEED_DECOUPLED=true is
the streaming front (compose service `seed-stream`, 8000/8001/8002), false the offline one (`seed-offline`,
8010/8011/8012). Filled from the environment that compose/Helm set (placement.to_compose / to_k8s):
MODEL_DIR, REDIS_URL, {TOKENIZER,SPEAKER,LLM,TOKEN2WAV}_URLS, TRITON_{HTTP,GRPC,METRICS}_PORT and the
front settings of cosyvoice_gateway.seed.front_env_params (SEED_SPEAKER, SEED_PROMPT_WAV, SEED_PROMPT_TEXT,
SEED_LENGTH_FROM_TEXT, SEED_LENGTH_K, SEED_INSTANCES, ...). A missing variable or an unfilled `${name}`
stops the container with a message.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
REQUIRED = ("MODEL_DIR", "REDIS_URL", "TOKENIZER_URLS", "SPEAKER_URLS", "LLM_URLS", "TOKEN2WAV_URLS",
            "SEED_DECOUPLED", "TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT")


def template_values(env: Mapping[str, str]) -> dict[str, str]:
    """config.pbtxt values of the variant SEED_DECOUPLED names (cosyvoice_gateway.seed.template_params)."""
    from cosyvoice_gateway.seed import front_env_params, template_params

    missing = [k for k in REQUIRED if not env.get(k)]
    if missing:
        raise SystemExit(f"seed front: set {', '.join(missing)}")
    decoupled = env["SEED_DECOUPLED"].strip().lower()
    if decoupled not in ("true", "false"):
        raise SystemExit(f"seed front: SEED_DECOUPLED must be true (streaming) or false (offline), got {decoupled!r}")
    urls = {k: env[k] for k in ("TOKENIZER_URLS", "SPEAKER_URLS", "LLM_URLS", "TOKEN2WAV_URLS")}
    return template_params(decoupled == "true", Path(env["MODEL_DIR"]), urls, env["REDIS_URL"], front_env_params(env))


def fill(text: str, values: Mapping[str, str], source: str = "config.pbtxt") -> str:
    missing: list[str] = []

    def sub(m: re.Match) -> str:
        if m.group(1) in values:
            return values[m.group(1)]
        missing.append(m.group(1))
        return m.group(0)

    out = _VAR.sub(sub, text)
    if missing:
        raise SystemExit(f"{source}: no value for {', '.join(sorted(set(missing)))}")
    return out


def render(src: Path, dst: Path, env: Mapping[str, str]) -> Path:
    """Copy the template repository to `dst` and fill every config.pbtxt; returns `dst`."""
    values = template_values(env)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for cfg in dst.glob("*/config.pbtxt"):
        cfg.write_text(fill(cfg.read_text(), values, source=str(cfg)))
    return dst


def main() -> None:
    env = dict(os.environ)
    root = Path(env.get("COSYVOICE_ROOT", "/opt/cosyvoice"))
    dst = render(root / "services" / "gateway" / "model_repository",
                 Path(env.get("MODEL_REPOSITORY", "/tmp/seed_model_repository")), env)
    args = ["tritonserver", f"--model-repository={dst}",
            f"--http-port={env['TRITON_HTTP_PORT']}", f"--grpc-port={env['TRITON_GRPC_PORT']}",
            f"--metrics-port={env['TRITON_METRICS_PORT']}", "--allow-metrics=true", *sys.argv[1:]]
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()
