"""`cosyvoice`: the command-line client of the CosyVoice2 gateway (gRPC).

    cosyvoice say "Hello there." -o hello.wav --voice alice
    cosyvoice say - -o story.mp3 --prompt-wav me.wav --prompt-text "What I say in it." < story.txt
    cosyvoice say --text-file story.txt -o story.opus --voice alice --stream      # written as it arrives
    cosyvoice voices list | add NAME --prompt-wav F --prompt-text T | rm NAME

The format follows the output's extension unless --format names one (wav, pcm, flac, mp3, opus, aac); `-o -`
writes to standard output. Audio always streams from the gateway: a long text (split into sentences) shows a
progress bar of segments, and --stream also writes each chunk as it arrives and prints the first chunk's latency.
A --speed other than 1 is synthesized whole (the stretch needs the whole utterance). The gateway's address is
--server, else COSYVOICE_SERVER, else 127.0.0.1:50051. From the environment the gateway itself reads: the first
key of COSYVOICE_API_KEY is sent, and TLS_CERT_FILE (a self-signed certificate or a private CA) turns TLS on and
is trusted; --tls trusts the system's roots instead. Errors are one line on stderr, exit status 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import BinaryIO

import grpc
import numpy as np
from cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from cosyvoice_common.audio import wav_header
from cosyvoice_common.constants import OUTPUT_SAMPLE_RATE_HZ, SPEED_NEUTRAL
from cosyvoice_common.stages import GATEWAY_GRPC_PORT, STAGE_NAMES

from cosyvoice_gateway.auth import API_KEY_ENV
from cosyvoice_gateway.encoding import StreamEncoder, check_rate, encode_whole

PROG = "cosyvoice"
SERVER_ENV = "COSYVOICE_SERVER"
TLS_CERT_ENV = "TLS_CERT_FILE"           # the gateway's own certificate setting, trusted by the client
DEFAULT_SERVER = f"127.0.0.1:{GATEWAY_GRPC_PORT}"
MS_PER_S = 1000.0
# --format -> the encoding StreamEncoder/encode_whole write; flac cannot be written chunk by chunk.
FORMATS = {"wav": "wav", "pcm": "pcm_s16le", "flac": "flac", "mp3": "mp3", "opus": "opus", "aac": "aac"}
STREAMABLE = ("wav", "pcm", "mp3", "opus", "aac")
STDOUT = "-"
PCM16_BYTES = 2


class CliError(Exception):
    """A failure the user can act on: printed as one line."""


# --- connection ------------------------------------------------------------------------------------------
def open_channel(args) -> grpc.Channel:
    ca_file = args.tls_ca or os.environ.get(TLS_CERT_ENV, "")
    if not (args.tls or ca_file):
        return grpc.insecure_channel(args.server)
    try:
        root = Path(ca_file).read_bytes() if ca_file else None     # None: the system's roots
    except OSError as exc:
        raise CliError(f"cannot read the TLS certificate {ca_file}: {exc.strerror}") from exc
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.server, grpc.ssl_channel_credentials(root_certificates=root), options=options)


def _metadata() -> tuple[tuple[str, str], ...]:
    key = os.environ.get(API_KEY_ENV, "").split(",")[0].strip()     # the gateway's key, when it has one
    return (("authorization", f"Bearer {key}"),) if key else ()


def rpc_error_line(exc: grpc.RpcError, server: str) -> str:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return (f"cannot reach the gateway at {server} ({details.splitlines()[0] if details else 'unavailable'}); "
                f"is it running (`make up`)? Set --server or {SERVER_ENV}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"the gateway refused the API key: set {API_KEY_ENV} to one of its keys"
    return f"{code.name.lower().replace('_', ' ')}: {details}"


# --- say ---------------------------------------------------------------------------------------------------
def read_text(args) -> str:
    if args.text_file:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read --text-file {args.text_file}: {exc}") from exc
    elif args.text == "-":
        text = sys.stdin.read()
    else:
        text = args.text or ""
    if not text.strip():
        raise CliError("no text: give TEXT, `-` to read standard input, or --text-file FILE")
    return text


def read_prompt(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the prompt file {path}: {exc.strerror}") from exc


def output_format(args) -> str:
    if args.format:
        return args.format
    suffix = Path(args.output).suffix.lower().lstrip(".") if args.output != STDOUT else ""
    return suffix if suffix in FORMATS else "wav"


def build_request(args, text: str) -> tts_pb2.SynthesizeRequest:
    if bool(args.voice) == bool(args.prompt_wav):
        raise CliError("give a voice: --voice NAME (see `cosyvoice voices list`) or --prompt-wav FILE")
    return tts_pb2.SynthesizeRequest(
        text=text, speaker_id=args.voice or "", prompt_audio=read_prompt(args.prompt_wav) if args.prompt_wav else b"",
        prompt_text=args.prompt_text or "", instruct=args.instruct or "", encoding=tts_pb2.FLOAT32,
        sampling=tts_pb2.SamplingParams(seed=args.seed), speed=args.speed, text_frontend=not args.no_text_frontend)


class Output:
    """Where the audio goes: a file (opened on the first bytes, so a failed request leaves none) or stdout."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def write(self, data: bytes) -> None:
        if self._file is None:
            try:
                self._file = sys.stdout.buffer if self.path == STDOUT else open(self.path, "wb")   # noqa: SIM115
            except OSError as exc:
                raise CliError(f"cannot write {self.path}: {exc.strerror}") from exc
        self._file.write(data)
        self._file.flush()

    def finish_wav(self, sample_rate_hz: int, samples: int) -> None:
        """A streamed WAV file gets its real sizes (a pipe keeps the header of unknown length)."""
        if self._file is not None and self.path != STDOUT:
            self._file.seek(0)
            self._file.write(wav_header(sample_rate_hz, samples))

    def close(self) -> None:
        if self._file is not None and self.path != STDOUT:
            self._file.close()


