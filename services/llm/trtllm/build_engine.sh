#!/usr/bin/env bash
# CosyVoice2 LLM -> TensorRT-LLM engine (spec 8.1 stage 1, 8.5). Run on a machine with TensorRT-LLM and a GPU.
#
#   services/llm/trtllm/build_engine.sh (--model-dir DIR | --hf-dir HF_DIR) --engine-dir ENGINE_DIR [options]
#
# Steps:
#   0. (with --model-dir) llm.pt -> HF checkpoint with the flat speech vocabulary: python -m cosyvoice_llm.trtllm.convert
#   1. HF -> TensorRT-LLM checkpoint: TensorRT-LLM's Qwen example convert_checkpoint.py
#   2. lm_head.bias -> TensorRT-LLM checkpoint: python -m cosyvoice_llm.trtllm.headbias (the Qwen converter drops it)
#   3. trtllm-build with the seed's options (--max_batch_size 16 --max_num_tokens 32768 --gemm_plugin <dtype>) and
#      --model_cls_file cosyvoice2_qwen.py (Qwen with a biased lm_head)
#
# Exit codes: 2 usage, 3 tensorrt_llm not importable, 4 convert_checkpoint.py not found, else the failing step's.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/../../.." && pwd)"
EXIT_USAGE=2
EXIT_NO_TRTLLM=3
EXIT_NO_CONVERTER=4

PYTHON="${PYTHON:-python3}"
TRTLLM_BUILD="${TRTLLM_BUILD:-trtllm-build}"
MODEL_DIR=""
HF_DIR=""
WORK_DIR=""
ENGINE_DIR=""
DTYPE="bfloat16"                 # seed: trt_dtype=bfloat16 (weights and GEMM plugin)
TP_SIZE=1
MAX_BATCH_SIZE=16                # seed: --max_batch_size 16 (= Triton max_batch_size)
MAX_NUM_TOKENS=32768             # seed: --max_num_tokens 32768
MAX_INPUT_LEN=""                 # empty = trtllm-build's default
MAX_SEQ_LEN=""                   # empty = deduced from the model config
CONVERT_SCRIPT="${TRTLLM_CONVERT_SCRIPT:-}"
# Where TensorRT-LLM images keep the examples; the Qwen example moved between releases.
TRTLLM_EXAMPLES_DIR="${TRTLLM_EXAMPLES_DIR:-/app/tensorrt_llm/examples}"
CONVERT_CANDIDATES=("qwen/convert_checkpoint.py" "models/core/qwen/convert_checkpoint.py")
DRY_RUN=0

usage() {
  sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<EOF

Options:
  --model-dir DIR        CosyVoice2 model dir (llm.pt, CosyVoice-BlankEN/); converted into WORK_DIR/hf first
  --hf-dir DIR           an existing export of cosyvoice_llm.trtllm.convert (instead of --model-dir)
  --engine-dir DIR       output engine dir (Triton's gpt_model_path)                         [required]
  --work-dir DIR         intermediate files (default: ENGINE_DIR.work)
  --dtype T              bfloat16 | float16 | float32                                         [${DTYPE}]
  --tp-size N            tensor parallelism                                                   [${TP_SIZE}]
  --max-batch-size N     [${MAX_BATCH_SIZE}]
  --max-num-tokens N     [${MAX_NUM_TOKENS}]
  --max-input-len N      (default: trtllm-build's)
  --max-seq-len N        (default: trtllm-build's)
  --convert-script PATH  TensorRT-LLM's examples/.../qwen/convert_checkpoint.py (env TRTLLM_CONVERT_SCRIPT;
                         default: searched under TRTLLM_EXAMPLES_DIR=${TRTLLM_EXAMPLES_DIR})
  --dry-run              print the commands, run nothing (no tensorrt_llm needed)
Environment: PYTHON (default python3, must import tensorrt_llm and our packages), TRTLLM_BUILD (default trtllm-build).
EOF
}

die() { echo "error: $2" >&2; exit "$1"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model-dir) MODEL_DIR="$2"; shift 2 ;;
    --hf-dir) HF_DIR="$2"; shift 2 ;;
    --engine-dir) ENGINE_DIR="$2"; shift 2 ;;
    --work-dir) WORK_DIR="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --tp-size) TP_SIZE="$2"; shift 2 ;;
    --max-batch-size) MAX_BATCH_SIZE="$2"; shift 2 ;;
    --max-num-tokens) MAX_NUM_TOKENS="$2"; shift 2 ;;
    --max-input-len) MAX_INPUT_LEN="$2"; shift 2 ;;
    --max-seq-len) MAX_SEQ_LEN="$2"; shift 2 ;;
    --convert-script) CONVERT_SCRIPT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "${EXIT_USAGE}" "unknown option $1" ;;
  esac
