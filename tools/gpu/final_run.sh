#!/usr/bin/env bash
# Everything we measure on a GPU in one run, most important first, under one deadline.
# PHASES (comma list, default stack,engine,components):
#   stack       whole stack (gateway + 4 stage servers, full-size random weights): streaming (cache off / on)
#               and offline at $CONC. The llm stage is first checked alone (tools/gpu/llm_stage_probe.py;
#               no stack run if its stub dies there). If the whole stack's first request fails, the stubs' state is recorded (/proc, Python
#               stacks via SIGUSR1) and the next configuration is tried: Triton instances KIND_CPU (the model
#               still on the GPU), then also no CUDA graphs; the tables say which one served.
#   nomps       the same stack with STACK_CUDA_MPS=off, streaming at $NOMPS_CONC (what MPS buys)
#   variant     the same stack again with the variables of VARIANT_ENV set (e.g. "TOKEN2WAV_STREAM_CACHE_GIB=0"),
#               streaming at $VARIANT_CONC (default $CONC): one setting's effect, measured in the same call
#   replicas    the same stack with TOKEN2WAV_REPLICAS=2 on this one GPU, streaming at $REPLICA_CONC
#   hostile     after the stack phase's bench, on the same stack: the hostile-load suite (cosyvoice_tools.hostile)
#               at MAX_INFLIGHT_REQUESTS workers (set it: the gateway admits that many) and 10x that, once per
#               client-process count in HOSTILE_CLIENT_PROCESSES (default "0": the suite's own spread)
#   seed        after the stack phase's bench, on the same stack (started with its two seed-compatible fronts):
#               the seed's own client contract (`bench --client seed`) at $SEED_CONC in $SEED_MODES
#   engine      the in-process pipeline (--engine-only) as the second line
#   cudatests   the CUDA-only tests that CI skips (pytest -k cuda: CUDA graphs against eager, GPU backends)
#   components  token2wav alone: streams (state cache off / new voice / cached voice) and a 16-call mix, this
#               tree beside BASELINE_DIR's when set (tools/gpu/token2wav_speed.py); then the LLM engine
#               (tools/gpu/llm_speed.py, LLM_SPEED_ARGS, e.g. --variants engine,engine-compiled)
#   baseline    the whole stack of another checkout (BASELINE_DIR, e.g. the previous release unpacked there),
#               streaming at $BASELINE_CONC on the same model (BASELINE_MPS=on: under CUDA MPS, like this tree): the
#               before/after pair of one call; BASELINE_AFTER=1 runs it after this tree's stack phase instead of
#               before (does running first or second matter?)
# OFFLINE_CONC set: the stack phase benches STACK_MODES (default stream,stream-cached) at $CONC, then offline at
# $OFFLINE_CONC (offline saturates at other levels than streaming).
# STACK_CUDA_MPS (off | on | auto) is passed to the launcher for this tree's stack (cosyvoice_launcher.mps).
# Usage on a GPU machine (repo root): DEADLINE_S=560 RESULTS_DIR=bench_results bash tools/gpu/final_run.sh
# DEADLINE_S bounds the whole run (each phase gets a share of what is left). Every phase copies its results to
# RESULTS_DIR as soon as it ends (tables, JSON, and logs.tgz with every log and diagnostic), so a run that is
# stopped early still leaves what it measured.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s); DEADLINE_S=${DEADLINE_S:-560}
left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
share() { echo $(( $(left) * $1 / 100 )); }   # a percentage of the time left
PHASES=",${PHASES:-stack,engine,components},"
has() { [[ $PHASES == *",$1,"* ]]; }
[ "${SKIP_SETUP:-0}" = 1 ] || source tools/gpu/setup.sh || exit 1
ulimit -c unlimited 2>/dev/null   # a crashed stub leaves a core for diagnose() (native backtrace if gdb exists)
OUTDIR=/tmp/results; mkdir -p "$OUTDIR"   # scratch; results and a logs archive go to $RESULTS after every phase
RESULTS=${RESULTS_DIR:-bench_results}; mkdir -p "$RESULTS"
publish() {  # copy what exists so far; a call cut short still returns it
  cp "$OUTDIR"/stack_tables.md "$OUTDIR"/replicas_tables.md "$OUTDIR"/engine_tables.md "$OUTDIR"/stack.json \
     "$OUTDIR"/baseline_tables.md "$OUTDIR"/nomps_tables.md "$OUTDIR"/variant_tables.md "$OUTDIR"/offline_tables.md "$OUTDIR"/seed_tables.md \
     "$OUTDIR"/cudatests.txt "$OUTDIR"/token2wav_speed.txt "$OUTDIR"/llm_speed.txt \
     "$OUTDIR"/hostile_p*.json "$OUTDIR"/hostile_tables.md "$RESULTS/" 2>/dev/null
  tar -czf "$RESULTS/logs.tgz" -C "$OUTDIR" . 2>/dev/null
}
export MODEL_DIR=${MODEL_DIR:-/tmp/models/cosyvoice2-full}
MANIFEST=$(realpath "${MANIFEST:-bench/seedtts-like/manifest.jsonl}")   # absolute: the baseline phase runs from another folder
CONC=${CONC:-1,2,4,8,16,32}
# the components build their models in memory: the model directory only for phases that serve it
if has stack || has baseline || has engine || has nomps || has replicas || has variant; then
  python3 -m cosyvoice_tools.modelgen --size "${SIZE:-full}" --out "$MODEL_DIR" 2>&1 | grep -v "random weights" | tail -2
