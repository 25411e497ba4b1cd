"""Client for the seed-compatible `cosyvoice2` Triton model, speaking exactly the seed's contract.

    python -m cosyvoice_tools.seed_client --server-addr 127.0.0.1 --server-port 8001 --mode streaming \
        --manifest-path data/manifest.txt --num-tasks 4 --log-dir out/seed_stream
    python -m cosyvoice_tools.seed_client --server-port 8011 --mode offline --use-spk2info-cache True \
        --target-text "Hello there." --log-dir out/one
    python -m cosyvoice_tools.seed_client --protocol http --server-port 8010 --mode offline \
        --reference-audio p.wav --reference-text "..." --target-text "..." --log-dir out/http

Request (as the seed's client_grpc.py builds it): `reference_wav` FP32 [1, N] (16 kHz, zero-padded to a
whole number of `--padding-s` seconds of prompt + estimated target; streaming 10 s, offline 1 s by
default), `reference_wav_len` INT32 [1, 1], `reference_text` and `target_text` BYTES [1, 1]; with
`--use-spk2info-cache True` only `target_text`. Optional extras `min_speech_tokens`/`max_speech_tokens`
INT32 [1, 1] (`--min-speech-tokens`/`--max-speech-tokens`; not sent when 0).
Streaming: `start_stream` + `async_stream_infer(..., enable_empty_final_response=True)`; the response with
parameter `triton_final_response` ends a request. Offline: `infer` (gRPC or HTTP).
Manifest lines: `utt|prompt_text|prompt_wav|target_text` (prompt_wav relative to the manifest's folder).
Report (printed and written to `<log-dir>/rtf-<name>.txt`): RTF = wall time / seconds of audio; latency
percentiles (streaming: total, first chunk, second chunk; offline: request). Audio: `<log-dir>/<utt>.wav`.

For the benchmark tool: `SeedSession(url, mode, protocol).run_one(prompt_wav_16k, prompt_text, target_text,
...)` -> `(first_chunk_s, total_s, audio_s)`; blocking, one session per worker thread.
"""
from __future__ import annotations

import argparse
import math
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cosyvoice_common.constants import OUTPUT_SAMPLE_RATE_HZ, PROMPT_16K_SAMPLE_RATE_HZ
from cosyvoice_common.contracts import SEED_MODEL, SeedIn, SeedOut

FINAL_PARAM = "triton_final_response"
STREAM_PADDING_S = 10       # the seed's client: streaming pads the prompt to 10 s multiples, offline to 1 s
OFFLINE_PADDING_S = 1
RESPONSE_TIMEOUT_S = 200.0
MS_PER_S = 1000.0


# --- inputs --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SeedItem:
    utt: str
    prompt_text: str
    prompt_wav: Path | None
    target_text: str


def load_manifest(path: Path) -> list[SeedItem]:
    """Lines `utt|prompt_text|prompt_wav|target_text`; relative wav paths are under the manifest's folder.
    A `.jsonl` file is read as our benchmark manifest (id, prompt_text, prompt_audio, target_text)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        import json

        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [SeedItem(r["id"], r["prompt_text"], path.parent / r["prompt_audio"], r["target_text"]) for r in rows]
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().split("|")
        if len(fields) != 4:
            raise ValueError(f"{path}:{number}: expected utt|prompt_text|prompt_wav|target_text, got {len(fields)} fields")
        utt, prompt_text, wav, target_text = fields
        wav_path = Path(wav) if Path(wav).is_absolute() else path.parent / wav
        items.append(SeedItem(Path(utt).stem, prompt_text, wav_path, target_text))
    if not items:
        raise ValueError(f"{path}: empty manifest")
    return items


def load_wav_16k(path: Path) -> np.ndarray:
    """Mono float32 at 16 kHz (the rate the seed's server hard-codes for reference_wav)."""
    import soundfile as sf
    from cosyvoice_common.audio import resample

    wav, rate = sf.read(str(path), dtype="float32", always_2d=True)
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    return resample(wav, int(rate), PROMPT_16K_SAMPLE_RATE_HZ) if rate != PROMPT_16K_SAMPLE_RATE_HZ else wav


def padded_prompt(wav_16k: np.ndarray, prompt_text: str, target_text: str, padding_s: int) -> np.ndarray:
    """[1, N] float32: the prompt zero-padded to a whole number of `padding_s` seconds covering the prompt
    plus the target's estimated duration (prompt seconds per prompt character x target characters)."""
    prompt_s = wav_16k.shape[0] / PROMPT_16K_SAMPLE_RATE_HZ
    if padding_s <= 0:
        return np.ascontiguousarray(wav_16k, np.float32).reshape(1, -1)
    target_s = prompt_s / len(prompt_text) * len(target_text) if prompt_text else prompt_s
    blocks = math.floor(prompt_s + target_s) // padding_s + 1
    samples = np.zeros((1, max(blocks * padding_s * PROMPT_16K_SAMPLE_RATE_HZ, wav_16k.shape[0])), np.float32)
    samples[0, : wav_16k.shape[0]] = wav_16k
    return samples


def seed_inputs(protocol_module, wav_16k: np.ndarray | None, prompt_text: str, target_text: str, *,
                padding_s: int = 0, min_speech_tokens: int = 0, max_speech_tokens: int = 0) -> list:
    """InferInputs of the seed's contract (`protocol_module` = tritonclient.grpc or tritonclient.http).
    wav_16k None = spk2info-cache mode: only target_text (and the length extras when set)."""
    inputs = []

    def add(name: str, array: np.ndarray, datatype: str) -> None:
        tensor = protocol_module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)

    if wav_16k is not None:
        samples = padded_prompt(wav_16k, prompt_text, target_text, padding_s)
        add(SeedIn.REFERENCE_WAV, samples, "FP32")
        add(SeedIn.REFERENCE_WAV_LEN, np.array([[wav_16k.shape[0]]], np.int32), "INT32")
        add(SeedIn.REFERENCE_TEXT, np.array([[prompt_text]], dtype=object), "BYTES")
    add(SeedIn.TARGET_TEXT, np.array([[target_text]], dtype=object), "BYTES")
    if min_speech_tokens:
        add(SeedIn.MIN_SPEECH_TOKENS, np.array([[min_speech_tokens]], np.int32), "INT32")
    if max_speech_tokens:
        add(SeedIn.MAX_SPEECH_TOKENS, np.array([[max_speech_tokens]], np.int32), "INT32")
    return inputs