def say(stub, args) -> None:
    fmt = output_format(args)
    sample_rate_hz = args.sample_rate or OUTPUT_SAMPLE_RATE_HZ
    request = build_request(args, read_text(args))
    if args.stream and fmt not in STREAMABLE:
        raise CliError(f"{fmt} is written whole: drop --stream or use one of {', '.join(STREAMABLE)}")
    if args.output == STDOUT and fmt == "flac":
        raise CliError("flac needs a file (-o FILE.flac); standard output takes wav, pcm, mp3, opus or aac")
    check_rate(FORMATS[fmt], sample_rate_hz)         # before any synthesis: a pair the encoder cannot write
    out = Output(args.output)
    start = time.perf_counter()
    try:
        if args.speed != SPEED_NEUTRAL:
            if args.stream:
                print(f"{PROG}: speed {args.speed:g} is applied to the whole utterance: written when done",
                      file=sys.stderr)
            response = stub.Synthesize(request, metadata=_metadata())
            out.write(encode_whole(np.frombuffer(response.audio, "<f4"), sample_rate_hz, FORMATS[fmt]))
            timings, first_ms = response.timings, None
        else:
            timings, first_ms = _say_streaming(stub, request, args, fmt, sample_rate_hz, out, start)
    finally:
        out.close()
    total_ms = (time.perf_counter() - start) * MS_PER_S
    where = "standard output" if args.output == STDOUT else args.output
    first = f", first chunk {first_ms:.0f} ms" if first_ms is not None else ""
    rtf = total_ms / MS_PER_S / timings.audio_seconds if timings.audio_seconds else float("nan")
    print(f"wrote {where}: {timings.audio_seconds:.2f} s of {fmt} at {sample_rate_hz} Hz{first}, total "
          f"{total_ms:.0f} ms, real-time factor {rtf:.3f}", file=sys.stderr)
    if args.verbose:
        for stage in STAGE_NAMES:
            s = getattr(timings, stage)
            print(f"  {stage:<9} queue {s.queue_ms:8.1f} ms  compute {s.compute_ms:8.1f} ms  calls {s.calls}",
                  file=sys.stderr)
        print(f"  cache_hit {timings.cache_hit}  speech_tokens {timings.speech_tokens}", file=sys.stderr)


def _say_streaming(stub, request, args, fmt: str, sample_rate_hz: int, out: Output, start: float):
    """SynthesizeStream: progress per text segment; with --stream each chunk is encoded and written at once."""
    from tqdm import tqdm

    encoder = StreamEncoder(sample_rate_hz, FORMATS[fmt]) if args.stream else None
    pieces: list[np.ndarray] = []
    first_ms, timings, written_bytes, bar = None, None, 0, None
    try:
        for chunk in stub.SynthesizeStream(request, metadata=_metadata()):
            wav = np.frombuffer(chunk.audio, "<f4")
            if first_ms is None and wav.size:
                first_ms = (time.perf_counter() - start) * MS_PER_S
                if args.stream:
                    print(f"first chunk after {first_ms:.0f} ms", file=sys.stderr)
            if bar is None and chunk.segments > 1:      # a long text: show segments done of total
                bar = tqdm(total=chunk.segments, unit="segment", desc=PROG, file=sys.stderr, leave=False)
            if bar is not None:
                bar.update(chunk.segment + int(chunk.is_final) - bar.n)
            if encoder is not None:
                data = encoder.encode(wav, last=chunk.is_final)
                written_bytes += len(data)
                if data:
                    out.write(data)
            else:
                pieces.append(wav)
            if chunk.is_final:
                timings = chunk.timings
    finally:
        if bar is not None:
            bar.close()
    if encoder is None:
        out.write(encode_whole(np.concatenate(pieces) if pieces else np.zeros(0, np.float32), sample_rate_hz,
                               FORMATS[fmt]))
    elif fmt == "wav":
        out.finish_wav(sample_rate_hz, (written_bytes - len(wav_header(sample_rate_hz, None))) // PCM16_BYTES)
    return timings, first_ms


# --- voices ------------------------------------------------------------------------------------------------
def voices(stub, args) -> None:
    if args.action == "list":
        speakers = stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), metadata=_metadata()).speakers
        if not speakers:
            print("no voices registered: cosyvoice voices add NAME --prompt-wav FILE --prompt-text TEXT")
        for s in speakers:
            print(f"{s.speaker_id}\t{s.prompt_seconds:.1f} s\t{s.prompt_text}")
    elif args.action == "add":
        reply = stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(
            speaker_id=args.name, prompt_audio=read_prompt(args.prompt_wav), prompt_text=args.prompt_text or "",
            replace=args.replace), metadata=_metadata())
        print(f"added voice {reply.speaker.speaker_id} ({reply.speaker.prompt_seconds:.1f} s prompt)")
    else:
        reply = stub.DeleteSpeaker(tts_pb2.DeleteSpeakerRequest(speaker_id=args.name), metadata=_metadata())
        if not reply.deleted:
            raise CliError(f"voice {args.name!r} is not registered (cosyvoice voices list)")
        print(f"removed voice {args.name}")


