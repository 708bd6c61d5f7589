#!/usr/bin/env bash
# Measures a launch: seconds from start to the router's /health 200, and peak memory summed over the
# launcher, its shards and its router (RSS sampled every 50 ms through startup and one 32-token /generate;
# also the sum of each process's own peak, VmHWM). Usage: launcher/measure-startup.sh [launcher flags...]
# BIN selects the binary (default target/release/tessera-launcher), PORT the port (default 3999).
set -euo pipefail
bin=${BIN:-target/release/tessera-launcher}
port=${PORT:-3999}
log=$(mktemp)
"$bin" --hostname 127.0.0.1 --port "$port" "$@" 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
start=$(date +%s.%N)

# Pids of the launcher and its children.
tree() { echo "$pid"; ps -o pid= --ppid "$pid" 2>/dev/null || true; }
# Sum of RSS (KiB) over the tree.
rss_sum() { local s=0 p; for p in $(tree); do s=$((s + $(awk '/^VmRSS/{print $2}' /proc/"$p"/status 2>/dev/null || echo 0))); done; echo $s; }
peak=0
sample() { local r; r=$(rss_sum); if [ "$r" -gt "$peak" ]; then peak=$r; fi; }

until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" || true)" = 200 ]; do
  kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "launcher exited before ready" >&2; exit 1; }
  sample
  sleep 0.05
done
ready=$(echo "$(date +%s.%N) - $start" | bc)
curl -s "http://127.0.0.1:$port/generate" -H 'content-type: application/json' \
  -d '{"inputs":"Once upon a time","parameters":{"max_new_tokens":32}}' >/dev/null &
req=$!
while kill -0 "$req" 2>/dev/null; do sample; sleep 0.05; done
hwm=0
for p in $(tree); do hwm=$((hwm + $(awk '/^VmHWM/{print $2}' /proc/"$p"/status 2>/dev/null || echo 0))); done
printf 'ready_s=%.1f peak_rss_sum_mib=%d sum_of_vmhwm_mib=%d processes=%d\n' \
  "$ready" $((peak / 1024)) $((hwm / 1024)) "$(tree | wc -l)"
kill -TERM "$pid"
wait "$pid"
trap - EXIT