done

[[ -n "${ENGINE_DIR}" ]] || die "${EXIT_USAGE}" "--engine-dir is required"
[[ -n "${MODEL_DIR}" || -n "${HF_DIR}" ]] || die "${EXIT_USAGE}" "one of --model-dir or --hf-dir is required"
[[ -z "${MODEL_DIR}" || -z "${HF_DIR}" ]] || die "${EXIT_USAGE}" "--model-dir and --hf-dir are exclusive"
case "${DTYPE}" in bfloat16|float16|float32) ;; *) die "${EXIT_USAGE}" "--dtype must be bfloat16, float16 or float32" ;; esac
WORK_DIR="${WORK_DIR:-${ENGINE_DIR%/}.work}"
[[ -n "${HF_DIR}" ]] || HF_DIR="${WORK_DIR}/hf"
CKPT_DIR="${WORK_DIR}/trtllm_ckpt_${DTYPE}_tp${TP_SIZE}"

# Our packages (convert, headbias) on the path whether or not the venv's .pth is present.
export PYTHONPATH="${REPO_ROOT}/common:${REPO_ROOT}/services/llm${PYTHONPATH:+:${PYTHONPATH}}"

if [[ "${DRY_RUN}" == 0 ]]; then
  if ! err="$("${PYTHON}" -c 'import tensorrt_llm' 2>&1)"; then
    echo "${err}" | tail -n 1 >&2
    die "${EXIT_NO_TRTLLM}" "tensorrt_llm is not importable by ${PYTHON}. The engine can only be built on a machine \
with TensorRT-LLM and an NVIDIA GPU (e.g. inside nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3); \
set PYTHON to that interpreter. See services/llm/trtllm/README.md."
  fi
fi

if [[ -z "${CONVERT_SCRIPT}" ]]; then
  for candidate in "${CONVERT_CANDIDATES[@]}"; do
    if [[ -f "${TRTLLM_EXAMPLES_DIR}/${candidate}" ]]; then CONVERT_SCRIPT="${TRTLLM_EXAMPLES_DIR}/${candidate}"; break; fi
  done
fi
if [[ -z "${CONVERT_SCRIPT}" ]]; then
  [[ "${DRY_RUN}" == 1 ]] || die "${EXIT_NO_CONVERTER}" "TensorRT-LLM's Qwen convert_checkpoint.py not found under \
${TRTLLM_EXAMPLES_DIR} (tried ${CONVERT_CANDIDATES[*]}); pass --convert-script or set TRTLLM_EXAMPLES_DIR"
  CONVERT_SCRIPT="${TRTLLM_EXAMPLES_DIR}/${CONVERT_CANDIDATES[0]}"
fi

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ "${DRY_RUN}" == 1 ]] || "$@"
}

if [[ -n "${MODEL_DIR}" ]]; then
  run "${PYTHON}" -m cosyvoice_llm.trtllm.convert --model-dir "${MODEL_DIR}" --out "${HF_DIR}" --dtype "${DTYPE}"
fi
run "${PYTHON}" "${CONVERT_SCRIPT}" --model_dir "${HF_DIR}" --output_dir "${CKPT_DIR}" --dtype "${DTYPE}" \
    --tp_size "${TP_SIZE}"
run "${PYTHON}" -m cosyvoice_llm.trtllm.headbias --hf-dir "${HF_DIR}" --ckpt-dir "${CKPT_DIR}"
build_args=(--checkpoint_dir "${CKPT_DIR}" --output_dir "${ENGINE_DIR}"
            --model_cls_file "${SCRIPT_DIR}/cosyvoice2_qwen.py" --model_cls_name CosyVoice2QWenForCausalLM
            --max_batch_size "${MAX_BATCH_SIZE}" --max_num_tokens "${MAX_NUM_TOKENS}")
# GEMM plugin in the engine's dtype (seed: --gemm_plugin bfloat16); fp32 engines run without it.
[[ "${DTYPE}" == float32 ]] || build_args+=(--gemm_plugin "${DTYPE}")
[[ -z "${MAX_INPUT_LEN}" ]] || build_args+=(--max_input_len "${MAX_INPUT_LEN}")
[[ -z "${MAX_SEQ_LEN}" ]] || build_args+=(--max_seq_len "${MAX_SEQ_LEN}")
run "${TRTLLM_BUILD}" "${build_args[@]}"
echo "engine: ${ENGINE_DIR} (serve it with: make trtllm-repo TRTLLM_ENGINE_DIR=${ENGINE_DIR})"
