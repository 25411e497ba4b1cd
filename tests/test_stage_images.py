"""Each stage runs from its own dependency list, started the way its image starts it.

For every stage a clean venv gets services/<stage>/requirements.txt (and requirements-nodeps.txt where the stage
has one), exactly what deploy/docker/Dockerfile.stage installs, except for the GPU builds a CPU machine cannot
take (CPU_SWAPS below). Its tritonserver is started by the image's entrypoint, deploy/docker/triton_stage.py,
with the image's import path (the common package and that stage's folder, nothing else), so a dependency missing
from a list, or an import of another stage's package, fails here instead of at deploy. The four stage servers
then serve one request through a gateway.

Cost: torch is installed once into a base venv (it is in every stage's list) that each stage venv copies with
hard links; the venvs are kept under build/test-venvs per content of the lists (CLEAN_VENV_DIR moves them).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton_grpc
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.stages import STAGE_NAMES, stage
from cosyvoice_gateway.testing import TEST_STAGE_TIMEOUT_S, free_port, prompt_wav_bytes
from cosyvoice_launcher.triton import free_ports, http_ready

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT_S = 1200
READY_TIMEOUT_S = 300
SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"


def _running_version(package: str) -> str:
    from importlib.metadata import version

    return version(package).split("+")[0]


# The images take CUDA builds; this CPU machine takes the CPU torch on its disk, the CPU onnxruntime, and
# torchaudio's pure-Python parts (tools/cosyvoice_tools/fix_torchaudio.py) beside it.
CPU_SWAPS = {
    "torch": f"torch=={_running_version('torch')}",
    "onnxruntime-gpu": "onnxruntime",
    "torchaudio": f"torchaudio=={_running_version('torchaudio')}",
}
# The stage image's base (nvcr tritonserver) brings tritonserver and its Python backend; here the wheel does.
TRITON_BASE = "nvidia-pytriton==0.7.0"


def _requirements(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines() if path.exists() else []:
        line = raw.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower()
            lines.append(CPU_SWAPS.get(name, line))
    return lines


def _pip(python: Path, *args: str) -> None:
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                            timeout=INSTALL_TIMEOUT_S)
    if result.returncode:
        pytest.fail(f"pip install {' '.join(args)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


def _venv_root() -> Path:
    return Path(os.environ.get("CLEAN_VENV_DIR", REPO / "build/test-venvs"))


def _base_venv() -> Path:
    """torch and the tritonserver wheel, nothing else: what every stage venv starts from."""
    venv = _venv_root() / f"stage-base-{hashlib.sha256((CPU_SWAPS['torch'] + TRITON_BASE + sys.version).encode()).hexdigest()[:12]}"
    if not (venv / ".installed").exists():
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _pip(venv / "bin/python", CPU_SWAPS["torch"])
        _pip(venv / "bin/python", "--no-deps", TRITON_BASE)
        (venv / ".installed").write_text("")
    return venv


def _stage_venv(name: str, base: Path) -> Path:
    folder = REPO / "services" / name
    wanted = _requirements(folder / "requirements.txt")
    nodeps = _requirements(folder / "requirements-nodeps.txt")
    digest = hashlib.sha256("\n".join([base.name, *wanted, "--", *nodeps]).encode()).hexdigest()[:12]
    venv = _venv_root() / f"stage-{name}-{digest}"
    if not (venv / ".installed").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run(["cp", "-al", str(base), str(venv)], check=True)   # hard links: torch costs nothing
        (venv / ".installed").unlink()
        python = venv / "bin/python"
        _pip(python, *wanted)
        if nodeps:
            _pip(python, "--no-deps", *nodeps)
        if any(r.startswith("torchaudio") for r in wanted + nodeps):
            subprocess.run([str(python), str(REPO / "tools/cosyvoice_tools/fix_torchaudio.py")], check=True)
        # The image's PYTHONPATH (Dockerfile.stage): the common package and this stage's folder. The Python
        # backend stub reads the interpreter's site-packages, so a .pth file carries it there.
        (venv / SITE / "cosyvoice-image.pth").write_text(f"{REPO / 'common'}\n{folder}\n")
        (venv / ".installed").write_text("\n".join(wanted + nodeps))
    return venv


def _triton_env(venv: Path) -> dict[str, str]:
    server_dir = venv / SITE / "pytriton/tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "backends/python/triton_python_backend_stub"
    if not stub.exists():
        shutil.copy2(server_dir / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
    libs = [str(venv / SITE / "nvidia_pytriton.libs")]
    libdir, soname = sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or ""
    if libdir and soname and (Path(libdir) / soname).exists():
        libs.insert(0, libdir)          # this interpreter's libpython before the system's (see triton.py)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=os.pathsep.join([str(server_dir / "bin"), str(venv / "bin"), env.get("PATH", "")]),
               LD_LIBRARY_PATH=os.pathsep.join(libs), PYTHONPATH=f"{REPO / 'common'}", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def image_stage_servers(tiny_model_dir, tmp_path_factory):
    """One tritonserver per stage, each from its stage venv through the image's entrypoint."""
    base = _base_venv()
    run_dir = tmp_path_factory.mktemp("stage-images")
    servers = {}
    try:
        for name in STAGE_NAMES:
            venv = _stage_venv(name, base)
            http, grpc_port, metrics = free_ports(3)
            env = _triton_env(venv)
            env.update(STAGE=name, MODEL_DIR=str(tiny_model_dir), COSYVOICE_ROOT=str(REPO),
                       MODEL_REPOSITORY=str(run_dir / f"{name}-repo"), TRITON_HTTP_PORT=str(http),
                       TRITON_GRPC_PORT=str(grpc_port), TRITON_METRICS_PORT=str(metrics),
                       TRITON_INSTANCE_KIND="KIND_CPU", TRITON_GPU_COUNT="0")
            log = run_dir / f"{name}.log"
            with open(log, "wb") as out:
                # Extra arguments go to tritonserver: the wheel's backends (the image's are at the default
                # path), and loopback only.
                proc = subprocess.Popen([str(venv / "bin/python"), str(REPO / "deploy/docker/triton_stage.py"),
                                         "--backend-directory", str(venv / SITE / "pytriton/tritonserver/backends"),
                                         "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
                                         "--metrics-address", "127.0.0.1"],
                                        env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(run_dir),
                                        start_new_session=True)
            servers[name] = (proc, http, grpc_port, log)
        for name, (proc, http, _, log) in servers.items():
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not http_ready(f"http://127.0.0.1:{http}/v2/health/ready"):
                assert proc.poll() is None, f"{name} exited:\n{log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, f"{name} not ready:\n{log.read_text()[-4000:]}"
                time.sleep(0.5)
        yield {name: f"127.0.0.1:{grpc_port}" for name, (_, _, grpc_port, _) in servers.items()}
    finally:
        for proc, *_ in servers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, *_ in servers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _served(url: str, model: str) -> int:
    stats = triton_grpc.InferenceServerClient(url).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


