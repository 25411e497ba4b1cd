"""Strict checkpoint checks shared by every `.pt` loader (llm, flow, hift) and the model download check."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cosyvoice_common.errors import CheckpointError


@dataclass(frozen=True, slots=True)
class KeyMismatch:
    """How a checkpoint's keys differ from a module's, in the module's key order (checkpoint order for extras)."""
    missing: list[str]
    unexpected: list[str]
    mis_shaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]   # (key, checkpoint shape, model shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mis_shaped)


def compare_keys(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]]) -> KeyMismatch:
    """Key -> shape of what the module expects vs what the checkpoint holds."""
    return KeyMismatch(
        missing=[k for k in expected if k not in actual],
        unexpected=[k for k in actual if k not in expected],
        mis_shaped=[(k, tuple(actual[k]), tuple(shape)) for k, shape in expected.items()
                    if k in actual and tuple(actual[k]) != tuple(shape)])


def check_state_dict(module, state: Mapping[str, object], what: str) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key of `state` for `module`."""
    diff = compare_keys({k: tuple(v.shape) for k, v in module.state_dict().items()},
                        {k: tuple(getattr(v, "shape", ())) for k, v in state.items()})
    if not diff:
        return
    parts = []
    if diff.missing:
        parts.append(f"missing keys {diff.missing}")
    if diff.unexpected:
        parts.append(f"unexpected keys {diff.unexpected}")
    if diff.mis_shaped:
        parts.append("shape mismatches " + str([f"{k}: checkpoint {got} vs model {want}"
                                                for k, got, want in diff.mis_shaped]))
    raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))
