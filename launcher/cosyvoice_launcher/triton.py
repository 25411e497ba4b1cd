"""Run a stage's model repository in a real `tritonserver` process (the one the nvidia-pytriton wheel ships).

Found through the `pytriton` package path (never a hard-coded venv path), so the same code runs from
the venv on the CPU machine and from a plain `PYTHONPATH` (pip --target) on the GPU machine. The
`pytriton` package itself is not imported: its own Python dependencies are not installed (no-deps).
See ../shared/notes/TRITON.md for what made it serve here.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from cosyvoice_common.stages import STAGES, fill_template

# Repository root: launcher/cosyvoice_launcher/triton.py -> parents[2]. What the processes the launcher starts
# import (stage models, the seed fronts, the gateway): they go on the stub's PYTHONPATH so model.py imports the
# same code with or without the venv. Neither the launcher nor the developer tools are among them.
REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_ROOTS = tuple(REPO_ROOT / p for p in ("common", *(s.service_dir for s in STAGES), "services/gateway",
                                               "protos/gen"))
_TEMPLATE_SUFFIXES = (".pbtxt",)


class TritonError(RuntimeError):
    """tritonserver could not be found, rendered for, started or stopped; the message says which."""


@dataclass(frozen=True, slots=True)
class TritonInstall:
    """Where the wheel put tritonserver, its backends and its bundled shared libraries."""

    binary: Path
    backends_dir: Path
    stubs_dir: Path
    libs_dir: Path

    @classmethod
    def locate(cls) -> "TritonInstall":
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonError("package nvidia-pytriton is not installed (need pytriton/tritonserver)")
        pkg_dir = Path(list(spec.submodule_search_locations)[0])
        server_dir = pkg_dir / "tritonserver"
        install = cls(
            binary=server_dir / "bin" / "tritonserver",
            backends_dir=server_dir / "backends",
            stubs_dir=server_dir / "python_backend_stubs",
            libs_dir=pkg_dir.parent / "nvidia_pytriton.libs",
        )
        for path in (install.binary, install.backends_dir / "python", install.libs_dir):
            if not path.exists():
                raise TritonError(f"incomplete nvidia-pytriton install: {path} is missing")
        return install

    def ensure_python_stub(self) -> Path:
        """Copy the stub built for the running Python into backends/python (the wheel ships one per version)."""
        target = self.backends_dir / "python" / "triton_python_backend_stub"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        source = self.stubs_dir / version / "triton_python_backend_stub"
        if not source.exists():
            raise TritonError(f"no python backend stub for Python {version} under {self.stubs_dir}")
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            shutil.copy2(source, tmp)
            os.replace(tmp, target)   # atomic: parallel launchers never see a half-written stub
        return target

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for tritonserver and its Python stubs: bundled libs, this interpreter first on PATH,
        and the repository's package roots on PYTHONPATH (model.py imports the stage packages)."""
        env = dict(os.environ if base is None else base)
        env["LD_LIBRARY_PATH"] = _prepend(str(self.libs_dir), env.get("LD_LIBRARY_PATH", ""))
        # The stub links `libpython3.X.so.1.0` and takes whichever the loader finds first (on our dev/CI
        # image the system's 3.11.2) while importing this interpreter's stdlib (3.11.7): a mismatched
        # runtime under our extension modules. This interpreter's own libpython goes first.
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        soname = sysconfig.get_config_var("INSTSONAME") or ""
        if libdir and soname and (Path(libdir) / soname).exists():
            env["LD_LIBRARY_PATH"] = _prepend(libdir, env["LD_LIBRARY_PATH"])
        env["PATH"] = _prepend(str(Path(sys.executable).parent), env.get("PATH", ""))
        # The current interpreter's own import path (venv site-packages or pip --target dirs) plus ours.
        site_paths = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
        py_path = [str(p) for p in PACKAGE_ROOTS] + site_paths
        existing = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(py_path + ([existing] if existing else [])))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env


def _prepend(first: str, rest: str) -> str:
    return first if not rest else f"{first}{os.pathsep}{rest}"


# --- model repository rendering ----------------------------------------------------------------------

