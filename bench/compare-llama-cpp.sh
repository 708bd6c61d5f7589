#!/usr/bin/env bash
# Tessera vs llama.cpp on this host, same files, same run: builds the peer (bench/peer-build.sh),
# makes the quantized test files, then prints both sides and the ratio (Tessera / llama.cpp) of
# every figure issue 13 asks for:
#   engine   llama-bench -t 2 -p 512 -n 128  vs  tessera-shard bench (pp512, batch-1 tg128)
#            on each of $FORMATS
#   batched  llama-batched-bench (-npp 128 -ntg 128 -npl 8,32, aggregate decode tok/s)
#            vs  tessera-shard bench --batch-sizes 8,32 --context 128 --steps 128
#   context  batch-1 decode after a $CONTEXT-token context (2048): llama-bench -p 0 -n 32 -d CONTEXT
#            vs  tessera-shard bench --batch-sizes 1 --context CONTEXT --steps 32, Q4_1
#   http     32 concurrent streaming clients, 64 new tokens, the same prompts through one load
#            generator (bench/http_load.py, OpenAI /v1/completions) against tessera-launcher and
#            llama-server -np 16 -cb: aggregate output tok/s, TTFT and ITL p50/p99, ready-to-serve
#            time (launch to /health 200) and peak RSS (VmHWM, summed over the server's processes)
# each on every ISA of $ISAS: native (all this CPU has; Tessera TESSERA_CPU_KERNELS=auto) and avx2
# (llama.cpp built without AVX-512/AMX; Tessera TESSERA_CPU_KERNELS=avx2).
#
#   bash bench/compare-llama-cpp.sh [all|build|quantize|greedy|engine|batched|context|http]   (default all)
#
# Settings (environment): THREADS (2), ISAS ("native avx2"), FORMATS ("Q4_1 Q8_0 Q4_K_M"),
# SHAPE (smollm2: the default model and requantizations of it; 1b or 7b: a random-weight llama of
# that shape with SmolLM2's tokenizer, bench/synthetic_gguf.py, quantized from F16 by llama-quantize,
# whose rows are multiples of 256 so K formats take their real K-quant paths),
# RUNS (3, repetitions of each tessera-shard bench figure), CONTEXT (2048), HTTP_SECONDS (30), CLIENTS (32),
# JOBS (2, build parallelism). Results also go to .cache/peer/results/<time>/ (raw outputs and
# table.tsv). Every server it starts listens on 127.0.0.1 and is stopped before it exits.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/peer-build.sh
source "$ROOT/bench/peer-build.sh"

THREADS=${THREADS:-2}
ISAS=${ISAS:-native avx2}
FORMATS=${FORMATS:-Q4_1 Q8_0 Q4_K_M}
RUNS=${RUNS:-3}
CONTEXT=${CONTEXT:-2048}
HTTP_SECONDS=${HTTP_SECONDS:-30}
CLIENTS=${CLIENTS:-32}
SHAPE=${SHAPE:-smollm2}
MODELS=$ROOT/.cache/models
SYNTHETIC=$MODELS/synthetic
BASE=$MODELS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
QUANT=$MODELS/quant
# What the correctness tests need besides the speed figures' files.
TEST_FORMATS="Q8_0 Q4_K_M Q5_K_M Q6_K Q5_0 Q5_1 Q2_K Q3_K_M"
RESULTS=$PEER/results/$(date +%Y%m%d-%H%M%S)
TABLE=$RESULTS/table.tsv
TESSERA=$ROOT/target/release

say() { echo "== $*" >&2; }

need_base() {
    if [ ! -f "$BASE" ]; then
        say "fetching the default model (tests/fetch-models.sh)"
        bash "$ROOT/tests/fetch-models.sh"
    fi
}

build_all() {
    for isa in $ISAS; do peer_build "$isa" >/dev/null; done
    say "building Tessera (release)"
    (cd "$ROOT" && cargo build --release -p tessera-shard -p tessera-router -p tessera-launcher)
}

# The file of a format: the shipped Q4_1, else a requantization of it (llama-quantize
# dequantizes to f32 first, so this equals quantizing the f32 conversion, which is itself the
# Q4_1 file dequantized). Rows of 576 are not a multiple of 256: K formats fall back to legacy
# types on those tensors, as they do in every SmolLM2-135M K-quant file.
model_file() {
    case $SHAPE:$1 in
        smollm2:Q4_1) echo "$BASE" ;;
        smollm2:*) echo "$QUANT/SmolLM2-135M-Instruct.$1.gguf" ;;
        *) echo "$SYNTHETIC/llama-$SHAPE.$1.gguf" ;;
    esac
}

