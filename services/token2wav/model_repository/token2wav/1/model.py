"""Triton model `token2wav`: flat speech ids + prompt -> 24 kHz audio chunk.

Thin adapter over cosyvoice_token2wav.engine.Token2WavEngine. `execute` parses each request
(cosyvoice_token2wav.request, the stage's one parser), submits it to the engine and returns at once; the
engine's loop answers each request through its response sender when its audio is ready (one final response per
request: the model is not decoupled, so a client makes a plain unary call). New chunks join the running ones
between Euler steps, and a stream's first chunk never waits for more than one step of other work.

Calls stay self-contained: the vocoder overlap cache travels in and out with each chunk, and every streaming call
carries the whole token prefix, so any replica can serve any call. The state cache (`stream_cache_gib`) only
saves work: a streaming call whose earlier blocks a previous call of the same stream (or a `prefill` of the same
prompt) left on this instance computes only its new frames; anywhere else it computes them all, with the same
output. On a GPU the flow runs in bfloat16 (`dtype` auto) and HiFT's graphs are captured in initialize(), before
the stage reports ready.
"""
from __future__ import annotations

import json

import torch
import triton_python_backend_utils as pb_utils

from cosyvoice_common.constants import MEL_BINS
from cosyvoice_common.contracts import TOKEN2WAV_INPUTS, Token2WavMetric, Token2WavOut
from cosyvoice_common.runtime import install_stack_dumps
from cosyvoice_common.stage_params import AUTO, Token2WavParams, stream_cache_bytes
from cosyvoice_common.triton_io import DTYPES, error_response, get_parameter, send_outputs, unbatched_inputs
from cosyvoice_token2wav.engine import CallStats, Token2WavEngine
from cosyvoice_token2wav.request import parse_chunk_request
from cosyvoice_token2wav.sequence import CHUNK_KINDS, ChunkResult
from cosyvoice_token2wav.token2wav import VocoderCache

INPUT_NAMES = tuple(spec.name for spec in TOKEN2WAV_INPUTS)


def flow_dtype(settings: Token2WavParams, device: str) -> torch.dtype:
    """`auto` = bfloat16 flow on CUDA (it holds the quality gate against float32, cosyvoice_token2wav.quality),
    float32 on CPU (the reference's numerics; HiFT is always float32)."""
    name = settings.dtype if settings.dtype != AUTO else ("bfloat16" if device.startswith("cuda") else "float32")
    return DTYPES[name]


def chunk_outputs(wav: torch.Tensor, cache: VocoderCache | None) -> dict[str, torch.Tensor]:
    if cache is None:   # after the final chunk (and for a prefill): empty caches, same ranks
        mel, source, speech = torch.zeros(1, MEL_BINS, 0), torch.zeros(1, 0), torch.zeros(1, 0)
    else:
        mel, source, speech = cache.mel, cache.source.reshape(1, -1), cache.speech.reshape(1, -1)
    outputs = {Token2WavOut.WAVEFORM: wav.reshape(1, -1), Token2WavOut.CACHE_MEL: mel,
               Token2WavOut.CACHE_SOURCE: source, Token2WavOut.CACHE_SPEECH: speech}
    return {name: t.float() for name, t in outputs.items()}   # all float32


