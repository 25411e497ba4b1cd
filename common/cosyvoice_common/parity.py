"""Result type shared by every component's golden-parity cases (see tools/cosyvoice_tools/parity.py)."""
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class ParityResult:
    case: str            # e.g. "llm.tf_logp"
    max_abs_err: float   # for exact cases: number of mismatching elements
    tolerance: float
    exact: bool = False

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.tolerance and np.isfinite(self.max_abs_err)


def compare(case: str, got, want, atol: float) -> ParityResult:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return ParityResult(case, float("inf"), atol)
    return ParityResult(case, float(np.max(np.abs(got - want))) if got.size else 0.0, atol)


def compare_exact(case: str, got, want) -> ParityResult:
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return ParityResult(case, float("inf"), 0.0, exact=True)
    return ParityResult(case, float(np.sum(got != want)), 0.0, exact=True)