# The F16 file every format of a synthetic shape is quantized from (made once).
synthetic_f16() {
    local f16=$SYNTHETIC/llama-$SHAPE.F16.gguf src py
    if [ ! -s "$f16" ]; then
        src=$(peer_source)
        py=$(peer_python)
        "$py" -c 'import numpy' 2>/dev/null || "$py" -m pip install -q numpy >&2
        mkdir -p "$SYNTHETIC"
        say "writing a random-weight $SHAPE llama (bench/synthetic_gguf.py)"
        PYTHONPATH=$src/gguf-py "$py" "$ROOT/bench/synthetic_gguf.py" --base "$BASE" \
            --shape "$SHAPE" --out "$f16.tmp" >&2
        mv "$f16.tmp" "$f16"
    fi
    echo "$f16"
}

quantize_all() {
    need_base
    local bin src=$BASE formats=$TEST_FORMATS
    bin=$(peer_build native)
    mkdir -p "$QUANT"
    if [ "$SHAPE" != smollm2 ]; then
        # The batched and HTTP figures serve Q4_1.
        src=$(synthetic_f16)
        formats="$FORMATS Q4_1"
    fi
    for t in $formats; do
        local f
        f=$(model_file "$t")
        [ -s "$f" ] && continue
        say "llama-quantize --allow-requantize -> $t"
        "$bin/llama-quantize" --allow-requantize "$src" "$f.tmp" "$t" "$THREADS" >"$RESULTS/quantize-$t.log" 2>&1 \
            || { tail -20 "$RESULTS/quantize-$t.log" >&2; return 1; }
        mv "$f.tmp" "$f"
    done
}

kernels_env() {
    case $1 in
        native) echo auto ;;
        *) echo "$1" ;;
    esac
}

# row FIGURE TESSERA LLAMA TARGET: one line of the table (the ratio is computed when printed).
row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$TABLE"; }

engine_figures() {
    local isa=$1 t=$2 f bin out
    f=$(model_file "$t")
    bin=$(peer_build "$isa")
    out=$RESULTS/llama-bench-$isa-$t.json
    say "llama-bench $isa $t"
    "$bin/llama-bench" -m "$f" -t "$THREADS" -p 512 -n 128 -o json >"$out" 2>"$out.log"
    local lpp ltg
    lpp=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(next(x["avg_ts"] for x in r if x["n_prompt"]==512))' "$out")
    ltg=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(next(x["avg_ts"] for x in r if x["n_gen"]==128))' "$out")
    out=$RESULTS/tessera-bench-$isa-$t.txt
    say "tessera-shard bench $isa $t"
    TESSERA_CPU_KERNELS=$(kernels_env "$isa") "$TESSERA/tessera-shard" bench --model-id "$f" \
        --prefill-tokens 512 --batch-sizes 1 --context 1 --steps 128 --runs "$RUNS" >"$out" 2>&1 \
        || { tail -5 "$out" >&2; row "$isa $SHAPE $t prefill 512 tok/s" error "$lpp" ">=1.0"; row "$isa $SHAPE $t decode b1 tok/s" error "$ltg" ">=1.0"; return; }
    local tpp ttg
    tpp=$(awk '/^prefill/ {print $(NF-6); exit}' "$out")
    ttg=$(awk '/^decode batch +1 / {print $(NF-6); exit}' "$out")
    row "$isa $SHAPE $t prefill 512 tok/s" "$tpp" "$lpp" ">=1.0"
    row "$isa $SHAPE $t decode b1 tok/s" "$ttg" "$ltg" ">=1.0"
}

