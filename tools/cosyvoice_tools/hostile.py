"""Hostile-load suite against a running stack: bombs, then overload, then a check that nothing fell over.

    python -m cosyvoice_tools.hostile --grpc 127.0.0.1:50051 --http http://127.0.0.1:8080 --run-dir run \
        [--api-key KEY] [--concurrency 2] [--overload-factor 10] [--requests 3] [--tokens 10] [--out report.json]

1. Bombs, on gRPC and HTTP: a compressed-audio decode bomb (20 minutes of silent FLAC, ~0.2 MB), prompts beyond the
   upload bound and beyond the gRPC message bound, over-long strings in every field, malformed audio (random bytes, a
   WAV whose header claims an hour of samples it does not carry, an empty file), absurd lengths; with `--api-key`,
   calls without a key or with a wrong one. Each must get its refusal code (INVALID_ARGUMENT / 400 / 413,
   UNAUTHENTICATED / 401); its round trip is reported.
2. Overload, per protocol: `--concurrency` workers (the sustainable load: the gateway's MAX_INFLIGHT_REQUESTS or the
   measured knee) each send `--requests` offline requests of `--tokens` forced speech tokens with a registered voice
   (the unloaded baseline, after one warm-up request), then `--overload-factor` times as many workers do the same.
   Accepted requests' latency is compared with the baseline; refusals must be RESOURCE_EXHAUSTED / 429 with a
   retry-after hint, and their round trip is reported against the 50 ms target. Workers are spread over client
   processes (`--client-processes`; by default one per 20 workers, at most half the cores), so the client's own
   event loop does not become what is measured.
3. Aftermath: every process recorded in `--run-dir` (stack.json of `make up`; repeatable) and every `--pid` still
   runs, `/readyz` answers 200 and gRPC health is SERVING.

Exit status 0 when every functional outcome holds (codes, hints, processes up); timings are reported, not judged.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import multiprocessing
import os
import platform
import statistics
import struct
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.audio import PROMPT_MAX_BYTES
from cosyvoice_gateway.testing import prompt_wav_bytes, silent_flac
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cosyvoice_launcher.stack import recorded_processes
from cosyvoice_launcher.triton import pid_alive

MS_PER_S = 1000.0
REFUSAL_TARGET_MS = 50.0
BOMB_MINUTES = 20                         # of silence: ~0.2 MB as FLAC, 230 MB once decoded at 48 kHz
LONG_STRING_CHARS = 1 << 20               # beyond every string bound, within the gRPC message bound
GRPC_MESSAGE_BEYOND_BYTES = PROMPT_MAX_BYTES + (4 << 20)
PROMPT_SECONDS = 2.0
OK = "OK"
CLOSED = "closed"                         # HTTP: the connection was closed without an answer
WORKERS_PER_CLIENT_PROCESS = 20           # load-phase workers one client process (one event loop) drives
CLIENT_PROCESS_START_S = 3.0              # client processes import and connect, then all start together


# --- inputs ------------------------------------------------------------------------------------------------------
def lying_wav(claimed_seconds: int = 3600, sample_rate_hz: int = 48000) -> bytes:
    """A RIFF header that claims `claimed_seconds` of 16-bit audio, followed by 100 bytes of it."""
    data_bytes = claimed_seconds * sample_rate_hz * 2
    header = (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " +
              struct.pack("<IHHIIHH", 16, 1, 1, sample_rate_hz, sample_rate_hz * 2, 2, 16) +
              b"data" + struct.pack("<I", data_bytes))
    return header + bytes(100)


# --- results -----------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Probe:
    name: str
    protocol: str                 # grpc | http
    expected: tuple[str, ...]     # gRPC status names or HTTP status codes as strings
    got: str = ""
    ms: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.got in self.expected


@dataclass(slots=True)
class Outcome:
    code: str                     # OK, a gRPC status name, or an HTTP status code
    ms: float
    retry_after: str = ""


@dataclass(slots=True)
class LoadPhase:
    workers: int
    outcomes: list[Outcome] = field(default_factory=list)

    def _ms(self, accepted: bool) -> list[float]:
        return sorted(o.ms for o in self.outcomes if (o.code == OK) == accepted)

    def summary(self, refusal_codes: tuple[str, ...]) -> dict[str, object]:
        accepted, refused = self._ms(True), self._ms(False)
        refusals = [o for o in self.outcomes if o.code in refusal_codes]
        return {"workers": self.workers, "requests": len(self.outcomes), "accepted": len(accepted),
                "refused": len(refusals), "other_errors": sorted({o.code for o in self.outcomes
                                                                  if o.code != OK and o.code not in refusal_codes}),
                "accepted_ms": percentiles(accepted), "refused_ms": percentiles(refused),
                "refused_within_target": sum(o.ms <= REFUSAL_TARGET_MS for o in refusals),
                "refusals_without_retry_after": sum(not o.retry_after for o in refusals)}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    def at(q: float) -> float:
        return round(values[min(len(values) - 1, math.ceil(q * len(values)) - 1)], 1)
    return {"p50": at(0.5), "p90": at(0.9), "max": round(values[-1], 1), "mean": round(statistics.fmean(values), 1)}


# --- the target --------------------------------------------------------------------------------------------------
class Target:
    """One gateway: a gRPC channel and an HTTP client, with the API key when there is one."""

    def __init__(self, grpc_addr: str, http_url: str, api_key: str, timeout_s: float, max_connections: int) -> None:
        self.grpc_addr, self.http_url, self.api_key, self.timeout_s = grpc_addr, http_url, api_key, timeout_s
        self.channel = grpc.aio.insecure_channel(grpc_addr, options=[("grpc.max_send_message_length", 64 << 20)])
        self.tts = tts_pb2_grpc.TextToSpeechStub(self.channel)
        self.http = httpx.AsyncClient(base_url=http_url.rstrip("/"), timeout=timeout_s,
                                      limits=httpx.Limits(max_connections=max_connections))

    def args(self, max_connections: int) -> tuple:
        """Constructor arguments for the same gateway in another process."""
        return self.grpc_addr, self.http_url, self.api_key, self.timeout_s, max_connections

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def close(self) -> None:
        await self.channel.close()
        await self.http.aclose()

    async def grpc_call(self, call: Callable[[], Awaitable[object]]) -> Outcome:
        start = time.perf_counter()
        try:
            await call()
            code, retry_after = OK, ""
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            retry_after = dict(exc.trailing_metadata() or ()).get("retry-after", "")
        return Outcome(code, (time.perf_counter() - start) * MS_PER_S, retry_after)

    async def http_call(self, method: str, path: str, keyed: bool = True, **kwargs) -> Outcome:
        """keyed=False: without the API key (kwargs' own headers still go)."""
        start = time.perf_counter()
        kwargs["headers"] = {**(self.headers if keyed else {}), **kwargs.get("headers", {})}
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError:     # the server closed the connection (or never answered)
            return Outcome(CLOSED, (time.perf_counter() - start) * MS_PER_S)
        code = OK if response.status_code < 300 else str(response.status_code)
        return Outcome(code, (time.perf_counter() - start) * MS_PER_S, response.headers.get("retry-after", ""))


# --- 1. bombs ----------------------------------------------------------------------------------------------------
async def run_bombs(target: Target) -> list[Probe]:
    bomb, good = silent_flac(BOMB_MINUTES), prompt_wav_bytes(PROMPT_SECONDS)
    long = "a" * LONG_STRING_CHARS
    invalid = ("INVALID_ARGUMENT",)
    t = target.timeout_s

    def synth(**fields) -> tts_pb2.SynthesizeRequest:
        return tts_pb2.SynthesizeRequest(**{"text": "Hello.", **fields})

    grpc_probes: list[tuple[str, tuple[str, ...], Callable[[], Awaitable[object]]]] = [
        ("flac decode bomb (Synthesize)", invalid,
         lambda: target.tts.Synthesize(synth(prompt_audio=bomb, prompt_text="hi"), metadata=target.metadata,
                                       timeout=t)),
        ("flac decode bomb (SynthesizeStream)", invalid,
         lambda: _drain(target.tts.SynthesizeStream(synth(prompt_audio=bomb), metadata=target.metadata, timeout=t))),
        ("flac decode bomb (RegisterSpeaker)", invalid,
         lambda: target.tts.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(speaker_id="bomb", prompt_audio=bomb),
                                            metadata=target.metadata, timeout=t)),
        ("prompt beyond the upload bound", invalid,
         lambda: target.tts.Synthesize(synth(prompt_audio=bytes(PROMPT_MAX_BYTES + 1)), metadata=target.metadata,
                                       timeout=t)),
        ("message beyond the gRPC bound", ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"),
         lambda: target.tts.Synthesize(synth(prompt_audio=bytes(GRPC_MESSAGE_BEYOND_BYTES)), metadata=target.metadata,
                                       timeout=t)),
        ("random bytes as audio", invalid,
         lambda: target.tts.Synthesize(synth(prompt_audio=os.urandom(64 << 10)), metadata=target.metadata, timeout=t)),
        ("WAV header claiming an hour", invalid,
         lambda: target.tts.Synthesize(synth(prompt_audio=lying_wav()), metadata=target.metadata, timeout=t)),
        ("max_speech_tokens 10^9", invalid,
         lambda: target.tts.Synthesize(synth(prompt_audio=good, max_speech_tokens=10 ** 9), metadata=target.metadata,
                                       timeout=t)),
    ]
    for name in ("text", "prompt_text", "instruct", "speaker_id", "request_id"):
        fields = {"prompt_audio": good} if name != "speaker_id" else {}
        request = synth(**{**fields, name: long})
        grpc_probes.append((f"1 MiB {name}", invalid, lambda request=request: target.tts.Synthesize(
            request, metadata=target.metadata, timeout=t)))
    probes = []
    for name, expected, call in grpc_probes:
        outcome = await target.grpc_call(call)
        probes.append(Probe(name, "grpc", expected, outcome.code, outcome.ms))

    speech = {"model": "cosyvoice2", "input": "Hello.", "response_format": "pcm"}
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    http_probes: list[tuple[str, tuple[str, ...], str, str, dict]] = [
        ("flac decode bomb (ref_audio)", ("400",), "POST", "/v1/audio/speech",
         {"json": {**speech, "ref_audio": b64(bomb), "ref_text": "hi"}}),
        ("flac decode bomb (voice upload)", ("400",), "POST", "/v1/audio/voices",
         {"data": {"name": "bomb"}, "files": {"audio": ("b.flac", bomb, "audio/flac")}}),
        # 413 is sent before the body is read; a client still sending may see the close first
        ("upload beyond the bound", ("413", CLOSED), "POST", "/v1/audio/voices",
         {"data": {"name": "big"}, "files": {"audio": ("b.wav", bytes(PROMPT_MAX_BYTES + (2 << 20)), "audio/wav")}}),
        ("random bytes as ref_audio", ("400",), "POST", "/v1/audio/speech",
         {"json": {**speech, "ref_audio": b64(os.urandom(64 << 10))}}),
        ("WAV header claiming an hour (voice upload)", ("400",), "POST", "/v1/audio/voices",
         {"data": {"name": "liar"}, "files": {"audio": ("l.wav", lying_wav(), "audio/wav")}}),
        ("empty audio file", ("400",), "POST", "/v1/audio/voices",
         {"data": {"name": "empty"}, "files": {"audio": ("e.wav", b"", "audio/wav")}}),
        ("ref_audio not base64", ("400",), "POST", "/v1/audio/speech", {"json": {**speech, "ref_audio": "%%%"}}),
        ("1 MiB input", ("400",), "POST", "/v1/audio/speech", {"json": {**speech, "voice": "v", "input": long}}),
        ("1 MiB voice", ("400",), "POST", "/v1/audio/speech", {"json": {**speech, "voice": long}}),
        ("1 MiB instructions", ("400",), "POST", "/v1/audio/speech",
         {"json": {**speech, "voice": "v", "instructions": long}}),
        ("malformed JSON", ("400",), "POST", "/v1/audio/speech",
         {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ]
    for name, expected, method, path, kwargs in http_probes:
        outcome = await target.http_call(method, path, **kwargs)
        probes.append(Probe(name, "http", expected, outcome.code, outcome.ms))

    if target.api_key:     # the same gateway without the key, then with a wrong one
        for label, metadata, headers in (("no key", (), {}),
                                         ("wrong key", (("authorization", "Bearer wrong"),),
                                          {"authorization": "Bearer wrong"})):
            outcome = await target.grpc_call(lambda metadata=metadata: target.tts.Synthesize(
                synth(prompt_audio=good), metadata=metadata, timeout=t))
            probes.append(Probe(f"{label} (Synthesize)", "grpc", ("UNAUTHENTICATED",), outcome.code, outcome.ms))
            outcome = await target.http_call("POST", "/v1/audio/speech", keyed=False, json={**speech, "voice": "v"},
                                             headers=headers)
            probes.append(Probe(f"{label} (speech)", "http", ("401",), outcome.code, outcome.ms))
    return probes


async def _drain(stream) -> None:
    async for _ in stream:
        pass


# --- 2. overload -------------------------------------------------------------------------------------------------
async def register_voice(target: Target) -> str:
    name = f"hostile-{uuid.uuid4().hex[:8]}"
    await target.tts.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(
        speaker_id=name, prompt_audio=prompt_wav_bytes(PROMPT_SECONDS, seed=1), prompt_text="Hello there.", replace=True),
        metadata=target.metadata, timeout=target.timeout_s)
    return name


async def load_phase(target: Target, protocol: str, voice: str, workers: int, requests: int, tokens: int
                     ) -> LoadPhase:
    phase = LoadPhase(workers)

    async def one() -> Outcome:
        if protocol == "grpc":
            request = tts_pb2.SynthesizeRequest(text="Hello there.", speaker_id=voice, min_speech_tokens=tokens,
                                                max_speech_tokens=tokens)
            return await target.grpc_call(lambda: target.tts.Synthesize(request, metadata=target.metadata,
                                                                        timeout=target.timeout_s))
        return await target.http_call("POST", "/v1/audio/speech", json={
            "model": "cosyvoice2", "input": "Hello there.", "voice": voice, "response_format": "pcm",
            "min_speech_tokens": tokens, "max_speech_tokens": tokens})

    async def worker() -> None:
        for _ in range(requests):
            phase.outcomes.append(await one())

    await asyncio.gather(*(worker() for _ in range(workers)))
    return phase


def client_processes(workers: int, requested: int = 0) -> int:
    """How many client processes share `workers`: `requested` when given, else one per WORKERS_PER_CLIENT_PROCESS
    workers, at most half the cores (the stack shares the machine). One Python event loop with 160 HTTP connections
    is itself the bottleneck: on a 16-core GPU host it added ~700 ms to every call the gateway answered in ~210 ms."""
    if requested:
        return max(1, min(requested, workers))
    return max(1, min(workers // WORKERS_PER_CLIENT_PROCESS, (os.cpu_count() or 2) // 2))


def _load_share(target_args: tuple, protocol: str, voice: str, workers: int, requests: int, tokens: int,
                start_at: float) -> list[tuple[str, float, str]]:
    """One client process's share of a load phase (its own event loop, gRPC channel and HTTP pool). Every process
    starts sending at `start_at` (wall clock), after its imports and set-up, so the shares overlap."""
    async def go() -> list[tuple[str, float, str]]:
        target = Target(*target_args)
        try:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            phase = await load_phase(target, protocol, voice, workers, requests, tokens)
        finally:
            await target.close()
        return [(o.code, o.ms, o.retry_after) for o in phase.outcomes]
    return asyncio.run(go())


async def load_phase_spread(target: Target, protocol: str, voice: str, workers: int, requests: int, tokens: int,
                            processes: int) -> LoadPhase:
    """`load_phase` with the workers spread over `processes` client processes (1: in this process)."""
    if processes <= 1:
        return await load_phase(target, protocol, voice, workers, requests, tokens)
    shares = [workers // processes + (i < workers % processes) for i in range(processes)]
    start_at = time.time() + CLIENT_PROCESS_START_S
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = await asyncio.gather(*(loop.run_in_executor(
            pool, _load_share, target.args(share + 8), protocol, voice, share, requests, tokens, start_at)
            for share in shares))
    phase = LoadPhase(workers)
    phase.outcomes = [Outcome(*o) for result in results for o in result]
    return phase


# --- 3. aftermath ------------------------------------------------------------------------------------------------
async def aftermath(target: Target, run_dirs: list[Path], pids: list[int]) -> dict[str, object]:
    processes = {f"{r.name} ({r.pid})": pid_alive(r.pid) for d in run_dirs for r in recorded_processes(d)}
    processes.update({f"pid {pid}": pid_alive(pid) for pid in pids})
    readyz = (await target.http.get("/readyz")).status_code
    health = await health_pb2_grpc.HealthStub(target.channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                    timeout=target.timeout_s)
    return {"processes": processes, "readyz": readyz,
            "grpc_health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}


# --- the run -----------------------------------------------------------------------------------------------------
REFUSALS = {"grpc": ("RESOURCE_EXHAUSTED",), "http": ("429",)}


async def run(args) -> dict[str, object]:
    workers_max = args.concurrency * args.overload_factor
    spread = {"baseline": client_processes(args.concurrency, args.client_processes),
              "overload": client_processes(workers_max, args.client_processes)}
    target = Target(args.grpc, args.http, args.api_key, args.timeout_s, max_connections=workers_max + 8)
    try:
        bombs = await run_bombs(target)
        voice = await register_voice(target)
        overload = {}
        for protocol in args.protocols:
            warmup = await load_phase(target, protocol, voice, 1, 1, args.tokens)   # first-use costs, not counted
            if warmup.outcomes[0].code != OK:
                raise RuntimeError(f"{protocol}: a plain request failed before any load: {warmup.outcomes[0]}")
            baseline = await load_phase_spread(target, protocol, voice, args.concurrency, args.requests, args.tokens,
                                               spread["baseline"])
            loaded = await load_phase_spread(target, protocol, voice, workers_max, args.requests, args.tokens,
                                             spread["overload"])
            overload[protocol] = {"baseline": baseline.summary(REFUSALS[protocol]),
                                  "overload": loaded.summary(REFUSALS[protocol])}
        await target.tts.DeleteSpeaker(tts_pb2.DeleteSpeakerRequest(speaker_id=voice), metadata=target.metadata,
                                       timeout=target.timeout_s)
        after = await aftermath(target, [Path(d) for d in args.run_dir], args.pid)
    finally:
        await target.close()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "auth": bool(args.api_key),
              "command": " ".join(["python -m cosyvoice_tools.hostile", *sys.argv[1:]]),
              "settings": {"concurrency": args.concurrency, "overload_factor": args.overload_factor,
                           "requests_per_worker": args.requests, "tokens": args.tokens,
                           "client_processes": spread},
              "bombs": [{**asdict(p), "ok": p.ok} for p in bombs], "overload": overload, "aftermath": after}
    report["failures"] = failures(report)
    return report


def failures(report: dict) -> list[str]:
    """Functional outcomes only (codes, hints, processes); timings are reported, never judged here."""
    out = [f"bomb {b['protocol']} {b['name']!r}: got {b['got']}, expected {'/'.join(b['expected'])}"
           for b in report["bombs"] if not b["ok"]]
    for protocol, phases in report["overload"].items():
        base, loaded = phases["baseline"], phases["overload"]
        if base["accepted"] != base["requests"]:
            out.append(f"{protocol}: the baseline load was not all accepted ({base})")
        if loaded["other_errors"]:
            out.append(f"{protocol}: overload gave errors other than refusals: {loaded['other_errors']}")
        if not loaded["refused"]:
            out.append(f"{protocol}: {loaded['workers']} workers got no refusal (is the admission bound above them?)")
        if loaded["refusals_without_retry_after"]:
            out.append(f"{protocol}: {loaded['refusals_without_retry_after']} refusals without retry-after")
    after = report["aftermath"]
    out += [f"process {name} is gone" for name, alive in after["processes"].items() if not alive]
    if after["readyz"] != 200:
        out.append(f"/readyz answered {after['readyz']}")
    if after["grpc_health"] != "SERVING":
        out.append(f"gRPC health is {after['grpc_health']}")
    return out


def format_report(report: dict) -> str:
    processes = report["settings"]["client_processes"]
    lines = [f"hostile load, {report['date']}, {report['machine']}, auth {'on' if report['auth'] else 'off'}, "
             f"client processes {processes['baseline']} (baseline) / {processes['overload']} (overload)",
             f"command: {report['command']}", "", "| bomb | protocol | expected | got | ms |", "|---|---|---|---|---|"]
    lines += [f"| {b['name']} | {b['protocol']} | {'/'.join(b['expected'])} | {b['got']} | {b['ms']:.1f} |"
              for b in report["bombs"]]
    lines += ["", "| protocol | phase | workers | requests | accepted | accepted p50 / p90 ms | refused | "
              "refused p50 / max ms | refused <= 50 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for protocol, phases in report["overload"].items():
        for name, s in phases.items():
            acc, ref = s["accepted_ms"], s["refused_ms"]
            lines.append(f"| {protocol} | {name} | {s['workers']} | {s['requests']} | {s['accepted']} | "
                         f"{acc.get('p50', '-')} / {acc.get('p90', '-')} | {s['refused']} | "
                         f"{ref.get('p50', '-')} / {ref.get('max', '-')} | {s['refused_within_target']} |")
    after = report["aftermath"]
    alive = sum(after["processes"].values())
    lines += ["", f"after: {alive}/{len(after['processes'])} processes up, /readyz {after['readyz']}, "
                  f"gRPC health {after['grpc_health']}",
              "failures: " + ("none" if not report["failures"] else "; ".join(report["failures"]))]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpc", default="127.0.0.1:50051", help="gateway gRPC host:port")
    parser.add_argument("--http", default="http://127.0.0.1:8080", help="gateway HTTP base URL")
    parser.add_argument("--api-key", default=os.environ.get("COSYVOICE_API_KEY", "").split(",")[0].strip(),
                        help="the gateway's key (default: the first of COSYVOICE_API_KEY); also probes without it")
    parser.add_argument("--run-dir", action="append", default=[], help="stack.json dir whose processes must survive")
    parser.add_argument("--pid", action="append", type=int, default=[], help="another process that must survive")
    parser.add_argument("--concurrency", type=int, default=2, help="the sustainable load (workers)")
    parser.add_argument("--overload-factor", type=int, default=10)
    parser.add_argument("--requests", type=int, default=3, help="requests per worker and phase")
    parser.add_argument("--tokens", type=int, default=10, help="forced speech tokens per request")
    parser.add_argument("--protocols", default="grpc,http", type=lambda v: [p for p in v.split(",") if p])
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--client-processes", type=int, default=0,
                        help="client processes a load phase's workers are spread over (0: one per "
                             f"{WORKERS_PER_CLIENT_PROCESS} workers, at most half the cores)")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args(argv)
    if args.client_processes < 0:
        parser.error("client-processes must be >= 0")
    if min(args.concurrency, args.overload_factor, args.requests, args.tokens) < 1:
        parser.error("concurrency, overload-factor, requests and tokens must be >= 1")
    if not set(args.protocols) <= set(REFUSALS):
        parser.error(f"protocols are {list(REFUSALS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    print(format_report(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
