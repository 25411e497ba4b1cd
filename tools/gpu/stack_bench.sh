#!/usr/bin/env bash
# One device call: full-size random model, whole stack on the GPU, `make bench`-equivalent sweep, then the
# in-process engine as a second line. Results (JSON + tables + logs) go to $OUT (or bench_results/).
# Env: CONC (default 1,2,4,8,16,32), MODES (stream,stream-cached,offline), LIMIT (0 = all 26 items),
#      MODEL_DIR (default /tmp/models/cosyvoice2-full), ENGINE_ONLY (1 = also run --engine-only).
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/setup.sh || exit 1
OUTDIR=${OUT:-bench_results}; mkdir -p "$OUTDIR"
export MODEL_DIR=${MODEL_DIR:-/tmp/models/cosyvoice2-full}
MANIFEST=${MANIFEST:-.carry/bench/manifest.jsonl}
time python3 -m cosyvoice_tools.modelgen --size full --out "$MODEL_DIR" 2>&1 | tail -3
for s in TOKENIZER SPEAKER LLM TOKEN2WAV; do export ${s}_DEVICES=${DEVICES:-cuda:0}; done
export TOKENIZER_BACKEND=${TOKENIZER_BACKEND:-torch} SPEAKER_BACKEND=${SPEAKER_BACKEND:-torch}
export LLM_DTYPE=${LLM_DTYPE:-bfloat16} STACK_RUN_DIR=/tmp/run REDIS_PORT=6390
python3 -m cosyvoice_tools.stack up || { cp /tmp/run/logs/*.log "$OUTDIR/"; tail -n 30 /tmp/run/logs/gateway*.log; exit 1; }
STATS=$(python3 -c "import json; s=json.load(open('/tmp/run/stack.json')); print(','.join(f\"127.0.0.1:{p['ports']['http']}\" for p in s['processes'] if p['kind'] == 'triton'))" 2>/dev/null || echo "")
python3 -m cosyvoice_tools.bench --manifest "$MANIFEST" --concurrency "${CONC:-1,2,4,8,16,32}" \
  --modes "${MODES:-stream,stream-cached,offline}" --limit "${LIMIT:-0}" --triton-stats "$STATS" \
  --label "whole stack, $(nvidia-smi --query-gpu=name --format=csv,noheader), $(date -u +%F)" \
  --out "$OUTDIR/stack.json" 2>"$OUTDIR/stack_bench.err" | tee "$OUTDIR/stack_tables.md"
python3 -m cosyvoice_tools.stack down
cp /tmp/run/logs/*.log "$OUTDIR/" 2>/dev/null
if [ "${ENGINE_ONLY:-1}" = 1 ]; then
  python3 -m cosyvoice_tools.bench --engine-only --model-dir "$MODEL_DIR" --device cuda --manifest "$MANIFEST" \
    --concurrency "${CONC:-1,2,4,8,16,32}" --modes "${MODES:-stream,stream-cached,offline}" --limit "${LIMIT:-0}" \
    --label "engine only, $(date -u +%F)" --out "$OUTDIR/engine.json" 2>"$OUTDIR/engine_bench.err" | tee "$OUTDIR/engine_tables.md"
fi
