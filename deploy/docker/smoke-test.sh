#!/usr/bin/env bash
# Smoke test of a built image: starts it with podman, waits for /health, checks that /generate answers with
# generated text and /metrics serves the router's metrics, then stops it with SIGTERM and checks that it exits
# cleanly within the drain timeout.
#
#   deploy/docker/smoke-test.sh [IMAGE]        (default: localhost/tessera:cpu)
#
# Model: when the test models exist (.cache/models, made by tests/fetch-models.sh), the SmolLM2 GGUF is
# mounted read-only and served, so no download happens; otherwise the launcher's default model is fetched
# into the container's /data. SMOKE_MODEL_ID / SMOKE_MODEL_DIR override both.
# SMOKE_SCRAPE_OUT=FILE keeps the /metrics text (input for .ci/deploy-checks.sh --scrape FILE).
# PODMAN (default "podman") and SMOKE_RUN_ARGS pass runtime settings, e.g. in a VM where crun refuses
# hybrid cgroups and raising rlimits is not permitted:
#   PODMAN="podman --runtime runc" SMOKE_RUN_ARGS="--ulimit nofile=20000:20000 --ulimit nproc=4096:4096"
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
image=${1:-localhost/tessera:cpu}
port=${SMOKE_PORT:-18080}
start_timeout=${SMOKE_START_TIMEOUT:-900}
stop_timeout=${SMOKE_STOP_TIMEOUT:-100}
name=tessera-smoke-$$
read -r -a podman <<<"${PODMAN:-podman}"
read -r -a extra <<<"${SMOKE_RUN_ARGS:-}"

gguf=$root/.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
model_dir=${SMOKE_MODEL_DIR:-}
model_id=${SMOKE_MODEL_ID:-}
if [ -z "$model_dir$model_id" ] && [ -f "$gguf" ]; then
  model_dir=$(dirname "$gguf")
  model_id=/models/$(basename "$gguf")
fi
args=("${extra[@]}" --name "$name" --detach --publish "127.0.0.1:$port:8080"
      --env HOSTNAME=0.0.0.0 --env MAX_TOTAL_TOKENS=512 --env MAX_INPUT_TOKENS=256)
[ -n "$model_dir" ] && args+=(--volume "$model_dir:/models:ro")
[ -n "$model_id" ] && args+=(--env "MODEL_ID=$model_id")

fail() { echo "smoke: FAIL: $*" >&2; "${podman[@]}" logs --tail 60 "$name" >&2 2>&1 || true; exit 1; }
cleanup() { "${podman[@]}" rm --force --time 0 "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "smoke: starting $image (model: ${model_id:-launcher default})"
"${podman[@]}" run "${args[@]}" "$image" >/dev/null

# 1. Ready: /health answers 200 (503 while shards warm up; connection refused before the router listens).
deadline=$((SECONDS + start_timeout))
until curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; do
  [ "$("${podman[@]}" inspect --format '{{.State.Running}}' "$name")" = true ] || fail "container exited before /health answered"
  [ $SECONDS -lt $deadline ] || fail "/health not 200 after ${start_timeout}s"
  sleep 2
done
echo "smoke: /health ok after ${SECONDS}s"

# 2. /generate returns TGI's shape with some generated text (greedy, so the answer is deterministic).
body=$(curl -fsS --max-time 120 "http://127.0.0.1:$port/generate" -H 'Content-Type: application/json' \
  -d '{"inputs":"The capital of France is","parameters":{"max_new_tokens":8,"details":true}}') \
  || fail "/generate did not answer 200"
python3 - "$body" <<'PY' || fail "/generate answered $body"
import json, sys
r = json.loads(sys.argv[1])
assert isinstance(r.get("generated_text"), str) and r["generated_text"].strip(), "empty generated_text"
assert r["details"]["generated_tokens"] >= 1, "no generated tokens"
print("smoke: /generate ->", json.dumps(r["generated_text"]))
PY

# 3. /metrics is Prometheus text with the router's request counter.
metrics=$(curl -fsS "http://127.0.0.1:$port/metrics") || fail "/metrics did not answer 200"
grep -Eq '^tgi_request_count [0-9]' <<<"$metrics" || fail "/metrics has no tgi_request_count (TGI's name, no _total)"
[ -n "${SMOKE_SCRAPE_OUT:-}" ] && printf '%s\n' "$metrics" >"$SMOKE_SCRAPE_OUT"

# 4. Graceful stop: SIGTERM (via tini) drains and the launcher exits 0 before podman's SIGKILL.
start=$SECONDS
"${podman[@]}" stop --time "$stop_timeout" "$name" >/dev/null
code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
echo "smoke: stopped cleanly in $((SECONDS - start))s"
echo "smoke: PASS"
