#!/usr/bin/env bash
# Writes the /metrics text of a live router to FILE, for `.ci/deploy-checks.sh --scrape FILE`: the launcher
# serves the SmolLM2 GGUF (from tests/fetch-models.sh) on one CPU shard, then traffic touches every family of
# metrics the dashboard and rules read (a generation, a stream, an OpenAI chat, a validation error). The
# router also serves the text on `--prometheus-port`; both ports must list the same series.
#
#   deploy/tools/scrape-router.sh FILE        (BIN selects the launcher; default target/debug/tessera-launcher)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$(realpath -m "${1:?usage: $0 METRICS_FILE}")
bin=${BIN:-$root/target/debug/tessera-launcher}
model=$root/.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || { echo "missing $model: run bash tests/fetch-models.sh" >&2; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
prometheus_port=$(free_port)
work=$(mktemp -d)
"$bin" --model-id "$model" --device cpu --max-batch-prefill-tokens 256 --hostname 127.0.0.1 \
  --port "$port" --prometheus-port "$prometheus_port" --master-port "$(free_port)" \
  --shard-uds-path "$work/shard" >"$work/log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT

url=http://127.0.0.1:$port
for _ in $(seq 1 600); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health" || true)" = 200 ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/log" >&2; echo "the launcher exited before it was ready" >&2; exit 1; }
  sleep 0.5
done
post() { curl -sS -o /dev/null -w '%{http_code}' "$url$1" -H 'Content-Type: application/json' -d "$2"; }
expect() { [ "$1" = "$2" ] || { echo "$3 answered $1, expected $2" >&2; exit 1; }; }
expect "$(post /generate '{"inputs":"Once upon a time","parameters":{"max_new_tokens":8}}')" 200 /generate
expect "$(post /generate_stream '{"inputs":"The sky is","parameters":{"max_new_tokens":8}}')" 200 /generate_stream
expect "$(post /v1/chat/completions '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":4}')" 200 \
  /v1/chat/completions
expect "$(post /generate '{"inputs":"x","parameters":{"temperature":-1}}')" 422 "an invalid /generate"
curl -fsS "$url/metrics" >"$out"
# Sample names with labels, without values: the two scrapes are moments apart, so counts may differ.
series() { grep -v '^#' "$1" | sed 's/ [^ ]*$//' | sort; }
curl -fsS "http://127.0.0.1:$prometheus_port/metrics" >"$work/prometheus-port"
if ! diff <(series "$out") <(series "$work/prometheus-port") >"$work/diff"; then
  cat "$work/diff" >&2
  echo "--prometheus-port $prometheus_port lists other series than $url/metrics" >&2
  exit 1
fi
echo "scraped $(grep -c -v '^#' "$out") samples from a live router into $out (the same series on --prometheus-port)"
