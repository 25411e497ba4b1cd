"""Each image builds what its stage needs and nothing else (checked statically: no Docker daemon here)."""
import fnmatch
import re
from pathlib import Path

import pytest

import render

REPO = Path(render.REPO_ROOT)
STAGES = ("tokenizer", "speaker", "llm", "token2wav")
SERVICES = (*STAGES, "gateway")


def instructions(service: str) -> list[tuple[str, str]]:
    text = (REPO / "services" / service / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)                     # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(instrs):
    last_from = max(i for i, (w, _) in enumerate(instrs) if w == "FROM")
    return instrs[last_from:]


def copy_sources(instrs) -> list[str]:
    srcs = []
    for word, rest in instrs:
        if word in ("COPY", "ADD"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            if any(p.startswith("--from") for p in rest.split()):
                continue                                   # from a build stage, not the context
            srcs.extend(parts[:-1])
    return srcs


def dockerignore() -> list[str]:
    return [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]


def ignored(path: str) -> bool:
    for pat in dockerignore():
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])):
                return True
    return False


@pytest.mark.parametrize("stage", STAGES)
def test_stage_image_is_triton_with_only_its_own_stage(stage):
    instrs = instructions(stage)
    froms = [r for w, r in instrs if w == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\$\{TRITON_TAG\}-py3", froms[0])
    srcs = copy_sources(instrs)
    assert f"services/{stage}" in srcs and "common/cosyvoice_common" in srcs
    others = [s for s in srcs if s.startswith("services/") and s.split("/")[1] != stage]
    assert not others, f"{stage} image copies another stage: {others}"
    assert "." not in srcs and "services" not in srcs and "services/" not in srcs
    runs = " ".join(r for w, r in instrs if w == "RUN")
    assert "torch==" in runs
    for other in set(STAGES) - {stage}:
        assert f"cosyvoice_{other}" not in runs


def test_dependencies_follow_what_each_stage_imports():
    runs = {s: " ".join(r for w, r in instructions(s) if w == "RUN") for s in SERVICES}
    assert "onnxruntime-gpu" in runs["tokenizer"] and "s3tokenizer" in runs["tokenizer"]
    assert "onnx2torch" in runs["speaker"] and "onnxruntime-gpu" in runs["speaker"]
    assert "onnxruntime" not in runs["llm"] and "onnxruntime" not in runs["token2wav"]
    assert "torch" not in runs["gateway"].replace("tritonclient", "")   # no torch in the gateway
    assert "tritonclient" in runs["gateway"] and "grpcio-health-checking" in runs["gateway"]


def test_gateway_image_is_slim_python_with_protos_built_in():
    instrs = instructions("gateway")
    final = final_stage(instrs)
    assert final[0] == ("FROM", "python:3.12-slim")
    srcs = copy_sources(final)
    assert "services/gateway" in srcs and "common/cosyvoice_common" in srcs
    assert not [s for s in srcs if s.startswith("services/") and s != "services/gateway"]
    assert any(w == "COPY" and "--from=protos" in r for w, r in final)
    assert "protos/cosyvoice" in copy_sources(instrs)


def test_gateway_image_can_run_the_seed_fronts():
    final = final_stage(instructions("gateway"))
    # the compose/Helm entrypoint of seed-stream / seed-offline, where placement points at it
    assert ("COPY", "deploy/docker/seed_front.py /opt/cosyvoice/bin/seed_front.py") in final
    runs = " ".join(r for w, r in final if w == "RUN")
    assert "tritonserver" in runs and "triton_python_backend_stub" in runs
    # the stub embeds this interpreter: numpy 2 would corrupt the BYTES texts (shared/notes/TRITON.md)
    assert '"numpy<2"' in runs


@pytest.mark.parametrize("service", SERVICES)
def test_image_has_healthcheck_and_runs_as_non_root(service):
    final = final_stage(instructions(service))
    assert any(w == "HEALTHCHECK" and "CMD" in r for w, r in final)
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{service} runs as root"
    user_index = max(i for i, (w, _) in enumerate(final) if w == "USER")
    assert any(w == "RUN" and f"useradd --uid 10001" in r and "cosyvoice" in r for w, r in final[:user_index])


@pytest.mark.parametrize("service", SERVICES)
def test_copied_paths_exist_and_are_not_dockerignored(service):
    for src in copy_sources(instructions(service)):
        assert not ignored(src), f"{service}: {src} is excluded by .dockerignore"
        if src.startswith("services/") or src.startswith("deploy/") or src.startswith("protos/"):
            assert (REPO / src).exists(), f"{service}: COPY {src} does not exist"


def test_dockerignore_keeps_local_state_out():
    for path in (".venv", ".git", "models/cosyvoice2-tiny/llm.pt", "services/llm/tests", "protos/gen"):
        assert ignored(path), path
    for path in ("services/llm/cosyvoice_llm", "common/cosyvoice_common", "deploy/docker/triton_stage.py"):
        assert not ignored(path), path
