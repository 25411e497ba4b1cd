"""`python -m cosyvoice_tools.download` / `make download`: fetch the released CosyVoice2-0.5B and verify it.

    python -m cosyvoice_tools.download --model-dir models/cosyvoice2-0.5b            # download + verify
    python -m cosyvoice_tools.download --model-dir DIR --verify-only                 # just verify

Download: Hugging Face `huggingface_hub.snapshot_download` (FunAudioLLM/CosyVoice2-0.5B) with its progress
bars, or ModelScope (iic/CosyVoice2-0.5B) when `--source modelscope` (or `auto` and the Hub fails) and the
`modelscope` package is installed. HF_ENDPOINT / HF_TOKEN are honoured by huggingface_hub itself.

Verification (what our loaders will need, without loading 2.5 GB into memory):
  * every file of spec 1.1 that we read is present and non-empty, none is a Git LFS pointer;
  * a checkpoint without the generator's marker (a real download) is within SIZE_TOLERANCE of the
    released size (a partial or foreign file shows up here first);
  * llm/flow/hift state dicts opened with `torch.load(mmap=True, weights_only=True)` (no tensor data
    read), their keys and shapes compared with the modules our loaders build on the meta device from
    the directory's own cosyvoice2.yaml + CosyVoice-BlankEN/config.json (hift: legacy weight-norm and
    `generator.` spellings accepted, as the loader does);
  * ONNX graph input/output names the tokenizer and speaker stages feed.
Any failure prints one `download: error: ...` line per problem and exits non-zero, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosyvoice_common.stages import RELEASED_MODEL_DIR

HF_REPO_ID = "FunAudioLLM/CosyVoice2-0.5B"
MODELSCOPE_REPO_ID = "iic/CosyVoice2-0.5B"
SOURCES = ("auto", "hf", "modelscope")
EXIT_VERIFY_FAILED = 1
EXIT_DOWNLOAD_FAILED = 2
GENERATED_MARKER = "GENERATED.json"          # written by cosyvoice_tools.modelgen (random weights)
LFS_POINTER_PREFIX = b"version https://git-lfs"

QWEN2_DIR = "CosyVoice-BlankEN"
REQUIRED_FILES = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx",
                  f"{QWEN2_DIR}/config.json", f"{QWEN2_DIR}/tokenizer_config.json", f"{QWEN2_DIR}/vocab.json",
                  f"{QWEN2_DIR}/merges.txt")
# Sizes of the current released revision (spec 1.1); a real download should match within SIZE_TOLERANCE.
RELEASED_SIZES_BYTES = {
    "llm.pt": 2_023_316_821,
    "flow.pt": 450_575_567,
    "hift.pt": 83_390_254,
    "campplus.onnx": 28_303_423,
    "speech_tokenizer_v2.onnx": 496_082_973,
}
SIZE_TOLERANCE = 0.05
# ONNX I/O the stages feed (released graphs; the generator's stand-ins use the same names).
ONNX_IO_NAMES = {
    "campplus.onnx": (("input",), ("embedding",)),
    "speech_tokenizer_v2.onnx": (("feats", "feats_length"), ("indices",)),
}
_MAX_LISTED_KEYS = 5


class VerifyError(Exception):
    """The model directory is not usable; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(slots=True)
class VerifyReport:
    model_dir: Path
    generated: bool                         # random weights from modelgen (sizes are not the release's)
    keys: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# --- download ---------------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def download_hf(model_dir: Path, repo_id: str = HF_REPO_ID, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=repo_id, revision=revision, local_dir=str(model_dir)))


def download_modelscope(model_dir: Path, repo_id: str = MODELSCOPE_REPO_ID, revision: str | None = None) -> Path:
    from modelscope import snapshot_download

    kwargs = {"revision": revision} if revision else {}
    return Path(snapshot_download(repo_id, local_dir=str(model_dir), **kwargs))


def modelscope_available() -> bool:
    try:
        import modelscope  # noqa: F401
    except ImportError:
        return False
    return True


def download(model_dir: Path, source: str = "auto", revision: str | None = None) -> Path:
    """Fetch the release into `model_dir`; raises RuntimeError with one readable line when no source works."""
    if source == "modelscope" and not modelscope_available():
        raise RuntimeError("--source modelscope needs the `modelscope` package (pip install modelscope)")
    attempts: list[tuple[str, Any]] = []
    if source in ("auto", "hf"):
        attempts.append((f"Hugging Face {HF_REPO_ID} ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')})",
                         download_hf))
    if source == "modelscope" or (source == "auto" and modelscope_available()):
        attempts.append((f"ModelScope {MODELSCOPE_REPO_ID}", download_modelscope))
    failures = []
    for name, fetch in attempts:
        print(f"download: fetching {name} into {model_dir}", file=sys.stderr)
        try:
            return fetch(model_dir, revision=revision)
        except KeyboardInterrupt:
            raise
        except Exception as exc:   # network, auth, disk: each library raises its own types; report, try the next
            failures.append(f"{name}: {_one_line(exc)}")
    raise RuntimeError("cannot download the model: " + " | ".join(failures) +
                       " (offline? set HF_ENDPOINT/HF_TOKEN, install modelscope, or copy the files into the "
                       "model dir and run with --verify-only)")