batched_figures() {
    local isa=$1 f bin out
    f=$(model_file Q4_1)
    bin=$(peer_build "$isa")
    out=$RESULTS/llama-batched-bench-$isa.jsonl
    say "llama-batched-bench $isa"
    "$bin/llama-batched-bench" -m "$f" -t "$THREADS" -c 8192 -b 2048 -ub 512 -npp 128 -ntg 128 \
        -npl 8,32 --output-format jsonl >"$out" 2>"$out.log"
    out2=$RESULTS/tessera-batched-$isa.txt
    say "tessera-shard bench --batch-sizes 8,32 $isa"
    TESSERA_CPU_KERNELS=$(kernels_env "$isa") "$TESSERA/tessera-shard" bench --model-id "$f" \
        --prefill-tokens 16 --batch-sizes 8,32 --context 128 --steps 128 --runs 1 >"$out2" 2>&1 || tail -5 "$out2" >&2
    for b in 8 32; do
        local l t
        l=$( (grep -h '"pl": '"$b"',' "$out" "$out.log" || true) | head -1 | python3 -c 'import json,sys; l=sys.stdin.read().strip(); print(json.loads(l[l.index("{"):])["speed_tg"] if l else "error")')
        t=$(awk -v b="$b" '$1=="decode" && $3==b {print $(NF-6); exit}' "$out2")
        row "$isa $SHAPE Q4_1 decode b$b tok/s" "${t:-error}" "$l" ">=1.3"
    done
}

context_figures() {
    local isa=$1 f bin out l t
    f=$(model_file Q4_1)
    bin=$(peer_build "$isa")
    out=$RESULTS/llama-bench-context-$isa.json
    say "llama-bench $isa decode after $CONTEXT tokens"
    "$bin/llama-bench" -m "$f" -t "$THREADS" -p 0 -n 32 -d "$CONTEXT" -o json >"$out" 2>"$out.log"
    l=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["avg_ts"])' "$out" || echo error)
    out=$RESULTS/tessera-context-$isa.txt
    say "tessera-shard bench $isa decode after $CONTEXT tokens"
    TESSERA_CPU_KERNELS=$(kernels_env "$isa") "$TESSERA/tessera-shard" bench --model-id "$f" \
        --prefill-tokens 16 --batch-sizes 1 --context "$CONTEXT" --steps 32 --runs "$RUNS" >"$out" 2>&1 || tail -5 "$out" >&2
    t=$(awk '/^decode batch +1 / {print $(NF-6); exit}' "$out")
    row "$isa $SHAPE Q4_1 decode b1 after $CONTEXT tok/s" "${t:-error}" "$l" ">=1.0"
}

# Peak RSS in MiB of a process and all its descendants, summed.
tree_hwm_mib() {
    local pids=$1 all="" p
    while [ -n "$pids" ]; do
        all="$all $pids"
        local next=""
        for p in $pids; do next="$next $(pgrep -P "$p" || true)"; done
        pids=$(echo $next)
    done
    local kib=0 k
    for p in $all; do
        k=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        kib=$((kib + ${k:-0}))
    done
    echo $((kib / 1024))
}

# wait_ready URL PID START: seconds from START (date +%s.%N) until URL/health answers 200.
wait_ready() {
    local url=$1 pid=$2 start=$3 i
    for i in $(seq 1 6000); do
        if ! kill -0 "$pid" 2>/dev/null; then echo error; return; fi
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health" || true)" = 200 ]; then
            python3 -c 'import sys,time; print(round(time.time()-float(sys.argv[1]),2))' "$start"
            return
        fi
        sleep 0.02
    done
    echo error
}

stop() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# serve_and_load NAME URL PID START: ready time, load, peak RSS; prints "ready rss json".
serve_and_load() {
    local name=$1 url=$2 pid=$3 start=$4 ready load
    ready=$(wait_ready "$url" "$pid" "$start")
    if [ "$ready" = error ]; then echo "error error {}"; return; fi
    # The client shares the host's cores with the server: niced, so it never takes a core the
    # server's compute threads are waiting for (llama.cpp's spin barriers suffer most from that).
    load=$(nice -n 10 python3 "$ROOT/bench/http_load.py" --url "$url" --clients "$CLIENTS" \
        --duration "$HTTP_SECONDS" --max-tokens 64 --label "$name" || true)
    echo "$ready $(tree_hwm_mib "$pid") ${load:-{\}}"
}

field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2], "error"))' "$2" "$1"; }

