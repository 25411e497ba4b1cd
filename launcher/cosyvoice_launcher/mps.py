"""CUDA MPS for stage servers that share a GPU.

Without MPS the tritonservers of one GPU time-slice it: the LLM's small decode kernels wait behind whole
flow/vocoder time slices of the token2wav process. Under MPS their kernels run side by side on the one
device context. `STACK_CUDA_MPS`: `off` (default), `on` (fail if the control daemon is missing) or `auto`
(on when a stage runs on a CUDA device and `nvidia-cuda-mps-control` is on PATH).

The daemon runs as the launcher's user with its pipe and log folders inside the stack's run dir, so two
stacks on one machine do not share it; every stage server gets the same two variables.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CONTROL_BINARY = "nvidia-cuda-mps-control"
MODES = ("off", "on", "auto")
_CONTROL_TIMEOUT_S = 30.0


class MpsError(RuntimeError):
    pass


_DRIVER_BIN = Path("/usr/local/nvidia/bin")   # where the GPU machine's driver mount keeps it (not on PATH)


def control_binary() -> str | None:
    found = shutil.which(CONTROL_BINARY)
    if found:
        return found
    fallback = _DRIVER_BIN / CONTROL_BINARY
    return str(fallback) if fallback.exists() else None


@dataclass(frozen=True, slots=True)
class MpsDaemon:
    root: Path          # <run_dir>/mps: pipe/ and log/ below it

    @property
    def pipe_dir(self) -> Path:
        return self.root / "pipe"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def env(self) -> dict[str, str]:
        """What every MPS client (each stage server) and the control daemon need."""
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def _control(self, binary: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([binary, *args], input=stdin, text=True, capture_output=True,
                              env={**os.environ, **self.env()}, timeout=_CONTROL_TIMEOUT_S, check=False)

    def start(self) -> None:
        binary = control_binary()
        if binary is None:
            raise MpsError(f"{CONTROL_BINARY} not found on PATH or in /usr/local/nvidia/bin")
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        done = self._control(binary, "-d")
        if done.returncode != 0:
            raise MpsError(f"{CONTROL_BINARY} -d failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def stop(self) -> bool:
        """Ask the daemon to quit (after its clients are gone); False if there was nothing to stop."""
        binary = control_binary()
        if binary is None or not self.pipe_dir.exists():
            return False
        done = self._control(binary, stdin="quit\n")
        return done.returncode == 0


def wanted(mode: str, uses_cuda: bool) -> bool:
    if mode not in MODES:
        raise ValueError(f"STACK_CUDA_MPS must be one of {MODES}, got {mode!r}")
    if mode == "off" or not uses_cuda:
        return False
    if mode == "on":
        return True
    return control_binary() is not None
