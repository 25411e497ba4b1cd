"""The golden set in the repository (golden/tiny-seed1) becomes the reference run's set byte for byte: `make golden`
(tools/fetch_golden.sh) regenerates what the repository leaves out and checks every file against SHA256SUMS."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "golden" / "tiny-seed1"


def _fetch(source: Path, dest: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "tools" / "fetch_golden.sh"), str(source), str(dest)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)


def _sums(folder: Path) -> dict[str, str]:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in lines if line.strip())}


def test_the_repository_set_becomes_the_reference_set_byte_for_byte(tmp_path):
    sums = _sums(SOURCE)
    assert {name for name in sums if not (SOURCE / name).is_file()} == {"rand_noise.npy"}   # regenerated exactly
    done = _fetch(SOURCE, tmp_path / "set")
    assert done.returncode == 0, done.stderr
    for name, digest in sums.items():
        assert hashlib.sha256((tmp_path / "set" / name).read_bytes()).hexdigest() == digest, name


def test_a_file_that_differs_from_its_sum_stops_it(tmp_path):
    source = tmp_path / "edited"
    shutil.copytree(SOURCE, source)
    notes = source / "notes.json"
    notes.write_bytes(notes.read_bytes().replace(b'"sdpa"', b'"eager"'))
    done = _fetch(source, tmp_path / "set")
    assert done.returncode != 0 and "fails its SHA256SUMS" in done.stderr
    assert not (tmp_path / "set").exists()
