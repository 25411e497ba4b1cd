"""Where the golden set (inputs and outputs of the reference implementation on a tiny random checkpoint) is.

One answer for every parity test and tool: $COSYVOICE_GOLDEN_DIR, else the copy `make golden` puts in the
checkout (data/golden/tiny-seed1), else the project's shared folder beside the checkout (../shared/golden/...).
"""
from __future__ import annotations

import os
from pathlib import Path

GOLDEN_ENV = "COSYVOICE_GOLDEN_DIR"
GOLDEN_SET = "tiny-seed1"
_CHECKOUT = Path(__file__).resolve().parents[2]      # common/cosyvoice_common/golden.py -> the checkout
CANDIDATES = (_CHECKOUT / "data" / "golden" / GOLDEN_SET, _CHECKOUT.parent / "shared" / "golden" / GOLDEN_SET)
MISSING_HINT = f"golden set not found: run `make golden` (GOLDEN_SOURCE=<dir or .tar.gz URL>) or set {GOLDEN_ENV}"


def golden_dir() -> Path:
    """The golden directory to use (it may not exist: callers check and skip with MISSING_HINT)."""
    if os.environ.get(GOLDEN_ENV):
        return Path(os.environ[GOLDEN_ENV])
    return next((p for p in CANDIDATES if (p / "config.json").is_file()), CANDIDATES[0])