fi
DEVICE=${DEVICE:-cuda:0}; LIMIT=${LIMIT:-0}
for s in TOKENIZER SPEAKER LLM TOKEN2WAV; do export ${s}_DEVICES=$DEVICE; done
export TOKENIZER_BACKEND=torch SPEAKER_BACKEND=torch LLM_DTYPE=${LLM_DTYPE:-bfloat16} TOKEN2WAV_DTYPE=${TOKEN2WAV_DTYPE:-bfloat16}
export STACK_RUN_DIR=/tmp/run REDIS_PORT=6390 PLACEMENT_DEFAULT_DEVICE=$DEVICE
# the seed-compatible fronts only where their own client measures them (the seed phase)
export SEED_FRONT=$(has seed && echo 1 || echo 0)
# token2wav captures every Euler-step and HiFT graph before it reports ready (a minute or more on a fresh machine)
export STACK_READY_TIMEOUT_S=${STACK_READY_TIMEOUT_S:-570}
LABEL="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo cpu), $(date -u +%F)"

stack_up() {  # $1 = tag
  timeout "${STACK_UP_TIMEOUT_S:-600}" python3 -m cosyvoice_launcher.stack up > "$OUTDIR/stack_up_$1.txt" 2>&1 || { tail -5 "$OUTDIR/stack_up_$1.txt"; return 1; }
  stack_addresses
}
stack_addresses() {  # the running stack's stage servers: Triton statistics and token2wav engine metrics
  STATS=$(python3 -c "import json; s=json.load(open('/tmp/run/stack.json')); print(','.join(f\"127.0.0.1:{p['ports']['http']}\" for p in s['processes'] if p['kind'] == 'triton'))")
  METRICS=$(python3 -m cosyvoice_tools.profile --run-dir /tmp/run --print-addresses stage-metrics)
}
smoke() {  # one short streaming request through the whole stack
  timeout "${SMOKE_S:-75}" python3 -m cosyvoice_tools.bench --manifest "$MANIFEST" --concurrency 1 --modes stream --limit 1 \
    --warmup 0 --label smoke --out "$OUTDIR/smoke_$1.json" > "$OUTDIR/smoke_$1.txt" 2>&1
}
diagnose() {  # $1 = tag: is each stub alive, what its threads wait on, their Python stacks
  local f="$OUTDIR/diag_$1.txt"
  { date -u; nvidia-smi; ps -eo pid,ppid,stat,etime,pcpu,rss,args --sort=pid | grep -E "triton|python|redis" | cut -c1-220
    for pid in $(pgrep -f triton_python_backend_stub); do
      echo "== stub $pid: $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-160)"; grep -E "State|Threads" /proc/$pid/status
      for t in /proc/$pid/task/*; do echo "  $(basename $t) $(cat $t/comm) $(cat $t/wchan 2>/dev/null) $(awk '{print $3}' $t/stat)"; done
    done; } > "$f" 2>&1
  pkill -USR1 -f triton_python_backend_stub; sleep 3
  { echo "core_pattern: $(cat /proc/sys/kernel/core_pattern 2>/dev/null)"; echo "gdb: $(command -v gdb || echo none)"
    for core in $(find . /tmp/run -maxdepth 4 -name 'core*' -type f -newer "$OUTDIR" 2>/dev/null | head -3); do
      echo "== $core"; command -v gdb >/dev/null && timeout 60 gdb -batch -ex "thread apply all bt 30" \
        "$(find /tmp/site -name triton_python_backend_stub -path '*backends*' | head -1)" "$core" 2>&1 | tail -150
    done; } >> "$f" 2>&1
  for log in /tmp/run/logs/*.log; do
    { echo "#### $log"; grep -B2 -A40 "Thread 0x\|Current thread\|Fatal Python" "$log" | head -200; } >> "$f"
  done
}
try_stack() {  # $1 = tag: up + smoke; on failure record why and take the stack down
  echo "-- stack config $1 ($(left) s left)"
  if stack_up "$1" && smoke "$1"; then tail -3 "$OUTDIR/smoke_$1.txt"; return 0; fi
  echo "   config $1 failed the smoke request: $(grep -h -m2 -i "error\|warm-up" "$OUTDIR/smoke_$1.txt" | cut -c1-200)"
  diagnose "$1"; python3 -m cosyvoice_launcher.stack down >/dev/null 2>&1
  mkdir -p "$OUTDIR/logs_$1"; cp /tmp/run/logs/*.log "$OUTDIR/logs_$1/" 2>/dev/null; return 1
}
llm_alone() {  # $1 = tag: the llm stage by itself, a few concurrent streams: does its stub survive here?
  local tag=${1:-default}
  ( export TOKENIZER_REPLICAS=0 SPEAKER_REPLICAS=0 TOKEN2WAV_REPLICAS=0 STACK_GATEWAY=0
    timeout 200 python3 -m cosyvoice_launcher.stack up > "$OUTDIR/llm_alone_up_$tag.txt" 2>&1 &&
    timeout "${LLM_ALONE_S:-60}" python3 tools/gpu/llm_stage_probe.py --url 127.0.0.1:8301 --timeout-s 30 \
      > "$OUTDIR/llm_alone_$tag.txt" 2>&1 )
  local rc=$?
  [ $rc = 0 ] || diagnose "llm_alone_$tag"
  python3 -m cosyvoice_launcher.stack down >/dev/null 2>&1
  mkdir -p "$OUTDIR/logs_llm_alone_$tag"; cp /tmp/run/logs/llm-0.log "$OUTDIR/logs_llm_alone_$tag/" 2>/dev/null
  echo "   llm stage alone ($tag): $(tail -1 "$OUTDIR/llm_alone_$tag.txt" 2>/dev/null)"; return $rc
}
stack_bench() {  # $1 = label suffix, $2 = out name, $3 = concurrencies, $4 = modes, $5 = share of time left (%), $6.. = bench args
  local label=$1 name=$2 conc=$3 modes=$4 pct=$5; shift 5
  timeout "$(share "$pct")" python3 -m cosyvoice_tools.bench --manifest "$MANIFEST" --concurrency "$conc" \
    --modes "$modes" --limit "$LIMIT" --triton-stats "$STATS" --stage-metrics "$METRICS" --label "$label, $LABEL" \
    --out "$OUTDIR/$name.json" "$@" 2>"$OUTDIR/${name}_bench.err" > "$OUTDIR/${name}_bench.out"
  tables "$name"
}
tables() {  # $1 = out name: the bench's tables (it writes them beside its JSON; an older tree's bench printed them)
  if [ -s "$OUTDIR/$1.md" ]; then cp "$OUTDIR/$1.md" "$OUTDIR/$1_tables.md"; else cp "$OUTDIR/$1_bench.out" "$OUTDIR/$1_tables.md"; fi
}
stack_down() {  # $1 = tag: take the stack down and keep its logs
  python3 -m cosyvoice_launcher.stack down >/dev/null 2>&1
  mkdir -p "$OUTDIR/logs_$1"; cp /tmp/run/logs/*.log "$OUTDIR/logs_$1/" 2>/dev/null
}
hostile() {  # the hostile-load suite against the running stack (its gateway admits $MAX_INFLIGHT_REQUESTS), once per
  local procs  # client-process count in HOSTILE_CLIENT_PROCESSES (0 = the suite's default spread)
  for procs in ${HOSTILE_CLIENT_PROCESSES:-0}; do
    timeout "${HOSTILE_S:-150}" python3 -m cosyvoice_tools.hostile --run-dir /tmp/run \
      --grpc "$(python3 -m cosyvoice_tools.profile --run-dir /tmp/run --print-addresses gateway-grpc)" \
      --http "http://$(python3 -m cosyvoice_tools.profile --run-dir /tmp/run --print-addresses gateway-http)" \
      --concurrency "${MAX_INFLIGHT_REQUESTS:?the hostile phase needs MAX_INFLIGHT_REQUESTS}" \
      --client-processes "$procs" --out "$OUTDIR/hostile_p$procs.json" >> "$OUTDIR/hostile_tables.md" 2>&1
    echo "   hostile suite, client processes $procs: exit $?"
  done
}

baseline_phase() {  # the other checkout's whole stack (BASELINE_DIR), streaming at BASELINE_CONC
  echo "== baseline stack: $BASELINE_DIR ($(left) s left)"
  ( cd "$BASELINE_DIR" && source tools/gpu/setup.sh > /dev/null &&
    # a checkout from before the launcher left the tools package has it as cosyvoice_tools.stack
    launcher=$( [ -d launcher/cosyvoice_launcher ] && echo cosyvoice_launcher || echo cosyvoice_tools ) &&
    STACK_CUDA_MPS=${BASELINE_MPS:-off} timeout 300 python3 -m "$launcher.stack" up > "$OUTDIR/baseline_up.txt" 2>&1 &&
    STATS=$(python3 -c "import json; s=json.load(open('/tmp/run/stack.json')); print(','.join(f\"127.0.0.1:{p['ports']['http']}\" for p in s['processes'] if p['kind'] == 'triton'))") &&
    timeout "$(share "${BASELINE_SHARE:-30}")" python3 -m cosyvoice_tools.bench --manifest "$MANIFEST" \
      --concurrency "${BASELINE_CONC:-1,4,16}" --modes "${BASELINE_MODES:-stream}" --limit "$LIMIT" --triton-stats "$STATS" \
      --label "baseline ${BASELINE_LABEL:-$(basename "$BASELINE_DIR")}, $LABEL" \
      --out "$OUTDIR/baseline.json" 2>"$OUTDIR/baseline_bench.err" > "$OUTDIR/baseline_bench.out"
    tables baseline
    python3 -m "$launcher.stack" down > /dev/null 2>&1
    mkdir -p "$OUTDIR/logs_baseline"; cp /tmp/run/logs/*.log "$OUTDIR/logs_baseline/" 2>/dev/null )
  source tools/gpu/setup.sh > /dev/null   # this tree's import path again (setup.sh rewrites the stub's .pth)
  publish
}
if has cudatests; then
  echo "== CUDA-only tests ($(left) s left)"
  timeout "${CUDATESTS_S:-180}" python3 -m pytest -q -p no:cacheprovider -k cuda ${CUDATESTS:-services/token2wav/tests \
    services/llm/tests services/tokenizer/tests services/speaker/tests} > "$OUTDIR/cudatests.txt" 2>&1
  echo "   $(tail -1 "$OUTDIR/cudatests.txt")"
  publish
fi
has baseline && [ -n "${BASELINE_DIR:-}" ] && [ "${BASELINE_AFTER:-0}" != 1 ] && baseline_phase

MODE=none
if has stack || has replicas; then
  echo "== whole stack ($(left) s left)"
  if [ "${LLM_ALONE:-1}" = 1 ] && ! llm_alone; then echo "the llm stage alone failed: no whole-stack run"
  elif try_stack graphs; then MODE=graphs
  else
    for s in TOKENIZER SPEAKER LLM TOKEN2WAV; do export ${s}_TRITON_KIND=KIND_CPU; done
    if try_stack graphs-kindcpu; then MODE=graphs-kindcpu
    else
      export LLM_CUDA_GRAPHS=0 TOKEN2WAV_CUDA_GRAPHS=0
      if try_stack eager-kindcpu; then MODE=eager-kindcpu; else echo "no stack configuration served a request"; fi
    fi
  fi
  publish
fi
if has stack && [ "$MODE" != none ]; then
  if [ -n "${OFFLINE_CONC:-}" ]; then
    stack_bench "whole stack ($MODE)" stack "$CONC" "${STACK_MODES:-stream,stream-cached}" "${STACK_SHARE:-60}"
    echo "   streaming bench done ($(left) s left)"
    stack_bench "whole stack ($MODE)" offline "$OFFLINE_CONC" offline "${OFFLINE_SHARE:-40}"
  else
    stack_bench "whole stack ($MODE)" stack "$CONC" "${STACK_MODES:-stream,stream-cached,offline}" "${STACK_SHARE:-60}"
  fi
  echo "   stack bench done ($(left) s left)"
  publish
  if has seed; then
    stack_bench "seed client, whole stack ($MODE)" seed "${SEED_CONC:-1,2,4}" "${SEED_MODES:-stream,stream-cached,offline}" \
      "${SEED_SHARE:-70}" --client seed
    echo "   seed client done ($(left) s left)"
  fi
  has hostile && hostile
  stack_down stack
  publish
fi
has baseline && [ -n "${BASELINE_DIR:-}" ] && [ "${BASELINE_AFTER:-0}" = 1 ] && baseline_phase   # order check
if has variant && [ "$MODE" != none ]; then
  echo "== the same stack with ${VARIANT_ENV:?the variant phase needs VARIANT_ENV} ($(left) s left)"
  if (export ${VARIANT_ENV}; stack_up variant); then   # the setting reaches the launcher only
    stack_addresses
    stack_bench "whole stack ($MODE), $VARIANT_ENV" variant "${VARIANT_CONC:-$CONC}" "${VARIANT_MODES:-stream}" \
      "${VARIANT_SHARE:-80}"
    stack_down variant
  fi
  publish
fi
if has nomps && [ "$MODE" != none ]; then
  echo "== the same stack without CUDA MPS ($(left) s left)"
  if STACK_CUDA_MPS=off stack_up nomps; then
    stack_bench "whole stack ($MODE), no MPS" nomps "${NOMPS_CONC:-16}" stream "${NOMPS_SHARE:-50}"
    stack_down nomps
  fi
  publish
fi
if has replicas && [ "$MODE" != none ]; then
  echo "== two token2wav replicas on one GPU ($(left) s left)"
  if TOKEN2WAV_REPLICAS=2 stack_up replicas; then
    stack_bench "whole stack ($MODE), token2wav x2" replicas "${REPLICA_CONC:-16,32}" stream "${REPLICA_SHARE:-40}"
    stack_down replicas
  fi
  publish
fi

if has engine; then
  echo "== engine only ($(left) s left)"
  timeout "$(share "${ENGINE_SHARE:-45}")" python3 -m cosyvoice_tools.bench --engine-only --model-dir "$MODEL_DIR" \
    --device "${DEVICE%%:*}" --manifest "$MANIFEST" --concurrency "$CONC" --modes stream,offline --limit "$LIMIT" \
    --label "engine only, $LABEL" --out "$OUTDIR/engine.json" 2>"$OUTDIR/engine_bench.err" > "$OUTDIR/engine_bench.out"
  tables engine
  publish
fi

if has components; then
  echo "== components ($(left) s left)"
  timeout "$(share "${T2W_SPEED_SHARE:-60}")" python3 tools/gpu/token2wav_speed.py --device cuda --size full --graphs \
    --json-out "$RESULTS/token2wav_speed.json" ${BASELINE_DIR:+--baseline-dir "$BASELINE_DIR"} ${T2W_SPEED_ARGS:-} \
    > "$OUTDIR/token2wav_speed.txt" 2>&1
  echo "   token2wav_speed: exit $? ($(left) s left)"
  publish
  OUT="$RESULTS" timeout $(( $(left) - 10 )) python3 tools/gpu/llm_speed.py ${LLM_SPEED_ARGS:-} > "$OUTDIR/llm_speed.txt" 2>&1
  echo "   llm_speed: exit $? ($(left) s left)"
  publish
fi
echo "== done ($(left) s left; stack config: $MODE)"
[ -f "$OUTDIR/cudatests.txt" ] && grep -E "passed|failed|error" "$OUTDIR/cudatests.txt" | tail -5
for f in baseline_tables.md stack_tables.md offline_tables.md seed_tables.md variant_tables.md hostile_tables.md nomps_tables.md replicas_tables.md engine_tables.md; do
  [ -f "$OUTDIR/$f" ] && { echo "#### $f"; grep -E "^\||^#" "$OUTDIR/$f" | head -60; }
done
[ -f "$OUTDIR/llm_speed.txt" ] && tail -15 "$OUTDIR/llm_speed.txt"
[ -f "$OUTDIR/token2wav_speed.txt" ] && tail -15 "$OUTDIR/token2wav_speed.txt"
publish
