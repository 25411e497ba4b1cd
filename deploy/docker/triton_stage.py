#!/usr/bin/env python3
"""Container entrypoint of a stage image: fill the stage's config.pbtxt templates, exec tritonserver.

The image holds one stage's model repository under /opt/cosyvoice/services/$STAGE/model_repository.
It is copied to a writable place; each `${NAME}` is filled from the environment (NAME, else NAME upper-
cased, so `${model_dir}` reads MODEL_DIR); `${TRITON_INSTANCE_GROUP}` (or a missing instance_group) gets
the placement's group: TRITON_INSTANCE_COUNT instances of TRITON_INSTANCE_KIND, on every GPU the container
was given. Unfilled names are left for model.py, which rejects them (house rule 4), and are listed here.
Variables come from placement.to_compose / to_k8s (ProcessSlot.env()).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def instance_group(env: dict[str, str]) -> str:
    count = int(env.get("TRITON_INSTANCE_COUNT", "1"))
    kind = env.get("TRITON_INSTANCE_KIND", "KIND_GPU")
    if count < 1 or kind not in ("KIND_GPU", "KIND_CPU"):
        raise SystemExit(f"bad TRITON_INSTANCE_COUNT={count} / TRITON_INSTANCE_KIND={kind}")
    return f"instance_group [ {{ count: {count} kind: {kind} }} ]"


def fill(text: str, env: dict[str, str]) -> tuple[str, list[str]]:
    group = instance_group(env)
    if "${TRITON_INSTANCE_GROUP}" not in text and not re.search(r"^\s*instance_group\b", text, re.M):
        text = text.rstrip("\n") + "\n${TRITON_INSTANCE_GROUP}\n"
    missing: list[str] = []

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name == "TRITON_INSTANCE_GROUP":
            return group
        for key in (name, name.upper()):
            if key in env:
                return env[key]
        missing.append(name)
        return m.group(0)

    return _VAR.sub(sub, text), missing


def main() -> None:
    env = dict(os.environ)
    stage = env["STAGE"]
    src = Path(env.get("COSYVOICE_ROOT", "/opt/cosyvoice")) / "services" / stage / "model_repository"
    dst = Path(env.get("MODEL_REPOSITORY", "/tmp/model_repository"))
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for cfg in dst.glob("*/config.pbtxt"):
        text, missing = fill(cfg.read_text(), env)
        cfg.write_text(text)
        if missing:
            print(f"[{stage}] {cfg.parent.name}/config.pbtxt: unfilled {sorted(set(missing))}", file=sys.stderr)
    args = ["tritonserver", f"--model-repository={dst}",
            f"--http-port={env['TRITON_HTTP_PORT']}", f"--grpc-port={env['TRITON_GRPC_PORT']}",
            f"--metrics-port={env['TRITON_METRICS_PORT']}", "--allow-metrics=true", *sys.argv[1:]]
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()