def test_stage_venvs_hold_only_their_own_packages():
    """A stage's venv has its own package on the path and not another stage's (the image holds one stage)."""
    base = _base_venv()
    for name in STAGE_NAMES:
        python = _stage_venv(name, base) / "bin/python"
        others = [stage(n).package for n in STAGE_NAMES if n != name]
        code = ("import importlib.util as u, sys\n"
                f"assert u.find_spec({stage(name).package!r}) is not None\n"
                f"print([p for p in {others!r} if u.find_spec(p) is not None])")
        probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert probe.returncode == 0, probe.stderr[-2000:]
        assert probe.stdout.strip() == "[]", (name, probe.stdout)


def test_stages_from_their_own_requirements_serve_a_request(image_stage_servers, redis_server, tiny_model_dir,
                                                            tmp_path):
    before = {name: _served(url, stage(name).triton_model) for name, url in image_stage_servers.items()}
    port = free_port()
    env = dict(os.environ, REDIS_URL=redis_server.url, MODEL_DIR=str(tiny_model_dir), GRPC_PORT=str(port),
               HTTP_PORT="0", METRICS_PORT="0", READINESS_INTERVAL_S="0.5", STAGE_TIMEOUT_S=TEST_STAGE_TIMEOUT_S,
               **{stage(name).env("URLS"): url for name, url in image_stage_servers.items()})
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        gateway = subprocess.Popen([sys.executable, "-m", "cosyvoice_gateway.server"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = tts_pb2_grpc.TextToSpeechStub(channel)
            deadline = time.monotonic() + 120
            while True:    # SERVING once every stage answered its readiness check
                try:
                    reply = stub.Synthesize(tts_pb2.SynthesizeRequest(
                        text="Served by four stage images.", prompt_audio=prompt_wav_bytes(seed=3),
                        prompt_text="a prompt", min_speech_tokens=12, max_speech_tokens=12), timeout=120)
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    assert gateway.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.5)
        assert reply.timings.speech_tokens == 12 and len(reply.audio) > 0
        for name, url in image_stage_servers.items():
            assert _served(url, stage(name).triton_model) > before[name], name
    finally:
        gateway.terminate()
        gateway.wait(30)
