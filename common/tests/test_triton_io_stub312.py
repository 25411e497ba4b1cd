"""The tritonserver wheel's Python >= 3.12 stub segfaults when a decoupled model's send() drops an output the
client did not request (the llm stage's crash on the GPU machine, whose stub is 3.12); triton_io.send_outputs
does not. Real tritonserver, the wheel's own 3.12 stub, real gRPC streams.

Why it crashes (python_backend r24.10, fixed upstream by #390): ResponseSender::Send releases the GIL, then
prunes unrequested outputs; when the response held the last reference to such a tensor, its Python objects are
freed with no thread state, and 3.12's per-interpreter allocator dereferences that missing state. A 3.11 stub
(the CI default) survives it by luck, so this test needs a 3.12+ interpreter: python3.12/3.13 on PATH or under
pyenv (this image has pyenv's). numpy < 2 for it comes from the package index (no torch: triton_io takes its
numpy path, as in the gateway image).
"""
from __future__ import annotations

import glob
import os
import queue
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from cosyvoice_launcher.triton import REPO_ROOT, TritonInstall, free_ports, http_ready, stop_pid

STUB_PYTHONS = ("3.12", "3.13")

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [ {{ name: "N" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_INT32 dims: [ -1 ] }}, {{ name: "LEN" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

# One response per step i (OUT = 0..i, LEN = i + 1), then an empty COMPLETE_FINAL. `how` is the way it sends.
MODEL = '''
import faulthandler
import sys
import numpy as np
import triton_python_backend_utils as pb_utils
from cosyvoice_common.triton_io import from_triton, send_outputs, to_triton

faulthandler.enable(all_threads=True)
HOW = {how!r}


class TritonPythonModel:
    def initialize(self, args):
        pb_utils.Logger.log_info(f"stub python {{sys.version_info[0]}}.{{sys.version_info[1]}}")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            requested = frozenset(request.requested_output_names())
            for i in range(int(from_triton(pb_utils.get_input_tensor_by_name(request, "N")).reshape(-1)[0])):
                outputs = {{"OUT": np.arange(i + 1, dtype=np.int32), "LEN": np.array([i + 1], np.int32)}}
                if HOW == "inline":        # the llm stage before the fix: the response owns its tensors
                    sender.send(pb_utils.InferenceResponse([to_triton(k, v) for k, v in outputs.items()]))
                elif HOW == "requested":   # send_outputs as the stages call it
                    send_outputs(sender, outputs, requested)
                else:                      # send_outputs building every output: only its held list guards
                    send_outputs(sender, outputs)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

HOWS = ("inline", "requested", "unfiltered")


def _find_stub_python(install: TritonInstall) -> tuple[Path, str] | None:
    candidates = [shutil.which(f"python{v}") for v in STUB_PYTHONS]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(str(pyenv_root / "versions" / "3.1[23]*" / "bin" / "python3.1[23]")))
    for exe in filter(None, candidates):
        probe = subprocess.run([exe, "-c", "import sys, sysconfig; print(f'{sys.version_info[0]}.{sys.version_info[1]}');"
                                           "print(sysconfig.get_config_var('LIBDIR'))"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            continue
        version, libdir = probe.stdout.split()
        if (install.stubs_dir / version / "triton_python_backend_stub").exists() and \
                glob.glob(f"{libdir}/libpython{version}.so*"):
            return Path(exe), libdir
    return None


@pytest.fixture(scope="module")
def stub312_server(tmp_path_factory):
    install = TritonInstall.locate()
    found = _find_stub_python(install)
    if found is None:
        pytest.skip("no Python 3.12 interpreter with a shared libpython (python3.12 on PATH or pyenv)")
    exe, libdir = found
    root = tmp_path_factory.mktemp("stub312")
    version = subprocess.check_output([str(exe), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                                      text=True).strip()
    # A venv of that Python: the stub ignores PYTHONPATH and reads the site-packages of the python3 on PATH.
    env_dir = root / "env"
    subprocess.run([str(exe), "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = env_dir / "lib" / f"python{version}" / "site-packages"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                          "--python-version", version, "--target", str(site), "numpy<2"],
                         capture_output=True, text=True)
    assert pip.returncode == 0, f"numpy<2 for Python {version} could not be installed: {pip.stderr.strip()[-300:]}"
    (site / "cosyvoice-common.pth").write_text(f"{REPO_ROOT / 'common'}\n")
    # Its own backend directory: the shared one keeps the stub of the suite's own Python.
    backends = root / "backends"
    shutil.copytree(install.backends_dir / "python", backends / "python",
                    ignore=shutil.ignore_patterns("triton_python_backend_stub", "__pycache__"))
    shutil.copy2(install.stubs_dir / version / "triton_python_backend_stub", backends / "python")
    repo = root / "models"
    for how in HOWS:
        (repo / how / "1").mkdir(parents=True)
        (repo / how / "config.pbtxt").write_text(CONFIG.format(name=how))
        (repo / how / "1" / "model.py").write_text(MODEL.format(how=how))
    grpc_port, http_port, metrics_port = free_ports(3)
    env = {**os.environ,
           "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}",
           "LD_LIBRARY_PATH": f"{libdir}:{install.libs_dir}",
           "PYTHONUNBUFFERED": "1"}
    log_path = root / "tritonserver.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(install.binary), "--model-repository", str(repo), "--backend-directory", str(backends),
             "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
             "--http-address", "127.0.0.1", "--http-port", str(http_port),
             "--metrics-port", str(metrics_port), "--allow-metrics", "false", "--exit-on-error", "true"],
            stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not http_ready(f"http://127.0.0.1:{http_port}/v2/health/ready"):
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "tritonserver with the 3.12 stub never became ready"
            time.sleep(0.5)
        assert f"stub python {version}" in log_path.read_text(errors="replace")
        yield f"127.0.0.1:{grpc_port}", log_path
    finally:
        stop_pid(process.pid, 30, process)


def _stream(url: str, model: str, outputs: list[str] | None, steps: int = 3) -> tuple[list[dict], str | None]:
    """Every non-final response's outputs (name -> list) and the first error, if any."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        n = grpcclient.InferInput("N", [1], "INT32")
        n.set_data_from_numpy(np.array([steps], np.int32))
        requested = None if outputs is None else [grpcclient.InferRequestedOutput(name) for name in outputs]
        client.async_stream_infer(model, [n], outputs=requested, enable_empty_final_response=True)
        got = []
        while True:
            result, error = responses.get(timeout=60)
            if error is not None:
                return got, str(error)
            response = result.get_response()
            if response.outputs:
                got.append({o.name: result.as_numpy(o.name).tolist() for o in response.outputs})
            if response.parameters["triton_final_response"].bool_param:
                return got, None
    finally:
        client.stop_stream()


def test_send_outputs_sends_only_the_requested_outputs(stub312_server):
    url, _ = stub312_server
    got, error = _stream(url, "requested", ["OUT"])
    assert error is None
    assert got == [{"OUT": [0]}, {"OUT": [0, 1]}, {"OUT": [0, 1, 2]}]
    got, error = _stream(url, "requested", None)   # none named: Triton asks for every output
    assert error is None
    assert got == [{"OUT": list(range(i + 1)), "LEN": [i + 1]} for i in range(3)]


def test_send_outputs_survives_the_prune_even_unfiltered(stub312_server):
    # Every output built, one pruned inside send(): send_outputs' held list keeps it alive past the GIL-free prune.
    url, _ = stub312_server
    got, error = _stream(url, "unfiltered", ["OUT"])
    assert error is None
    assert got == [{"OUT": [0]}, {"OUT": [0, 1]}, {"OUT": [0, 1, 2]}]


def test_inline_response_with_an_unrequested_output_kills_the_312_stub(stub312_server):
    """The upstream bug itself (if a newer wheel fixes it, this fails: then send_outputs' guard can go)."""
    url, log_path = stub312_server
    got, error = _stream(url, "inline", ["OUT", "LEN"])   # nothing pruned: fine
    assert error is None and len(got) == 3
    got, error = _stream(url, "inline", ["OUT"])
    assert error is not None and "not healthy" in error, (got, error)
    assert "Segmentation fault" in log_path.read_text(errors="replace")
    # Only that model's stub died: the fixed ones still serve on the same server.
    got, error = _stream(url, "requested", ["OUT"])
    assert error is None and len(got) == 3
