#!/usr/bin/env bash
# The GPU machine's Python stack on this CPU machine: Python 3.12 (so tritonserver runs the wheel's 3.12
# Python-backend stub), torch 2.11 (+cu130, as there; it runs on CPU), numpy 2.5. Then the stage and stack
# test suites under it, with real tritonservers. Catches what only the GPU machine's versions hit (the llm
# stub crash of 2026-11-25 was one: see README "The llm stub crash") without spending device time.
#
# Usage: bash tools/gpu/cpu_twin.sh [pytest args]   (default: the whole suite)
# Needs python3.12 on PATH or under pyenv, and the package index (downloads ~5 GB once, into .venv-twin/).
set -euo pipefail
cd "$(dirname "$0")/../.."
TWIN=${TWIN_VENV:-.venv-twin}
TORCH_VERSION=${TWIN_TORCH:-2.11.0}

py312=
for candidate in "${TWIN_PYTHON:-}" "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  # pyenv's shim is on PATH even where no 3.12 is selected: only an interpreter that runs counts
  if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    py312=$candidate; break
  fi
done
[ -n "$py312" ] || { echo "cpu_twin: no working python3.12 (TWIN_PYTHON, PATH or pyenv)" >&2; exit 2; }

if [ ! -f "$TWIN/.stamp-$TORCH_VERSION" ]; then
  echo "cpu_twin: building $TWIN with $("$py312" --version), torch $TORCH_VERSION (once; large download)"
  "$py312" -m venv "$TWIN"
  # The machine-wide pip constraints pin torch for the CPU venv; the twin wants the GPU machine's version.
  export PIP_CONSTRAINT=
  "$TWIN/bin/pip" install -q --upgrade pip
  "$TWIN/bin/pip" install -q "torch==$TORCH_VERSION" "numpy>=2.5,<2.6"
  grep -v '^torch==' requirements.txt | sed 's/#.*//' > "$TWIN/requirements.txt"
  "$TWIN/bin/pip" install -q -r "$TWIN/requirements.txt" "torch==$TORCH_VERSION" "numpy>=2.5,<2.6"   # torch pinned: dependents would upgrade it
  "$TWIN/bin/pip" install -q --no-deps -r requirements-nodeps.txt
  "$TWIN/bin/python" tools/cosyvoice_tools/fix_torchaudio.py
  touch "$TWIN/.stamp-$TORCH_VERSION"
fi
# gRPC code (once per checkout; `make proto` writes the same folder) and our package roots.
if [ ! -f protos/gen/cosyvoice/v1/tts_pb2_grpc.py ]; then
  mkdir -p protos/gen
  "$TWIN/bin/python" -m grpc_tools.protoc -Iprotos --python_out=protos/gen --grpc_python_out=protos/gen protos/cosyvoice/v1/tts.proto
  touch protos/gen/cosyvoice/__init__.py protos/gen/cosyvoice/v1/__init__.py
fi
site=$("$TWIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for d in common services/tokenizer services/speaker services/llm services/token2wav services/gateway launcher tools protos/gen; do
  echo "$PWD/$d"
done > "$site/cosyvoice-stack.pth"

"$TWIN/bin/python" -c 'import sys, torch, numpy; print(f"cpu_twin: python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}")'
SEED_STUB_PYTHON_DIR=${SEED_STUB_PYTHON_DIR:-build/seed-stub-python-twin} \
  exec "$TWIN/bin/python" -m pytest -q -p no:cacheprovider "$@"   # no arguments: the whole suite (pytest.ini testpaths)
