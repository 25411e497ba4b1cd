"""Each image builds what its component needs and nothing else (checked statically: no Docker daemon here).
The four stage images come from one recipe, deploy/docker/Dockerfile.stage, read here once per stage with its
build arg STAGE substituted; the gateway image has its own Dockerfile."""
import fnmatch
import re
from pathlib import Path

import pytest
import render
from cosyvoice_common.stages import STAGE_NAMES
from cosyvoice_launcher.placement import GATEWAY_DOCKERFILE, STAGE_DOCKERFILE

REPO = Path(render.REPO_ROOT)
STAGES = STAGE_NAMES
SERVICES = (*STAGES, "gateway")


def dockerfile(service: str) -> str:
    """The recipe `service` is built from, with the stage's build arg substituted (as `docker build
    --build-arg STAGE=<stage>` does in every instruction after `ARG STAGE`)."""
    if service == "gateway":
        return (REPO / GATEWAY_DOCKERFILE).read_text()
    return re.sub(r"\$\{STAGE\}|\$STAGE\b", service, (REPO / STAGE_DOCKERFILE).read_text())


def instructions(service: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile(service))                     # join continuation lines
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


def expand(src: str) -> list[str]:
    """A COPY source as Docker reads it: a glob matches files of the build context."""
    if not any(ch in src for ch in "*?["):
        return [src]
    return sorted(str(p.relative_to(REPO)) for p in REPO.glob(src))


def copy_sources(instrs) -> list[str]:
    srcs = []
    for word, rest in instrs:
        if word in ("COPY", "ADD"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            if any(p.startswith("--from") for p in rest.split()):
                continue                                   # from a build stage, not the context
            srcs.extend(s for p in parts[:-1] for s in expand(p))
    return srcs


def requirement_files(service: str) -> list[str]:
    """The requirements files the image installs: COPYed from its own folder, then `pip install -r`."""
    instrs = instructions(service)
    copied = {}
    for word, rest in instrs:
        if word == "COPY" and "--from" not in rest:
            parts = rest.split()
            for src in (s for p in parts[:-1] for s in expand(p)):
                name = src.rsplit("/", 1)[-1]
                copied[name] = src
    files = []
    for word, rest in instrs:
        if word == "RUN" and "pip install" in rest:
            for target in re.findall(r"-r\s+([^\s;]+)", rest):
                name = target.rsplit("/", 1)[-1]
                if name in copied:          # an optional file (`if [ -f ... ]`) the stage does not have is skipped
                    files.append(copied[name])
    return files


def requirements(service: str) -> list[str]:
    """Every requirement line the image installs (comments and blanks dropped)."""
    lines = []
    for path in requirement_files(service):
        for line in (REPO / path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


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
    assert any(r.startswith("torch==") for r in requirements(stage))
    for other in set(STAGES) - {stage}:
        assert f"cosyvoice_{other}" not in runs


def test_one_recipe_builds_every_stage_from_its_build_arg():
    text = re.sub(r"\\\n", " ", (REPO / STAGE_DOCKERFILE).read_text())
    instrs = [(w, r.strip()) for w, r in ((line.split(" ", 1) + [""])[:2] for line in text.splitlines())
              if w and not w.startswith("#")]
    words = [w for w, _ in instrs]
    first_use = min(i for i, (w, r) in enumerate(instrs) if "STAGE" in r and w != "ARG")
    assert ("ARG", "STAGE") in instrs and words.index("ARG", 1) < first_use       # declared after FROM, before use
    env = " ".join(r for w, r in instrs if w == "ENV")
    assert "STAGE=${STAGE}" in env                                  # the entrypoint reads STAGE
    assert "/opt/cosyvoice/services/${STAGE}" in env                # its package on PYTHONPATH
    assert ("ENTRYPOINT", '["python3", "/opt/cosyvoice/bin/triton_stage.py"]') in instrs
    for name in STAGES:                                             # no second recipe to drift from this one
        assert not (REPO / "services" / name / "Dockerfile").exists(), name
        assert (REPO / "services" / name / "requirements.txt").exists(), name


@pytest.mark.parametrize("service", SERVICES)
def test_image_installs_exactly_its_own_requirements_files(service):
    """The dependency list is a file in the service's folder; no package is named inline in a RUN."""
    files = requirement_files(service)
    assert f"services/{service}/requirements.txt" in files
    assert all(f.startswith(f"services/{service}/") for f in files), files
    final = final_stage(instructions(service))
    for word, rest in final:
        if word == "RUN" and "pip install" in rest:
            for command in re.findall(r"pip install ([^&;]*)", rest):
                args = [a for a in command.split() if not a.startswith("-")]
                assert all(a.startswith("/opt/cosyvoice/") for a in args), f"{service}: inline packages {args}"


def test_dependencies_follow_what_each_stage_imports():
    reqs = {s: " ".join(requirements(s)) for s in SERVICES}
    assert "onnxruntime-gpu" in reqs["tokenizer"] and "s3tokenizer" in reqs["tokenizer"]
    assert "onnx2torch" in reqs["speaker"] and "onnxruntime-gpu" in reqs["speaker"]
    assert "onnxruntime" not in reqs["llm"] and "onnxruntime" not in reqs["token2wav"]
    assert "torch" not in reqs["gateway"].replace("tritonclient", "")   # no torch in the gateway
    assert "tritonclient[grpc,http]" in reqs["gateway"] and "grpcio-health-checking" in reqs["gateway"]


def test_gateway_image_is_slim_python_with_protos_built_in():
    instrs = instructions("gateway")
    final = final_stage(instrs)
    assert final[0] == ("FROM", "python:3.12-slim")
    srcs = copy_sources(final)
    assert "services/gateway" in srcs and "common/cosyvoice_common" in srcs
    assert not [s for s in srcs if s.startswith("services/") and s.split("/")[1] != "gateway"]
    assert any(w == "COPY" and "--from=protos" in r for w, r in final)
    assert "protos/cosyvoice" in copy_sources(instrs)


def test_gateway_image_can_run_the_seed_fronts():
    final = final_stage(instructions("gateway"))
    # the compose/Helm entrypoint of seed-stream / seed-offline, where placement points at it
    assert ("COPY", "deploy/docker/seed_front.py /opt/cosyvoice/bin/seed_front.py") in final
    runs = " ".join(r for w, r in final if w == "RUN")
    assert "tritonserver" in runs and "triton_python_backend_stub" in runs
    assert "nvidia-pytriton==0.7.0" in requirements("gateway")
    # the stub embeds this interpreter: numpy 2 would corrupt the BYTES texts (shared/notes/TRITON.md)
    assert "numpy<2" in requirements("gateway")


@pytest.mark.parametrize("service", SERVICES)
def test_image_has_healthcheck_and_runs_as_non_root(service):
    final = final_stage(instructions(service))
    assert any(w == "HEALTHCHECK" and "CMD" in r for w, r in final)
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{service} runs as root"
    user_index = max(i for i, (w, _) in enumerate(final) if w == "USER")
    assert any(w == "RUN" and "useradd --uid 10001" in r and "cosyvoice" in r for w, r in final[:user_index])


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
