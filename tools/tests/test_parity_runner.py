"""Parity runner: output format, exit codes, a perturbed golden array fails, a broken module is a failing case."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cosyvoice_common.golden import golden_dir
from cosyvoice_common.parity import ParityResult
from cosyvoice_tools import parity

REPO = Path(__file__).resolve().parents[2]
GOLDEN = golden_dir()
needs_golden = pytest.mark.skipif(not (GOLDEN / "frontend.npz").is_file(), reason=f"no golden set at {GOLDEN}")
FAST_MODULE = "cosyvoice_tokenizer.parity"      # frontend.npz only, ~0.1 s
PERTURBED_ARRAY = "whisper_logmel128"
PERTURBATION = 0.5                               # far above its 2e-4 tolerance


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosyvoice_tools.parity", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)


def _golden_copy_with_perturbed_array(dst: Path) -> Path:
    """A golden dir of symlinks, except frontend.npz: a copy with one array shifted."""
    dst.mkdir()
    for src in GOLDEN.iterdir():
        if src.name != "frontend.npz":
            (dst / src.name).symlink_to(src)
    z = dict(np.load(GOLDEN / "frontend.npz"))
    z[PERTURBED_ARRAY] = z[PERTURBED_ARRAY] + np.float32(PERTURBATION)
    np.savez(dst / "frontend.npz", **z)
    return dst


@needs_golden
def test_passing_module_prints_pass_lines_and_exits_zero():
    proc = _cli("--golden", str(GOLDEN), "--module", FAST_MODULE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"parity: {len(lines) - 1} passed, 0 failed"
    assert all(line.startswith("PASS frontend.") and " max_abs_err=" in line and " tol=" in line
               for line in lines[:-1]), lines


@needs_golden
def test_perturbed_golden_array_fails_with_nonzero_exit(tmp_path):
    golden = _golden_copy_with_perturbed_array(tmp_path / "golden")
    proc = _cli("--golden", str(golden), "--module", FAST_MODULE)
    assert proc.returncode == 1
    fail = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and f"frontend.{PERTURBED_ARRAY} " in fail[0], proc.stdout
    err = float(fail[0].split("max_abs_err=")[1].split()[0])
    assert err == pytest.approx(PERTURBATION, rel=1e-3)
    assert proc.stdout.strip().endswith("parity: 1 passed, 1 failed")


@needs_golden
def test_unimportable_module_is_a_failing_case_not_a_traceback():
    proc = _cli("--golden", str(GOLDEN), "--module", "cosyvoice_nonexistent.parity", "--module", FAST_MODULE)
    assert proc.returncode == 1
    first = proc.stdout.splitlines()[0]
    assert first.startswith("FAIL cosyvoice_nonexistent.parity [error: ModuleNotFoundError")
    assert "max_abs_err=inf" in first
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("parity: 2 passed, 1 failed")    # the other module still ran


def test_not_a_golden_dir_is_a_usage_error(tmp_path):
    assert parity.main(["--golden", str(tmp_path)]) == parity.EXIT_USAGE


def test_raising_or_malformed_cases_become_failing_cases(tmp_path):
    def boom(_golden):
        raise RuntimeError("estimator exploded\nsecond line")

    fake = {"raises": SimpleNamespace(cases=boom),
            "malformed": SimpleNamespace(cases=lambda g: [("x", 0.0)]),
            "empty": SimpleNamespace(cases=lambda g: []),
            "good": SimpleNamespace(cases=lambda g: [ParityResult("good.case", 1e-6, 1e-4),
                                                     ParityResult("good.nan", float("nan"), 1e-4)])}
    runs = {name: parity.run_module(name, tmp_path, importer=fake.__getitem__) for name in fake}
    (raised,) = runs["raises"].results
    assert not raised.passed and raised.case == "raises [error: RuntimeError: estimator exploded second line]"
    assert not runs["malformed"].results[0].passed and "TypeError" in runs["malformed"].results[0].case
    assert not runs["empty"].results[0].passed
    good, nan = runs["good"].results
    assert good.passed and not nan.passed                     # NaN never passes
    assert parity.format_case(good) == "PASS good.case max_abs_err=1e-06 tol=0.0001"


def test_summary_counts(tmp_path):
    fake = {"m": SimpleNamespace(cases=lambda g: [ParityResult("a", 0.0, 0.0, exact=True),
                                                  ParityResult("b", 3.0, 0.0, exact=True)])}
    out = io.StringIO()
    assert parity.run(tmp_path, ["m"], out=out, importer=fake.__getitem__) == (1, 1)
    assert out.getvalue().splitlines() == ["PASS a max_abs_err=0 tol=0", "FAIL b max_abs_err=3 tol=0",
                                           "parity: 1 passed, 1 failed"]
