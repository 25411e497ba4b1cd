#!/usr/bin/env python
"""Which ways of answering from a decoupled Python-backend model survive on this machine's Triton stub?

The llm stage's stub segfaulted on the H100 machine (Python 3.12 stub) inside `response_sender.send()`
called from its responder thread, while the same code serves on the CPU machine (3.11 stub). The cause,
found later: the 2.51 stub frees unrequested outputs inside send() without the GIL (see
cosyvoice_common.triton_io.send_outputs and common/tests/test_triton_io_stub312.py); these variants keep
their tensors referenced during send(), which is why none of them crashed. This starts one
tritonserver with a small decoupled model per variant, streams a few requests through each over gRPC and
reports, per variant, whether every response arrived intact and whether the stub died:

  thread_dlpack       responses sent from a Python thread, tensors via torch DLPack (the llm stage's way)
  thread_numpy        the same with pb_utils.Tensor(numpy)
  thread_final_only   the thread sends only the COMPLETE_FINAL flag (no tensor at all)
  thread_keep         thread_dlpack, but every response object is kept alive (never freed)
  main_dlpack         every response sent from execute() itself (the stub's main thread)
  thread_dlpack_cuda  thread_dlpack while another thread keeps the GPU busy (the engine's situation)
  async_dlpack        `async def execute`: responses sent from the stub's own event loop
  like_*              the llm stage's shape: one responder thread started in initialize() serving 4 requests in
                      flight round robin, alone and with dynamic batching + a second unrequested output, a
                      metric incremented per response, is_cancelled() polled before each send, and all three

Usage (GPU machine, after `source tools/gpu/setup.sh`): python3 tools/gpu/stub_probe.py [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(_REPO / "common"), str(_REPO / "tools")]

from cosyvoice_tools.triton import TritonInstall, free_ports, http_ready  # noqa: E402

VARIANTS = ("thread_dlpack", "thread_numpy", "thread_final_only", "thread_keep", "main_dlpack",
            "thread_dlpack_cuda", "async_dlpack")
# llm-stage-like models: one long-lived responder thread started in initialize() answers every request (4 in
# flight at once, 50 responses each), plus the llm stage's other features one at a time and all together.
LIKE_FEATURES = {"like_base": (), "like_batched": ("batched",), "like_metrics": ("metrics",),
                 "like_cancel": ("cancel_poll",), "like_all": ("batched", "metrics", "cancel_poll")}
LIKE_REQUESTS, LIKE_RESPONSES = 4, 50
RESPONSES = 4       # data responses per request
REQUESTS = 3        # requests per variant

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [ {{ name: "N" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_INT32 dims: [ -1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

MODEL = '''
import asyncio, faulthandler, threading
import numpy as np
import triton_python_backend_utils as pb_utils
from cosyvoice_common.triton_io import from_triton, to_triton

faulthandler.enable(all_threads=True)
VARIANT = "{variant}"
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
KEEP = []


def response(i):
    values = np.arange(i + 1, dtype=np.int32)
    tensor = pb_utils.Tensor("OUT", values) if VARIANT == "thread_numpy" else to_triton("OUT", values)
    return pb_utils.InferenceResponse([tensor])


def answer(sender, n):
    for i in range(n):
        if VARIANT != "thread_final_only":
            r = response(i)
            if VARIANT == "thread_keep":
                KEEP.append(r)
            sender.send(r)
    sender.send(flags=FINAL)


class TritonPythonModel:
    def initialize(self, args):
        if VARIANT.endswith("_cuda"):
            import torch
            x = torch.randn(2048, 2048, device="cuda")

            def busy():
                while True:
                    x @ x
                    torch.cuda.synchronize()
            threading.Thread(target=busy, daemon=True).start()

    {execute}
'''

LIKE_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: {max_batch}
{batching}
model_transaction_policy {{ decoupled: true }}
input [ {{ name: "N" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_INT32 dims: [ {out_dims} ] }}, {{ name: "LEN" data_type: TYPE_INT32 dims: [ -1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""

LIKE_MODEL = '''
import faulthandler, queue, threading
import numpy as np
import triton_python_backend_utils as pb_utils
from cosyvoice_common.triton_io import from_triton, to_triton

faulthandler.enable(all_threads=True)
FEATURES = {features!r}
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.jobs = queue.SimpleQueue()
        if "metrics" in FEATURES:
            self.family = pb_utils.MetricFamily(name="probe_responses", description="responses",
                                                kind=pb_utils.MetricFamily.COUNTER)
            self.metric = self.family.Metric(labels={{"model": args["model_name"]}})
        threading.Thread(target=self.respond_loop, daemon=True).start()

    def execute(self, requests):
        for request in requests:
            n = int(from_triton(pb_utils.get_input_tensor_by_name(request, "N")).reshape(-1)[0])
            self.jobs.put((request, request.get_response_sender(), n))
        return None

    def respond_loop(self):
        active = []   # round robin over requests in flight, like the engine's per-token outputs
        while True:
            while not active or not self.jobs.empty():
                request, sender, n = self.jobs.get()
                active.append([request, sender, n, 0])
            for job in list(active):
                request, sender, n, i = job
                if "cancel_poll" in FEATURES and request.is_cancelled():
                    sender.send(flags=FINAL); active.remove(job); continue
                values = np.arange(i + 1, dtype=np.int32)
                if "batched" in FEATURES:
                    outs = [to_triton("OUT", values.reshape(1, 1, -1)), to_triton("LEN", np.array([[i + 1]], np.int32))]
                else:
                    outs = [to_triton("OUT", values), to_triton("LEN", np.array([i + 1], np.int32))]
                if "metrics" in FEATURES:
                    self.metric.increment(1)
                job[3] = i + 1
                if i + 1 == n:
                    sender.send(pb_utils.InferenceResponse(outs), flags=FINAL); active.remove(job)
                else:
                    sender.send(pb_utils.InferenceResponse(outs))
'''

EXECUTE_THREAD = '''def execute(self, requests):
        for request in requests:
            n = int(from_triton(pb_utils.get_input_tensor_by_name(request, "N")).reshape(-1)[0])
            if VARIANT == "main_dlpack":
                answer(request.get_response_sender(), n)
            else:
                threading.Thread(target=answer, args=(request.get_response_sender(), n), daemon=True).start()
        return None'''

EXECUTE_ASYNC = '''async def execute(self, requests):
        for request in requests:
            n = int(from_triton(pb_utils.get_input_tensor_by_name(request, "N")).reshape(-1)[0])
            sender = request.get_response_sender()
            for i in range(n):
                await asyncio.sleep(0.001)
                sender.send(response(i))
            sender.send(flags=FINAL)
        return None'''


def write_repo(root: Path) -> None:
    for name, features in LIKE_FEATURES.items():
        (root / name / "1").mkdir(parents=True)
        batched = "batched" in features
        (root / name / "config.pbtxt").write_text(LIKE_CONFIG.format(
            name=name, max_batch=8 if batched else 0, batching="dynamic_batching { }" if batched else "",
            out_dims="-1, -1" if batched else "-1"))
        (root / name / "1" / "model.py").write_text(LIKE_MODEL.format(features=features))
    for variant in VARIANTS:
        (root / variant / "1").mkdir(parents=True)
        (root / variant / "config.pbtxt").write_text(CONFIG.format(name=variant))
        execute = EXECUTE_ASYNC if variant.startswith("async") else EXECUTE_THREAD
        (root / variant / "1" / "model.py").write_text(MODEL.format(variant=variant, execute=execute))


def probe_like(grpc_url: str, name: str) -> str:
    """LIKE_REQUESTS requests in flight at once on one stream; each must get LIKE_RESPONSES intact responses."""
    import tritonclient.grpc as grpcclient

    batched = "batched" in LIKE_FEATURES[name]
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    got: dict[str, list] = {f"{name}-{r}": [] for r in range(LIKE_REQUESTS)}
    try:
        for request_id in got:
            n_in = grpcclient.InferInput("N", [1, 1] if batched else [1], "INT32")
            n_in.set_data_from_numpy(np.array([[LIKE_RESPONSES]] if batched else [LIKE_RESPONSES], np.int32))
            client.async_stream_infer(name, [n_in], request_id=request_id, enable_empty_final_response=True,
                                      outputs=[grpcclient.InferRequestedOutput("OUT")])
        finals = 0
        deadline = time.monotonic() + 20
        while finals < LIKE_REQUESTS:
            try:
                result, error = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                return f"FAIL: {finals}/{LIKE_REQUESTS} finished in 20 s; responses {[len(v) for v in got.values()]}"
            if error is not None:
                return f"FAIL: {error}"
            response = result.get_response()
            out = result.as_numpy("OUT")
            if out is not None and out.size:
                got[response.id].append(out.reshape(-1).tolist())
            finals += response.parameters["triton_final_response"].bool_param
        want = [list(range(i + 1)) for i in range(LIKE_RESPONSES)]
        wrong = [k for k, v in got.items() if v != want]
        return f"FAIL: wrong payloads for {wrong}" if wrong else "ok"
    finally:
        client.stop_stream()
        client.close()


def probe(grpc_url: str, variant: str) -> str:
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for r in range(REQUESTS):
            n_in = grpcclient.InferInput("N", [1], "INT32")
            n_in.set_data_from_numpy(np.array([RESPONSES], np.int32))
            client.async_stream_infer(variant, [n_in], request_id=f"{variant}-{r}", enable_empty_final_response=True)
            got = []
            deadline = time.monotonic() + 20
            while True:
                try:
                    result, error = results.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    return f"FAIL request {r}: no final response in 20 s after {len(got)} responses"
                if error is not None:
                    return f"FAIL request {r}: {error}"
                out = result.as_numpy("OUT")
                if out is not None and out.size:
                    got.append(out.tolist())
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
            want = [] if variant == "thread_final_only" else [list(range(i + 1)) for i in range(RESPONSES)]
            if got != want:
                return f"FAIL request {r}: wrong payload {got} (want {want})"
        return "ok"
    finally:
        client.stop_stream()
        client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--variants", default=",".join((*LIKE_FEATURES, *VARIANTS)))
    args = ap.parse_args(argv)
    install = TritonInstall.locate()
    install.ensure_python_stub()
    work = Path(tempfile.mkdtemp(prefix="stub_probe_"))
    write_repo(work / "repo")
    http, grpc, metrics = free_ports(3)
    log_path = work / "tritonserver.log"
    cmd = [str(install.binary), "--model-repository", str(work / "repo"),
           "--backend-directory", str(install.backends_dir), "--http-port", str(http), "--grpc-port", str(grpc),
           "--metrics-port", str(metrics), "--exit-on-error", "false", "--strict-readiness", "false"]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=install.env(),
                                  start_new_session=True)
    lines = [f"python {sys.version.split()[0]}, numpy {np.__version__}"]
    print(lines[0], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))   # `timeout` still gets the server killed below
    try:
        start = time.monotonic()
        while not http_ready(f"http://127.0.0.1:{http}/v2/health/live") and time.monotonic() - start < 60 and server.poll() is None:
            time.sleep(0.5)
        print(f"server ready={http_ready(f'http://127.0.0.1:{http}/v2/health/live')} after {time.monotonic() - start:.1f} s "
              f"(exit code {server.poll()})", flush=True)
        for variant in args.variants.split(","):
            try:
                run = probe_like if variant in LIKE_FEATURES else probe
                verdict = run(f"127.0.0.1:{grpc}", variant)
            except Exception as exc:  # noqa: BLE001 - a probe's failure is its verdict
                verdict = f"FAIL {type(exc).__name__}: {exc}"
            lines.append(f"{variant:20s} {verdict}")
            print(lines[-1], flush=True)
    finally:
        os.killpg(server.pid, 9)
        server.wait()
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            shutil.copy(log_path, Path(args.out) / "stub_probe_server.log")
    crashes = log_path.read_text(errors="replace").count("Fatal Python error")
    lines.append(f"stub crashes in the server log: {crashes}")
    report = "\n".join(lines)
    print(report.splitlines()[-1])
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "stub_probe.txt").write_text(report + "\n\n" + log_path.read_text(errors="replace")[-20000:])
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