http_figures() {
    local isa=$1 f bin port tpid lpid start t l
    f=$(model_file Q4_1)
    bin=$(peer_build "$isa")
    port=$(free_port)
    say "tessera-launcher $isa on :$port, $CLIENTS streaming clients for ${HTTP_SECONDS}s"
    start=$(date +%s.%N)
    TESSERA_CPU_KERNELS=$(kernels_env "$isa") "$TESSERA/tessera-launcher" --model-id "$f" \
        --hostname 127.0.0.1 --port "$port" >"$RESULTS/tessera-server-$isa.log" 2>&1 &
    tpid=$!
    t=$(serve_and_load tessera "http://127.0.0.1:$port" "$tpid" "$start")
    stop "$tpid"
    port=$(free_port)
    say "llama-server $isa on :$port, $CLIENTS streaming clients for ${HTTP_SECONDS}s"
    start=$(date +%s.%N)
    "$bin/llama-server" -m "$f" -t "$THREADS" -np 16 -cb -c 8192 --host 127.0.0.1 --port "$port" \
        --no-webui >"$RESULTS/llama-server-$isa.log" 2>&1 &
    lpid=$!
    l=$(serve_and_load llama-server "http://127.0.0.1:$port" "$lpid" "$start")
    stop "$lpid"
    echo "tessera $t" >>"$RESULTS/http-$isa.txt"
    echo "llama-server $l" >>"$RESULTS/http-$isa.txt"
    local tj=${t#* * } lj=${l#* * }
    row "$isa $SHAPE http $CLIENTS clients output tok/s" "$(field output_tok_s "$tj")" "$(field output_tok_s "$lj")" ">=1.5"
    row "$isa $SHAPE http tokens per request" "$(field tokens_per_request "$tj")" "$(field tokens_per_request "$lj")" "64"
    for k in ttft_p50_ms ttft_p99_ms itl_p50_ms itl_p99_ms; do
        row "$isa $SHAPE http $k" "$(field "$k" "$tj")" "$(field "$k" "$lj")" "lower"
    done
    row "$isa $SHAPE ready-to-serve s" "${t%% *}" "${l%% *}" "lower"
    local trss=${t#* } lrss=${l#* }
    row "$isa $SHAPE peak RSS MiB (serving)" "${trss%% *}" "${lrss%% *}" "<=1.1"
}

print_table() {
    python3 - "$TABLE" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
def ratio(t, l):
    try:
        return f"{float(t) / float(l):.2f}"
    except (ValueError, ZeroDivisionError):
        return "-"
w = max(len(r[0]) for r in rows) if rows else 10
print(f"{'figure':<{w}}  {'tessera':>10}  {'llama.cpp':>10}  {'ratio':>6}  target")
for name, t, l, target in rows:
    print(f"{name:<{w}}  {t:>10}  {l:>10}  {ratio(t, l):>6}  {target}")
EOF
}

greedy_fixture() {
    need_base
    local bin port pid
    bin=$(peer_build native)
    port=$(free_port)
    local cmd="llama-server -m smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -t $THREADS -np 1 -c 4096"
    "$bin/llama-server" -m "$BASE" -t "$THREADS" -np 1 -c 4096 --host 127.0.0.1 --port "$port" \
        --no-webui >"$RESULTS/llama-server-greedy.log" 2>&1 &
    pid=$!
    if [ "$(wait_ready "http://127.0.0.1:$port" "$pid" "$(date +%s.%N)")" = error ]; then
        tail -20 "$RESULTS/llama-server-greedy.log" >&2
        stop "$pid"
        return 1
    fi
    python3 "$ROOT/bench/llama_cpp_greedy.py" --url "http://127.0.0.1:$port" \
        --version "$(peer_version)" --model smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --command "$cmd" >"$ROOT/tests/fixtures/smollm2/llama_cpp_greedy.json" || { stop "$pid"; return 1; }
    stop "$pid"
    say "wrote tests/fixtures/smollm2/llama_cpp_greedy.json"
}

main() {
    mkdir -p "$RESULTS"
    : >"$TABLE"
    local what=${1:-all}
    case $what in
        build) build_all; return ;;
        quantize) quantize_all; return ;;
        greedy) greedy_fixture; return ;;
        all | engine | batched | context | http) ;;
        *) echo "usage: $0 [all|build|quantize|greedy|engine|batched|context|http]" >&2; exit 2 ;;
    esac
    need_base
    build_all
    quantize_all
    say "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores; llama.cpp $(peer_version); $THREADS threads"
    for isa in $ISAS; do
        if [ "$what" = all ] || [ "$what" = engine ]; then
            for t in $FORMATS; do engine_figures "$isa" "$t"; done
        fi
        if [ "$what" = all ] || [ "$what" = batched ]; then batched_figures "$isa"; fi
        if [ "$what" = all ] || [ "$what" = context ]; then context_figures "$isa"; fi
        if [ "$what" = all ] || [ "$what" = http ]; then http_figures "$isa"; fi
    done
    print_table | tee "$RESULTS/table.txt"
    say "raw outputs in $RESULTS"
}

main "$@"
