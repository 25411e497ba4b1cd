"""Golden parity runner (`make parity`).

    python -m cosyvoice_tools.parity --golden DIR [--module NAME ...]

Runs `cases(golden_dir) -> list[ParityResult]` of every component's parity module, prints one line per case

    PASS|FAIL <case> max_abs_err=<e> tol=<t>

then `parity: N passed, M failed`, and exits 1 if anything failed. A module that fails to import or raises is
reported as one failing case named `<module>` with the exception text (no traceback unless --traceback), so a
broken stage never hides the others. Works on any golden directory of the tiny-seed1 format.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

from cosyvoice_common.parity import ParityResult

# Every component's parity module, cheapest first.
CASE_MODULES = (
    "cosyvoice_tokenizer.parity",
    "cosyvoice_speaker.parity",
    "cosyvoice_llm.parity",
    "cosyvoice_token2wav.parity_flow",
    "cosyvoice_token2wav.parity",
)
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
ERROR_TEXT_MAX_CHARS = 400     # one readable line per broken module


@dataclass(frozen=True, slots=True)
class ModuleRun:
    module: str
    results: tuple[ParityResult, ...]
    seconds: float


def _error_case(name: str, exc: BaseException) -> ParityResult:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())[:ERROR_TEXT_MAX_CHARS]
    return ParityResult(f"{name} [error: {text}]", math.inf, 0.0)


def run_module(module: str, golden_dir: Path, show_traceback: bool = False,
               importer: Callable[[str], object] = importlib.import_module) -> ModuleRun:
    """All cases of one module; an import error, an exception or a malformed return becomes one failing case."""
    start = time.perf_counter()
    try:
        results = list(importer(module).cases(golden_dir))
        bad = [r for r in results if not isinstance(r, ParityResult)]
        if bad:
            raise TypeError(f"cases() returned {type(bad[0]).__name__}, expected ParityResult")
        if not results:
            raise ValueError("cases() returned no cases")
    except Exception as exc:  # noqa: BLE001 - any failure of a stage is reported, never fatal to the run
        if show_traceback:
            traceback.print_exc(file=sys.stderr)
        results = [_error_case(module, exc)]
    return ModuleRun(module, tuple(results), time.perf_counter() - start)


def format_case(r: ParityResult) -> str:
    return f"{'PASS' if r.passed else 'FAIL'} {r.case} max_abs_err={r.max_abs_err:.3g} tol={r.tolerance:.3g}"


def run(golden_dir: Path, modules: Sequence[str] = CASE_MODULES, out: TextIO = sys.stdout,
        show_traceback: bool = False,
        importer: Callable[[str], object] = importlib.import_module) -> tuple[int, int]:
    """Runs and prints every case; returns (passed, failed)."""
    passed = failed = 0
    for module in modules:
        run_ = run_module(module, golden_dir, show_traceback, importer)
        for r in run_.results:
            print(format_case(r), file=out, flush=True)
            if r.passed:
                passed += 1
            else:
                failed += 1
    print(f"parity: {passed} passed, {failed} failed", file=out, flush=True)
    return passed, failed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cosyvoice_tools.parity", description=__doc__.split("\n")[0])
    ap.add_argument("--golden", required=True, type=Path, help="golden directory (tiny-seed1 format)")
    ap.add_argument("--module", action="append", dest="modules", metavar="NAME",
                    help=f"run only this case module (repeatable; default all: {', '.join(CASE_MODULES)})")
    ap.add_argument("--traceback", action="store_true", help="also print tracebacks of failing modules")
    args = ap.parse_args(argv)
    if not (args.golden / "config.json").is_file():
        print(f"parity: {args.golden} is not a golden directory (no config.json)", file=sys.stderr)
        return EXIT_USAGE
    _, failed = run(args.golden, args.modules or CASE_MODULES, show_traceback=args.traceback)
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
