"""Make torchaudio's pure-Python parts importable beside a CPU-only torch.

PyPI's torchaudio wheels link their C++ extension against CUDA builds of torch. With the CPU torch
we install here (a CUDA build is ~6 GB), loading that extension fails and `import torchaudio` raises.
torchaudio treats a missing extension as optional, so when it cannot load we remove its shared
libraries; what we use (compliance.kaldi, functional.resample) is pure Python.
"""
import pathlib
import subprocess
import sys


def torchaudio_imports() -> bool:
    return subprocess.run([sys.executable, "-c", "import torchaudio"], capture_output=True).returncode == 0


def main() -> int:
    if torchaudio_imports():
        return 0
    import importlib.util

    spec = importlib.util.find_spec("torchaudio")
    if spec is None or not spec.submodule_search_locations:
        print("torchaudio is not installed", file=sys.stderr)
        return 1
    lib_dir = pathlib.Path(list(spec.submodule_search_locations)[0]) / "lib"
    for so in lib_dir.glob("*.so"):
        so.unlink()
    if not torchaudio_imports():
        print("torchaudio still fails to import after removing its extension", file=sys.stderr)
        return 1
    print(f"torchaudio: removed CUDA-only extension from {lib_dir} (pure-Python parts in use)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