# --- verification -----------------------------------------------------------------------------------------------
def _listed(keys: list[str]) -> str:
    head = ", ".join(keys[:_MAX_LISTED_KEYS])
    return head + (f" (+{len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else "")


def compare_shapes(what: str, expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]]
                   ) -> list[str]:
    """Problems (one line each) between the shapes a module expects and a checkpoint's."""
    from cosyvoice_common.checkpoint import compare_keys

    diff = compare_keys(expected, actual)
    mis_shaped = [f"{k} is {list(got)}, expected {list(want)}" for k, got, want in diff.mis_shaped]
    problems = []
    if diff.missing:
        problems.append(f"{what}: {len(diff.missing)} missing keys: {_listed(diff.missing)}")
    if diff.unexpected:
        problems.append(f"{what}: {len(diff.unexpected)} unexpected keys: {_listed(diff.unexpected)}")
    if mis_shaped:
        problems.append(f"{what}: {len(mis_shaped)} shape mismatches: {_listed(mis_shaped)}")
    return problems


def expected_shapes(cfg: Mapping[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Key -> shape of each checkpoint, from the modules our loaders build (on the meta device: no memory)."""
    import torch
    from cosyvoice_common.modelconfig import qwen2_config_of
    from cosyvoice_llm.model import Qwen2LM
    from cosyvoice_token2wav.flow.flow import build_flow
    from cosyvoice_token2wav.hift import HiFTGenerator

    with torch.device("meta"):
        llm = Qwen2LM.from_config(cfg["llm"], qwen2_config_of(cfg))
        hift = HiFTGenerator.from_config(cfg["hift"])
    flow = build_flow(cfg["flow"])
    return {name: {k: tuple(v.shape) for k, v in module.state_dict().items()}
            for name, module in (("llm.pt", llm), ("flow.pt", flow), ("hift.pt", hift))}


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a state-dict file, memory-mapped (no tensor data is read)."""
    import torch

    state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"holds a {type(state).__name__}, expected a state dict")
    if path.name == "hift.pt":
        from cosyvoice_token2wav.hift import normalize_hift_keys

        state = normalize_hift_keys(state)
    return {k: tuple(v.shape) for k, v in state.items()}


def _onnx_problems(path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    got_in = tuple(i.name for i in model.graph.input if i.name not in initializers)
    got_out = tuple(o.name for o in model.graph.output)
    problems = []
    if got_in[:len(inputs)] != inputs:
        problems.append(f"{path.name}: graph inputs {list(got_in)}, expected {list(inputs)}")
    if got_out[:len(outputs)] != outputs:
        problems.append(f"{path.name}: graph outputs {list(got_out)}, expected {list(outputs)}")
    return problems


def _file_problems(model_dir: Path, generated: bool) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    for name in REQUIRED_FILES:
        path = model_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size == 0:
            problems.append(f"{name}: empty file")
            continue
        with path.open("rb") as f:
            if f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
                problems.append(f"{name}: a Git LFS pointer ({size} bytes), not the file: run `git lfs pull`")
                continue
        released = RELEASED_SIZES_BYTES.get(name)
        if released and not generated and abs(size - released) > SIZE_TOLERANCE * released:
            problems.append(f"{name}: {size:,} bytes, the release has {released:,}: incomplete or foreign file")
    return problems, warnings


def verify_model_dir(model_dir: str | Path) -> VerifyReport:
    """Check a model directory against what our loaders expect; every problem is collected, nothing raises."""
    model_dir = Path(model_dir)
    report = VerifyReport(model_dir, generated=(model_dir / GENERATED_MARKER).is_file())
    if not model_dir.is_dir():
        report.problems.append(f"{model_dir}: not a directory")
        return report
    report.problems, report.warnings = _file_problems(model_dir, report.generated)
    broken = {p.split(":", 1)[0] for p in report.problems}
    try:
        from cosyvoice_common.modelconfig import load_model_config

        expected = expected_shapes(load_model_config(model_dir))
    except Exception as exc:   # a yaml/config.json we cannot build modules from: say so, check the rest
        report.problems.append(f"cosyvoice2.yaml / {QWEN2_DIR}/config.json: cannot build the model from them: "
                               f"{_one_line(exc)}")
        expected = {}
    for name, shapes in expected.items():
        if name in broken:
            continue
        try:
            actual = checkpoint_shapes(model_dir / name)
        except Exception as exc:   # truncated zip, pickle with code (weights_only refuses), not a dict
            report.problems.append(f"{name}: cannot be read as a state dict: {_one_line(exc)}")
            continue
        report.keys[name] = len(actual)
        report.problems += compare_shapes(name, shapes, actual)
    for name, (inputs, outputs) in ONNX_IO_NAMES.items():
        if name in broken:
            continue
        try:
            report.problems += _onnx_problems(model_dir / name, inputs, outputs)
        except Exception as exc:
            report.problems.append(f"{name}: cannot be read as ONNX: {_one_line(exc)}")
    return report


# --- CLI --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cosyvoice_tools.download", description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR") or RELEASED_MODEL_DIR))
    ap.add_argument("--source", choices=SOURCES, default="auto")
    ap.add_argument("--revision", default=None, help="a Hub revision (branch, tag or commit)")
    ap.add_argument("--verify-only", action="store_true", help="do not download, only verify MODEL_DIR")
    args = ap.parse_args(argv)
    if not args.verify_only:
        try:
            download(args.model_dir, args.source, args.revision)
        except RuntimeError as exc:
            print(f"download: error: {exc}", file=sys.stderr)
            return EXIT_DOWNLOAD_FAILED
    report = verify_model_dir(args.model_dir)
    for warning in report.warnings:
        print(f"download: warning: {warning}", file=sys.stderr)
    if not report.ok:
        for problem in report.problems:
            print(f"download: error: {problem}", file=sys.stderr)
        print(f"download: {args.model_dir} is NOT a usable CosyVoice2-0.5B directory "
              f"({len(report.problems)} problems)", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    kind = "generated random-weight model" if report.generated else "CosyVoice2-0.5B release"
    keys = ", ".join(f"{k} {n} keys" for k, n in report.keys.items())
    print(f"download: {args.model_dir} verified ({kind}): {keys}; ONNX I/O names match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