def render_model_repository(template_root: Path, out_root: Path, params: Mapping[str, object]) -> Path:
    """Copy every model under `template_root` into `out_root`, filling `${name}` in config.pbtxt from params.

    An unfilled `${...}` is an error (unlike the seed's safe_substitute, where it silently meant "unset").
    model.py files are copied as they are. Returns out_root.
    """
    template_root = Path(template_root)
    out_root = Path(out_root)
    if not template_root.is_dir():
        raise TritonError(f"no model repository template at {template_root}")
    if out_root.exists():
        shutil.rmtree(out_root)
    shutil.copytree(template_root, out_root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in sorted(out_root.rglob("*")):
        if path.is_file() and path.suffix in _TEMPLATE_SUFFIXES:
            path.write_text(fill_template(path.read_text(), params, source=str(path)))
    return out_root




def device_params(device: str) -> dict[str, str]:
    """Template values for one device string: cpu or cuda:N.

    Python-backend instances on KIND_GPU get `gpus: [N]`; the model moves its tensors to `device` itself.
    """
    if device == "cpu":
        return {"device": "cpu", "device_kind": "KIND_CPU", "gpu_ids": ""}
    match = re.fullmatch(r"cuda:(\d+)", device)
    if match is None:
        raise TritonError(f"device must be cpu or cuda:N, got {device!r}")
    return {"device": device, "device_kind": "KIND_GPU", "gpu_ids": match.group(1)}


# --- one tritonserver process --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TritonServerConfig:
    model_repository: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    host: str = "127.0.0.1"
    log_verbose: int = 0
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # tritonserver's own wait for in-flight requests on exit; our stop() waits a little longer.
    exit_timeout_s: int = 5


class TritonServer:
    """A tritonserver child process: start(), wait_ready(), stop(). Also adopts a pid from a state file."""

    def __init__(self, config: TritonServerConfig, install: TritonInstall | None = None) -> None:
        self.config = config
        self.install = install or TritonInstall.locate()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.metrics_port}/metrics"

    def command(self) -> list[str]:
        c = self.config
        return [
            str(self.install.binary),
            "--model-repository", str(c.model_repository),
            "--backend-directory", str(self.install.backends_dir),
            "--http-address", c.host, "--http-port", str(c.http_port),
            "--grpc-address", c.host, "--grpc-port", str(c.grpc_port),
            "--metrics-address", c.host, "--metrics-port", str(c.metrics_port),
            "--allow-metrics", "true", "--allow-gpu-metrics", "false",
            "--exit-timeout-secs", str(c.exit_timeout_s),
            "--log-verbose", str(c.log_verbose),
            # The stage is useless without its model: fail the process rather than serve nothing.
            "--exit-on-error", "true", "--strict-readiness", "true",
        ]

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise TritonError("already started")
        self.install.ensure_python_stub()
        self.config.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.install.env()
        env.update(self.config.extra_env)
        with open(self.config.log_path, "ab") as log:
            # Own session: a Ctrl-C in the launcher's terminal does not reach the servers; `down` stops them.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def is_ready(self) -> bool:
        return http_ready(f"http://{self.http_url}/v2/health/ready")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_alive():
                raise TritonError(f"tritonserver exited with {self.process.returncode if self.process else None}"
                                  f" before ready; log {self.config.log_path}:\n{tail(self.config.log_path)}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise TritonError(f"tritonserver not ready after {timeout_s:.0f} s; log {self.config.log_path}:\n"
                          f"{tail(self.config.log_path)}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.process is None:
            return None
        code = stop_pid(self.process.pid, timeout_s, popen=self.process)
        return code


# --- process helpers shared with the stack launcher -----------------------------------------------------

def http_ready(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, timeout_s: float, popen: subprocess.Popen | None = None) -> int | None:
    """SIGTERM, wait up to timeout_s (tritonserver takes seconds to unload), then SIGKILL and wait."""
    def alive() -> bool:
        return popen.poll() is None if popen is not None else pid_alive(pid)

    if not alive():
        return popen.returncode if popen is not None else None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + timeout_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive():
        try:
            # The whole session: python-backend stubs must not outlive a killed server.
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_deadline = time.monotonic() + 10.0
        while alive() and time.monotonic() < kill_deadline:
            time.sleep(0.05)
    return popen.returncode if popen is not None else None


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_port(host: str = "127.0.0.1") -> int:
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_block(span: int, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A base port with base .. base+span-1 all free, below the kernel's ephemeral range: fixed ports picked
    inside that range can be taken meanwhile by any outgoing connection's source port (seen in CI: a stage
    replica's port given out that way) or by a server bound to port 0, which also draws from it."""
    import random
    import socket

    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low, high = 10000, ephemeral_low - span
    if high <= low:
        raise RuntimeError(f"no room for {span} ports below the ephemeral range ({ephemeral_low})")
    for _ in range(attempts):
        base = random.randrange(low, high)
        try:
            for port in range(base, base + span):
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {span} consecutive free ports found in {attempts} tries")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports (all sockets held open together so none repeats)."""
    import socket
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
