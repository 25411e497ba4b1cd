"""Command-line client of the gateway.

    python -m cosyvoice_gateway.cli synth --text "..." --prompt-wav p.wav [--prompt-text "..."] [--stream] --out out.wav
    python -m cosyvoice_gateway.cli synth --text "..." --speaker alice --out out.wav
    python -m cosyvoice_gateway.cli register --speaker alice --prompt-wav p.wav --prompt-text "..."
    python -m cosyvoice_gateway.cli list | delete --speaker alice
All take --addr (default 127.0.0.1:50051). synth prints first-chunk latency (client-side) and the
gateway's per-stage timings. A gateway with TLS (TLS_CERT_FILE/TLS_KEY_FILE): --tls trusts the system's roots,
--tls-ca ca.pem a private CA (or the self-signed certificate itself); --tls-server-name when the certificate
names another host than --addr.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import soundfile as sf
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.stages import STAGE_NAMES

from cosyvoice_gateway.auth import API_KEY_ENV

MS_PER_S = 1000.0


def _print_timings(t: tts_pb2.StageTimings) -> None:
    for stage in STAGE_NAMES:
        s = getattr(t, stage)
        print(f"  {stage:<9} queue {s.queue_ms:8.1f} ms  compute {s.compute_ms:8.1f} ms  calls {s.calls}")
    print(f"  cache_hit {t.cache_hit}  speech_tokens {t.speech_tokens}  audio {t.audio_seconds:.2f} s  "
          f"first_chunk {t.first_chunk_ms:.1f} ms  total {t.total_ms:.1f} ms")


async def synth(stub, args) -> None:
    request = tts_pb2.SynthesizeRequest(
        text=args.text, speaker_id=args.speaker or "", prompt_text=args.prompt_text or "",
        instruct=args.instruct or "", sample_rate=args.sample_rate, encoding=tts_pb2.PCM_S16LE,
        min_speech_tokens=args.min_tokens, max_speech_tokens=args.max_tokens,
        sampling=tts_pb2.SamplingParams(seed=args.seed))
    if args.prompt_wav:
        request.prompt_audio = Path(args.prompt_wav).read_bytes()
    start = time.perf_counter()
    if args.stream:
        pieces, first_ms, timings = [], None, None
        async for chunk in stub.SynthesizeStream(request, metadata=args.metadata):
            if first_ms is None and chunk.audio:
                first_ms = (time.perf_counter() - start) * MS_PER_S
            pieces.append(chunk.audio)
            sample_rate = chunk.sample_rate
            if chunk.is_final:
                timings = chunk.timings
        audio = b"".join(pieces)
        print(f"chunks {len(pieces)}  first chunk {first_ms or 0:.1f} ms (client)")
    else:
        response = await stub.Synthesize(request, metadata=args.metadata)
        audio, sample_rate, timings = response.audio, response.sample_rate, response.timings
    total_ms = (time.perf_counter() - start) * MS_PER_S
    wav = np.frombuffer(audio, "<i2")
    sf.write(args.out, wav, sample_rate, subtype="PCM_16")
    print(f"wrote {args.out}: {wav.shape[0] / sample_rate:.2f} s at {sample_rate} Hz, total {total_ms:.1f} ms (client)")
    if timings is not None:
        _print_timings(timings)


def open_channel(args) -> grpc.aio.Channel:
    if not (args.tls or args.tls_ca):
        return grpc.aio.insecure_channel(args.addr)
    root = Path(args.tls_ca).read_bytes() if args.tls_ca else None     # None: the system's roots
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.aio.secure_channel(args.addr, grpc.ssl_channel_credentials(root_certificates=root), options=options)


async def main_async(args) -> int:
    async with open_channel(args) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        try:
            if args.command == "synth":
                await synth(stub, args)
            elif args.command == "register":
                r = await stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(
                    speaker_id=args.speaker, prompt_audio=Path(args.prompt_wav).read_bytes(),
                    prompt_text=args.prompt_text or "", replace=args.replace), metadata=args.metadata)
                print(f"registered {r.speaker.speaker_id}: {r.speaker.prompt_speech_tokens} tokens, "
                      f"{r.speaker.prompt_seconds:.2f} s")
            elif args.command == "list":
                for s in (await stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), metadata=args.metadata)).speakers:
                    print(f"{s.speaker_id}\t{s.prompt_speech_tokens} tokens\t{s.prompt_seconds:.2f} s\t{s.prompt_text}")
            elif args.command == "delete":
                r = await stub.DeleteSpeaker(tts_pb2.DeleteSpeakerRequest(speaker_id=args.speaker),
                                            metadata=args.metadata)
                print("deleted" if r.deleted else "not found")
        except grpc.aio.AioRpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="cosyvoice_gateway.cli")
    parser.add_argument("--addr", default="127.0.0.1:50051")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth")
    s.add_argument("--text", required=True)
    s.add_argument("--prompt-wav")
    s.add_argument("--prompt-text")
    s.add_argument("--speaker")
    s.add_argument("--instruct")
    s.add_argument("--stream", action="store_true")
    s.add_argument("--out", required=True)
    s.add_argument("--sample-rate", type=int, default=0)
    s.add_argument("--min-tokens", type=int, default=0)
    s.add_argument("--max-tokens", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("register")
    r.add_argument("--speaker", required=True)
    r.add_argument("--prompt-wav", required=True)
    r.add_argument("--prompt-text")
    r.add_argument("--replace", action="store_true", help="overwrite a speaker of that name")
    sub.add_parser("list")
    d = sub.add_parser("delete")
    d.add_argument("--speaker", required=True)
    tls_options = (("--tls", dict(action="store_true", help="TLS, trusting the system's root certificates")),
                   ("--tls-ca", dict(metavar="PEM", help="TLS, trusting this CA (or self-signed) certificate")),
                   ("--tls-server-name", dict(help="the host name the gateway's certificate is checked against")))
    for name, kwargs in tls_options:
        parser.add_argument(name, **kwargs, default=None if name != "--tls" else False)
    lst = sub.choices["list"]
    for p in (s, r, lst, d):   # --addr and the TLS options also accepted after the subcommand
        p.add_argument("--addr", default=argparse.SUPPRESS)
        for name, kwargs in tls_options:
            p.add_argument(name, **kwargs, default=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    key = os.environ.get(API_KEY_ENV, "").split(",")[0].strip()     # the gateway's key, when it has one
    args.metadata = (("authorization", f"Bearer {key}"),) if key else ()
    return args


def main(argv=None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