# --- calls ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class SeedResult:
    audio: np.ndarray               # float32 24 kHz
    total_s: float
    first_chunk_s: float            # offline: = total_s
    second_chunk_s: float | None = None   # streaming: second chunk - first chunk
    chunks: int = 1

    @property
    def audio_s(self) -> float:
        return self.audio.shape[0] / OUTPUT_SAMPLE_RATE_HZ


class SeedError(RuntimeError):
    """The server answered a request with an error."""


class SeedStreamClient:
    """One gRPC stream (`start_stream`), shared by requests told apart by request id (thread-safe)."""

    def __init__(self, url: str, model: str = SEED_MODEL) -> None:
        import tritonclient.grpc as grpcclient

        self.model = model
        self.client = grpcclient.InferenceServerClient(url)
        self._waiting: dict[str, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self.client.start_stream(callback=self._callback)

    def _callback(self, result, error) -> None:
        if error is not None:
            # An error response carries no id we can read reliably: wake every waiter on this stream.
            with self._lock:
                waiting = list(self._waiting.values())
            for q in waiting:
                q.put((time.perf_counter(), None, error))
            return
        request_id = result.get_response().id
        with self._lock:
            q = self._waiting.get(request_id)
        if q is not None:
            q.put((time.perf_counter(), result, None))

    def run(self, inputs: list, request_id: str | None = None, timeout_s: float = RESPONSE_TIMEOUT_S) -> SeedResult:
        import tritonclient.grpc as grpcclient

        request_id = request_id or uuid.uuid4().hex
        q: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._waiting[request_id] = q
        chunks: list[np.ndarray] = []
        arrivals: list[float] = []
        start = time.perf_counter()
        try:
            self.client.async_stream_infer(self.model, inputs, request_id=request_id,
                                           outputs=[grpcclient.InferRequestedOutput(SeedOut.WAVEFORM)],
                                           enable_empty_final_response=True)
            while True:
                try:
                    arrived, result, error = q.get(timeout=timeout_s)
                except queue.Empty:
                    raise SeedError(f"request {request_id}: no response in {timeout_s:.0f} s") from None
                if error is not None:
                    raise SeedError(f"request {request_id}: {error}")
                response = result.get_response()
                if response.outputs:
                    wav = result.as_numpy(SeedOut.WAVEFORM).reshape(-1)
                    if wav.size:
                        chunks.append(wav)
                        arrivals.append(arrived)
                final = response.parameters.get(FINAL_PARAM)
                if final is not None and final.bool_param:
                    break
        finally:
            with self._lock:
                self._waiting.pop(request_id, None)
        total_s = time.perf_counter() - start
        audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        first = arrivals[0] - start if arrivals else total_s
        second = arrivals[1] - arrivals[0] if len(arrivals) > 1 else None
        return SeedResult(audio, total_s, first, second, len(chunks))

    def close(self) -> None:
        try:
            self.client.stop_stream()
        finally:
            self.client.close()


class SeedOfflineClient:
    """`infer` over gRPC or HTTP against the offline (non-decoupled) model."""

    def __init__(self, url: str, protocol: str = "grpc", model: str = SEED_MODEL) -> None:
        self.module = module = _module(protocol)
        self.model = model
        self.client = module.InferenceServerClient(url)

    def run(self, inputs: list, request_id: str | None = None, timeout_s: float = RESPONSE_TIMEOUT_S) -> SeedResult:
        from tritonclient.utils import InferenceServerException

        start = time.perf_counter()
        try:
            kwargs = {"client_timeout": timeout_s} if self.module.__name__.endswith("grpc") else {}
            result = self.client.infer(self.model, inputs, request_id=request_id or uuid.uuid4().hex,
                                       outputs=[self.module.InferRequestedOutput(SeedOut.WAVEFORM)], **kwargs)
        except InferenceServerException as exc:
            raise SeedError(str(exc)) from exc
        total_s = time.perf_counter() - start
        return SeedResult(result.as_numpy(SeedOut.WAVEFORM).reshape(-1).astype(np.float32), total_s, total_s)

    def close(self) -> None:
        self.client.close()


class SeedSession:
    """One worker's connection: streaming (gRPC stream) or offline (gRPC/HTTP infer). For the benchmark:

        session = SeedSession("127.0.0.1:8001", mode="streaming")
        first_chunk_s, total_s, audio_s = session.run_one(wav_16k, prompt_text, target_text, min_speech_tokens=150,
                                                          max_speech_tokens=150)   # blocking; wav None = cache
    """

    def __init__(self, url: str, mode: str = "streaming", protocol: str = "grpc", model: str = SEED_MODEL) -> None:
        if mode not in ("streaming", "offline"):
            raise ValueError(f"mode must be streaming or offline, got {mode!r}")
        if mode == "streaming" and protocol != "grpc":
            raise ValueError("streaming needs gRPC (the seed streams over gRPC only)")
        self.mode = mode
        self.protocol_module = _module(protocol)
        self.client = SeedStreamClient(url, model) if mode == "streaming" else SeedOfflineClient(url, protocol, model)

    def request(self, wav_16k: np.ndarray | None, prompt_text: str, target_text: str, *, padding_s: int | None = None,
                min_speech_tokens: int = 0, max_speech_tokens: int = 0, request_id: str | None = None) -> SeedResult:
        if padding_s is None:
            padding_s = STREAM_PADDING_S if self.mode == "streaming" else OFFLINE_PADDING_S
        inputs = seed_inputs(self.protocol_module, wav_16k, prompt_text, target_text, padding_s=padding_s,
                             min_speech_tokens=min_speech_tokens, max_speech_tokens=max_speech_tokens)
        return self.client.run(inputs, request_id)

    def run_one(self, wav_16k: np.ndarray | None, prompt_text: str, target_text: str, **kwargs) -> tuple[float, float, float]:
        result = self.request(wav_16k, prompt_text, target_text, **kwargs)
        return result.first_chunk_s, result.total_s, result.audio_s

    def close(self) -> None:
        self.client.close()


def _module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
    return module


def run_one(url: str, wav_16k: np.ndarray | None, prompt_text: str, target_text: str, mode: str = "streaming",
            protocol: str = "grpc", **kwargs) -> tuple[float, float, float]:
    """One request on a fresh connection -> (first_chunk_s, total_s, audio_s)."""
    session = SeedSession(url, mode, protocol)
    try:
        return session.run_one(wav_16k, prompt_text, target_text, **kwargs)
    finally:
        session.close()


# --- report --------------------------------------------------------------------------------------------
def _stats(name: str, values_s: list[float]) -> list[str]:
    if not values_s:
        return [f"no {name} data"]
    ms = np.asarray(values_s) * MS_PER_S
    return [f"{name}_{q}_percentile_ms: {np.percentile(ms, q):.2f}" for q in (50, 90, 95, 99)] + \
           [f"average_{name}_ms: {ms.mean():.2f}"]


def report(mode: str, results: list[SeedResult], wall_s: float, failed: int) -> str:
    audio_s = sum(r.audio_s for r in results)
    lines = [f"Mode: {mode}", f"RTF: {wall_s / audio_s:.4f}" if audio_s else "RTF: inf",
             f"total_duration: {audio_s:.3f} seconds", f"processing time: {wall_s:.3f} seconds",
             f"requests: {len(results)} ok, {failed} failed"]
    if mode == "streaming":
        lines += ["", "--- Total Request Latency ---", *_stats("total_request_latency", [r.total_s for r in results]),
                  "", "--- First Chunk Latency ---", *_stats("first_chunk_latency", [r.first_chunk_s for r in results]),
                  "", "--- Second Chunk Latency ---",
                  *_stats("second_chunk_latency", [r.second_chunk_s for r in results if r.second_chunk_s is not None])]
    else:
        lines += _stats("latency", [r.total_s for r in results])
    return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------------------
def _bool(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-addr", default="127.0.0.1")
    p.add_argument("--server-port", type=int, default=8001, help="gRPC 8001 streaming / 8011 offline; HTTP 8000 / 8010")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--model-name", default=SEED_MODEL)
    p.add_argument("--mode", choices=("offline", "streaming"), default="offline")
    p.add_argument("--manifest-path", type=Path, help="utt|prompt_text|prompt_wav|target_text per line")
    p.add_argument("--reference-audio", type=Path, help="one request instead of a manifest")
    p.add_argument("--reference-text", default="")
    p.add_argument("--target-text", default="")
    p.add_argument("--num-tasks", type=int, default=1, help="concurrent workers (contiguous shards, as the seed)")
    p.add_argument("--use-spk2info-cache", default="False", help="True: send only target_text (default speaker)")
    p.add_argument("--padding-s", type=int, default=None, help="prompt zero-padding unit (default 10 streaming, 1 offline)")
    p.add_argument("--min-speech-tokens", type=int, default=0)
    p.add_argument("--max-speech-tokens", type=int, default=0)
    p.add_argument("--log-dir", type=Path, default=Path("./tmp"))
    p.add_argument("--log-interval", type=int, default=5)
    return p.parse_args(argv)


def _shards(items: list, k: int) -> list[list]:
    k = max(1, min(k, len(items)))
    size, extra = divmod(len(items), k)
    shards, start = [], 0
    for i in range(k):
        end = start + size + (1 if i < extra else 0)
        shards.append(items[start:end])
        start = end
    return shards


def main(argv=None) -> int:
    import soundfile as sf

    args = parse_args(argv)
    if args.mode == "streaming" and args.protocol != "grpc":
        raise SystemExit("streaming needs --protocol grpc")
    use_cache = _bool(args.use_spk2info_cache)
    if args.manifest_path:
        items, name = load_manifest(args.manifest_path), args.manifest_path.stem
    elif args.target_text:
        items = [SeedItem("test", args.reference_text, args.reference_audio, args.target_text)]
        name = args.reference_audio.stem if args.reference_audio else "single"
    else:
        raise SystemExit("give --manifest-path, or --target-text (with --reference-audio unless the cache is used)")
    if not use_cache and any(i.prompt_wav is None for i in items):
        raise SystemExit("--reference-audio is required unless --use-spk2info-cache True")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    url = f"{args.server_addr}:{args.server_port}"
    wavs = {} if use_cache else {i.prompt_wav: load_wav_16k(i.prompt_wav) for i in items}

    def worker(task: int, shard: list[SeedItem]) -> tuple[list[SeedResult], int]:
        session = SeedSession(url, args.mode, args.protocol, args.model_name)
        results, failed = [], 0
        try:
            for n, item in enumerate(shard):
                if n % args.log_interval == 0:
                    print(f"task-{task}: {n}/{len(shard)}", flush=True)
                try:
                    result = session.request(None if use_cache else wavs[item.prompt_wav], item.prompt_text,
                                             item.target_text, padding_s=args.padding_s,
                                             min_speech_tokens=args.min_speech_tokens,
                                             max_speech_tokens=args.max_speech_tokens)
                except SeedError as exc:
                    print(f"task-{task}: {item.utt} failed: {exc}", flush=True)
                    failed += 1
                    continue
                sf.write(str(args.log_dir / f"{item.utt}.wav"), result.audio, OUTPUT_SAMPLE_RATE_HZ, "PCM_16")
                if args.mode == "streaming":
                    second = f"{result.second_chunk_s:.4f}s" if result.second_chunk_s is not None else "N/A"
                    print(f"task-{task}: {item.utt} first chunk {result.first_chunk_s:.4f}s, second chunk {second}, "
                          f"total {result.total_s:.4f}s, audio {result.audio_s:.4f}s", flush=True)
                results.append(result)
        finally:
            session.close()
        return results, failed

    shards = _shards(items, args.num_tasks)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(shards)) as pool:
        outcomes = list(pool.map(lambda a: worker(*a), enumerate(shards)))
    wall_s = time.perf_counter() - start
    results = [r for rs, _ in outcomes for r in rs]
    failed = sum(f for _, f in outcomes)
    text = report(args.mode, results, wall_s, failed)
    print(text)
    (args.log_dir / f"rtf-{name}.txt").write_text(text + "\n")
    return 0 if results and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
