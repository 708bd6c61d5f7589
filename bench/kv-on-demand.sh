#!/usr/bin/env bash
# KV on demand against up-front reservation (issue 16), same host, same run, alternating: N OpenAI
# streaming clients that send no max_tokens (so each may grow to the whole context) against
# tessera-launcher on a KV cache smaller than N × context. Two workloads: chat questions the model
# answers and ends on its own (WORKLOAD=chat, the common case), and completions that never end
# before the context is full (WORKLOAD=completions, the worst case for on-demand: every request
# grows to the limit). Prints each run's aggregate output tokens/s, TTFT/ITL percentiles
# (bench/http_load.py) and the preemptions it took.
#
#   bash bench/kv-on-demand.sh            # dev-profile binaries in target/debug (cargo build --bins)
#   BIN=target/release ROUNDS=2 CLIENTS=64 CONTEXT=1024 KV_TOKENS=16384 SECONDS_PER_RUN=120 bash bench/kv-on-demand.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/debug}
MODEL=${MODEL:-$ROOT/.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
CLIENTS=${CLIENTS:-64}
CONTEXT=${CONTEXT:-1024}
# KV cache in tokens; SmolLM2's bf16 K/V takes 23,040 bytes a token.
KV_TOKENS=${KV_TOKENS:-16384}
BYTES_PER_TOKEN=${BYTES_PER_TOKEN:-23040}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-120}
ROUNDS=${ROUNDS:-1}
WORKLOADS=${WORKLOADS:-chat completions}
LOGS=${LOGS:-$(mktemp -d)}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_ready() {
    local url=$1 pid=$2 i
    for i in $(seq 1 3000); do
        kill -0 "$pid" 2>/dev/null || return 1
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health" || true)" = 200 ] && return 0
        sleep 0.1
    done
    return 1
}

run() {
    local mode=$1 workload=$2 port url pid load preempted chat=""
    [ "$workload" = chat ] && chat=--chat
    port=$(free_port)
    url=http://127.0.0.1:$port
    "$BIN/tessera-launcher" --model-id "$MODEL" --hostname 127.0.0.1 --port "$port" \
        --max-total-tokens "$CONTEXT" --max-concurrent-requests $((CLIENTS * 2)) \
        --kv-cache-memory $((KV_TOKENS * BYTES_PER_TOKEN)) --kv-allocation "$mode" \
        >"$LOGS/$workload-$mode.log" 2>&1 &
    pid=$!
    if ! wait_ready "$url" "$pid"; then
        echo "$mode: server did not start (log: $LOGS/$workload-$mode.log)" >&2
        kill "$pid" 2>/dev/null || true
        return 1
    fi
    load=$(nice -n 10 python3 "$ROOT/bench/http_load.py" --url "$url" --clients "$CLIENTS" \
        --duration "$SECONDS_PER_RUN" --max-tokens 0 --label "$workload $mode" $chat || true)
    preempted=$(curl -s "$url/metrics" | awk '/^tessera_request_preemptions_total/ {print $2}')
    echo "${load%\}}, \"preemptions\": ${preempted:-0}}"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

echo "# $CLIENTS clients, no max_tokens, context $CONTEXT, KV cache $KV_TOKENS tokens ($(nproc) cores; logs in $LOGS)"
for _ in $(seq 1 "$ROUNDS"); do
    for workload in $WORKLOADS; do
        run on-demand "$workload"
        run up-front "$workload"
    done
done