# --- arguments ---------------------------------------------------------------------------------------------
def _positive_speed(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"speed must be positive, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    connection = common.add_argument_group("connection")
    connection.add_argument("--server", default=argparse.SUPPRESS,
                            help=f"gateway gRPC address (default: ${SERVER_ENV} or {DEFAULT_SERVER})")
    connection.add_argument("--tls", action="store_true", default=argparse.SUPPRESS,
                            help="TLS, trusting the system's root certificates")
    connection.add_argument("--tls-ca", metavar="PEM", default=argparse.SUPPRESS,
                            help=f"TLS, trusting this CA or self-signed certificate (default: ${TLS_CERT_ENV})")
    connection.add_argument("--tls-server-name", default=argparse.SUPPRESS,
                            help="the host name the gateway's certificate is checked against")
    parser = argparse.ArgumentParser(prog=PROG, parents=[common], description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     epilog="`cosyvoice say -h`, `cosyvoice voices -h` for each command")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("say", parents=[common], help="synthesize text into an audio file")
    s.add_argument("text", nargs="?", metavar="TEXT", help="the text; `-` reads standard input")
    s.add_argument("--text-file", metavar="FILE", help="read the text from FILE (UTF-8)")
    s.add_argument("-o", "--output", required=True, metavar="FILE", help="audio file to write; `-` = stdout")
    s.add_argument("--voice", metavar="NAME", help="a registered voice (cosyvoice voices list)")
    s.add_argument("--prompt-wav", metavar="FILE", help="clone the voice of this recording (3-30 s)")
    s.add_argument("--prompt-text", metavar="TEXT", help="what the prompt recording says (empty: cross-lingual)")
    s.add_argument("--instruct", metavar="TEXT", help="instruct2 mode, e.g. 'speak happily'")
    s.add_argument("--format", choices=tuple(FORMATS), help="audio format (default: the output's extension, "
                   "else wav)")
    s.add_argument("--speed", type=_positive_speed, default=SPEED_NEUTRAL, help="0.5 to 2.0 (default 1)")
    s.add_argument("--stream", action="store_true", help="write each chunk as it arrives; print the first "
                   "chunk's latency")
    s.add_argument("--sample-rate", type=int, default=0, metavar="HZ", help="8000/16000/22050/24000/44100/48000")
    s.add_argument("--seed", type=int, default=0, help="0 = random; else the same audio every time")
    s.add_argument("--no-text-frontend", action="store_true", help="speak the text as given (no normalisation "
                   "or sentence splitting)")
    s.add_argument("-v", "--verbose", action="store_true", help="print each stage's queue and compute time")
    v = sub.add_parser("voices", parents=[common], help="list, add or remove registered voices")
    actions = v.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[common], help="the registered voices")
    add = actions.add_parser("add", parents=[common], help="register a voice from a recording")
    add.add_argument("name")
    add.add_argument("--prompt-wav", required=True, metavar="FILE")
    add.add_argument("--prompt-text", metavar="TEXT", help="what the recording says")
    add.add_argument("--replace", action="store_true", help="overwrite a voice of that name")
    rm = actions.add_parser("rm", parents=[common], help="remove a registered voice")
    rm.add_argument("name")
    args = parser.parse_args(argv)
    defaults = {"server": os.environ.get(SERVER_ENV) or DEFAULT_SERVER, "tls": False, "tls_ca": None,
                "tls_server_name": None}
    for name, value in defaults.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    if args.command == "say" and args.text and args.text_file:
        parser.error("give TEXT or --text-file, not both")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with open_channel(args) as channel:
            stub = tts_pb2_grpc.TextToSpeechStub(channel)
            (say if args.command == "say" else voices)(stub, args)
    except grpc.RpcError as exc:
        print(f"{PROG}: {rpc_error_line(exc, args.server)}", file=sys.stderr)
        return 1
    except (CliError, ValueError) as exc:      # ValueError: a format/rate pair the encoder refuses
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