class _Metrics:
    """Per chunk kind (prefill/first/middle/final/offline): calls answered, wait in the engine (submitted ->
    admitted; Triton's own queue is nv_inference_queue_duration_us) and compute ms (admitted -> answered);
    flow frames computed and read from the state cache; the bytes the state cache holds."""

    def __init__(self, labels: dict[str, str]) -> None:
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.families = families = {   # held: a family that is garbage collected takes its metrics along
            "chunks": pb_utils.MetricFamily(name=Token2WavMetric.CHUNKS, description="token2wav calls answered",
                                            kind=counter),
            "wait": pb_utils.MetricFamily(name=Token2WavMetric.CHUNK_WAIT_MS,
                                          description="ms a call waited in the engine before its encoder ran",
                                          kind=counter),
            "compute": pb_utils.MetricFamily(name=Token2WavMetric.CHUNK_COMPUTE_MS,
                                             description="ms from a call's admission to its answer", kind=counter),
            "computed": pb_utils.MetricFamily(name=Token2WavMetric.FLOW_FRAMES_COMPUTED,
                                              description="mel frames the flow computed (each through every "
                                                          "Euler step)", kind=counter),
            "reused": pb_utils.MetricFamily(name=Token2WavMetric.FLOW_FRAMES_REUSED,
                                            description="mel frames read from the state cache instead of computed",
                                            kind=counter),
            "held": pb_utils.MetricFamily(name=Token2WavMetric.STREAM_STATE_BYTES,
                                          description="device bytes held by the state cache's blocks", kind=gauge)}
        self.kinds = {(name, kind): families[name].Metric(labels={**labels, "kind": kind})
                      for name in ("chunks", "wait", "compute") for kind in CHUNK_KINDS}
        self.computed = families["computed"].Metric(labels=labels)
        self.reused = families["reused"].Metric(labels=labels)
        self.held = families["held"].Metric(labels=labels)

    def record(self, stats: CallStats, bytes_held: int) -> None:
        self.kinds[("wait", stats.kind)].increment(stats.wait_ms)
        self.kinds[("compute", stats.kind)].increment(stats.compute_ms)
        self.computed.increment(stats.frames_computed)
        self.reused.increment(stats.frames_reused)
        self.held.set(bytes_held)
        self.kinds[("chunks", stats.kind)].increment(1)   # last: a reader that sees the count sees its ms too


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        install_stack_dumps()
        model_config = json.loads(args["model_config"])
        self.settings = settings = Token2WavParams.from_model_config(model_config)
        device = get_parameter(model_config, "device")
        dtype = flow_dtype(settings, device)
        self.engine = Token2WavEngine(get_parameter(model_config, "model_dir"), torch.device(device), dtype,
                                      cache_bytes=stream_cache_bytes(settings.stream_cache_gib, device),
                                      max_batch=settings.max_batch_size, padding_budget=settings.padding_budget,
                                      later_max_wait_s=settings.later_max_wait_ms / 1000.0,
                                      use_cuda_graphs=settings.cuda_graphs and device.startswith("cuda"))
        pb_utils.Logger.log_info(f"token2wav: {settings}")
        # every graph bucket captured now: the stage is ready only after this
        self.engine.capture_graphs(log_line=lambda msg: pb_utils.Logger.log_info(f"{msg}; flow {dtype}"))
        self.metrics = _Metrics({"model": args["model_name"], "version": args["model_version"]})
        self.engine.start()

    def execute(self, requests):
        """Submits every request to the engine and returns None; each is answered through its response sender."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                wanted = frozenset(request.requested_output_names())
                call = parse_chunk_request(unbatched_inputs(request, INPUT_NAMES))
            except Exception as exc:  # noqa: BLE001 - a malformed request answers only itself
                sender.send(error_response(exc), flags=final)
                continue

            def on_done(result: ChunkResult, stats: CallStats, sender=sender, wanted=wanted) -> None:
                try:
                    if result.error is not None:
                        sender.send(error_response(result.error), flags=final)
                        return
                    # answered first: the metric IPCs never delay a chunk (a reader may see them late)
                    send_outputs(sender, chunk_outputs(result.waveform, result.cache), wanted, flags=final)
                    self.metrics.record(stats, self.engine.cache.bytes_held)
                except Exception as exc:  # noqa: BLE001 - a failed send concerns only its own request
                    pb_utils.Logger.log_error(f"token2wav: answering a {stats.kind} call failed: {exc}")

            self.engine.submit(call, on_done)
        return None

    def finalize(self) -> None:
        self.engine.stop()
