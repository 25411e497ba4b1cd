"""The `cosyvoice` console command (installed into the venv by `make venv`) against the real stack: a voice
round-trips (add, list, say, rm), every way of giving text, formats by extension, --stream's first-chunk line,
the progress bar of a long text, --speed, and one clear line for each error."""
import io
import re
import subprocess
import sys
import uuid
from pathlib import Path

import av
import pytest
import soundfile as sf

from cosyvoice_common.constants import OUTPUT_SAMPLE_RATE_HZ
from cosyvoice_gateway.testing import free_port, prompt_wav_bytes

pytestmark = [pytest.mark.stack, pytest.mark.slow]
COMMAND = Path(sys.executable).parent / "cosyvoice"       # the console entry point of pyproject.toml
SHORT = "Hi there."                                        # the model's rule: a fraction of a second of audio


def cosyvoice(*args: str, server: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(COMMAND), *args, "--server", server], input=stdin, capture_output=True, text=True,
                          timeout=300, env={"PATH": str(COMMAND.parent), "HOME": "/tmp"})


@pytest.fixture(scope="module")
def server(stack) -> str:
    return stack.gateway_grpc_url


@pytest.fixture(scope="module")
def prompt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "prompt.wav"
    path.write_bytes(prompt_wav_bytes(seconds=2.0, seed=11))
    return path


@pytest.fixture(scope="module")
def voice(server, prompt) -> str:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    added = cosyvoice("voices", "add", name, "--prompt-wav", str(prompt), "--prompt-text", "Hello there.",
                      server=server)
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith(f"added voice {name}")
    return name


