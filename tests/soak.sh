#!/usr/bin/env bash
# Soak test: the launcher serves the SmolLM2 GGUF on one CPU shard, then `tessera-bench --soak` sends a
# mix of valid, invalid, cancelled, streaming, n > 1, stop-sequence and long-prompt requests and fails
# when one is lost, a 5xx comes back or the KV blocks do not return after the drain.
#
#   tests/soak.sh [REQUESTS] [CONCURRENCY]     (default 300 16; PROFILE=release for target/release)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
requests=${1:-300}
concurrency=${2:-16}
bin_dir=$root/target/${PROFILE:-debug}
model=$root/.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || { echo "missing $model: run bash tests/fetch-models.sh" >&2; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
work=$(mktemp -d)
"$bin_dir/tessera-launcher" --model-id "$model" --device cpu --max-batch-prefill-tokens 1024 \
  --hostname 127.0.0.1 --port "$port" --master-port "$(free_port)" --shard-uds-path "$work/shard" \
  >"$work/log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT

url=http://127.0.0.1:$port
for _ in $(seq 1 600); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health" || true)" = 200 ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/log" >&2; echo "the launcher exited before it was ready" >&2; exit 1; }
  sleep 0.5
done
# The launcher's own children (other routers may run on this machine), by the names it gives them.
children_named() {
  for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
    if [ "$(cat /proc/"$child"/comm 2>/dev/null)" = "$1" ]; then printf "%s," "$child"; fi
  done | sed 's/,$//'
}
pids=()
router_pids=$(children_named tessera-router)
shard_pids=$(children_named tessera-shard)
[ -n "$router_pids" ] && pids+=(--router-pid "$router_pids")
[ -n "$shard_pids" ] && pids+=(--shard-pid "$shard_pids")
"$bin_dir/tessera-bench" --url "$url" --soak "$requests" --concurrency "$concurrency" "${pids[@]}" || {
  tail -n 40 "$work/log" >&2
  exit 1
}