def _one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cosyvoice: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_the_command_is_installed_in_the_venv():
    assert COMMAND.is_file()
    helped = subprocess.run([str(COMMAND), "say", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--prompt-wav" in helped.stdout and "--stream" in helped.stdout


def test_a_voice_round_trips_add_list_say_rm(server, voice, tmp_path):
    assert voice in cosyvoice("voices", "list", server=server).stdout
    out = tmp_path / "hello.wav"
    said = cosyvoice("say", SHORT, "-o", str(out), "--voice", voice, "--seed", "5", server=server)
    assert said.returncode == 0, said.stderr
    assert f"wrote {out}" in said.stderr and "real-time factor" in said.stderr
    wav, rate = sf.read(out, dtype="float32")
    assert rate == OUTPUT_SAMPLE_RATE_HZ and wav.shape[0] > 0 and abs(wav).max() > 0
    removed = cosyvoice("voices", "rm", voice, server=server)
    assert removed.returncode == 0 and f"removed voice {voice}" in removed.stdout
    assert voice not in cosyvoice("voices", "list", server=server).stdout
    _one_error_line(cosyvoice("voices", "rm", voice, server=server), "not registered")
    _one_error_line(cosyvoice("say", SHORT, "-o", str(tmp_path / "x.wav"), "--voice", voice, server=server),
                    "not found", voice)


def test_text_from_stdin_and_a_file_and_formats_from_the_extension(server, prompt, tmp_path):
    (tmp_path / "text.txt").write_text(SHORT, encoding="utf-8")
    voice = ("--prompt-wav", str(prompt), "--prompt-text", "Hello there.")
    for args, stdin, name in ((("-",), SHORT, "a.mp3"), (("--text-file", str(tmp_path / "text.txt")), None, "b.aac"),
                              ((SHORT, "--format", "opus"), None, "c.audio")):
        out = tmp_path / name
        said = cosyvoice("say", *args, "-o", str(out), *voice, server=server, stdin=stdin)
        assert said.returncode == 0, said.stderr
        with av.open(str(out)) as container:
            assert sum(frame.samples for frame in container.decode(audio=0)) > 0


def test_stream_writes_as_it_arrives_and_prints_the_first_chunk_latency(server, prompt, tmp_path):
    out = tmp_path / "streamed.wav"
    said = cosyvoice("say", SHORT, "-o", str(out), "--prompt-wav", str(prompt), "--stream", "--seed", "3",
                     server=server)
    assert said.returncode == 0, said.stderr
    assert "first chunk after" in said.stderr and ", first chunk " in said.stderr
    info = sf.info(out)                          # the streamed WAV's header was given its real sizes at the end
    assert info.samplerate == OUTPUT_SAMPLE_RATE_HZ and info.frames * 2 + 44 == out.stat().st_size
    to_stdout = subprocess.run([str(COMMAND), "say", SHORT, "-o", "-", "--format", "pcm", "--stream", "--prompt-wav",
                                str(prompt), "--server", server], capture_output=True, timeout=300)
    assert to_stdout.returncode == 0 and len(to_stdout.stdout) > 0 and len(to_stdout.stdout) % 2 == 0


def test_a_long_text_shows_segments_done_of_total(server, prompt, tmp_path):
    sentence = "This sentence is here to make the text long enough to be split into several segments."
    said = cosyvoice("say", " ".join([sentence] * 6), "-o", str(tmp_path / "long.wav"), "--prompt-wav", str(prompt),
                     "--seed", "2", server=server)
    assert said.returncode == 0, said.stderr
    progress = re.findall(r"(\d+)/(\d+) \[[^]]*segment", said.stderr)      # tqdm: "2/3 [00:01<00:00, 1.5segment/s]"
    assert progress, said.stderr
    total = int(progress[-1][1])
    assert total >= 2 and progress[-1] == (str(total), str(total)), progress


def test_speed_is_synthesized_whole_at_the_stretched_length(server, prompt, tmp_path):
    lengths = {}
    for speed in ("1", "2"):
        out = tmp_path / f"speed{speed}.wav"
        said = cosyvoice("say", SHORT, "-o", str(out), "--prompt-wav", str(prompt), "--seed", "9", "--speed", speed,
                         server=server)
        assert said.returncode == 0, said.stderr
        lengths[speed] = sf.info(out).frames
    # same seed, same tokens; speed 2 halves the mel frames (streaming and offline give the same token count)
    assert abs(lengths["2"] - lengths["1"] / 2) <= 480, lengths


def test_errors_are_one_clear_line(server, prompt, tmp_path):
    out = str(tmp_path / "never.wav")
    _one_error_line(cosyvoice("voices", "list", server=f"127.0.0.1:{free_port()}"), "cannot reach the gateway")
    _one_error_line(cosyvoice("say", SHORT, "-o", out, "--prompt-wav", str(tmp_path / "missing.wav"), server=server),
                    "cannot read the prompt file", "missing.wav")
    (tmp_path / "not-audio.wav").write_bytes(b"this is not audio" * 100)
    _one_error_line(cosyvoice("say", SHORT, "-o", out, "--prompt-wav", str(tmp_path / "not-audio.wav"), server=server),
                    "invalid argument")
    _one_error_line(cosyvoice("say", SHORT, "-o", out, server=server), "--voice NAME")
    _one_error_line(cosyvoice("say", "   ", "-o", out, "--prompt-wav", str(prompt), server=server), "no text")
    _one_error_line(cosyvoice("say", SHORT, "-o", str(tmp_path / "x.flac"), "--stream", "--prompt-wav", str(prompt),
                              server=server), "flac is written whole")
    _one_error_line(cosyvoice("say", SHORT, "-o", out, "--prompt-wav", str(prompt), "--speed", "3", server=server),
                    "speed 3", "[0.5, 2.0]")
    _one_error_line(cosyvoice("say", SHORT, "-o", str(tmp_path / "x.opus"), "--sample-rate", "44100", "--prompt-wav",
                              str(prompt), server=server), "opus cannot be encoded at 44100 Hz")
    assert not Path(out).exists()                # a failed request leaves no file behind


def test_pcm_written_whole_matches_the_wav(server, prompt, tmp_path):
    """The same seeded request as raw PCM and as WAV: identical samples (one encoder, two containers)."""
    pcm, wav = tmp_path / "same.pcm", tmp_path / "same.wav"
    for out in (pcm, wav):
        said = cosyvoice("say", SHORT, "-o", str(out), "--prompt-wav", str(prompt), "--seed", "4", server=server)
        assert said.returncode == 0, said.stderr
    samples, _ = sf.read(io.BytesIO(wav.read_bytes()), dtype="int16")
    assert pcm.read_bytes() == samples.tobytes()
