#!/usr/bin/env bash
# The one test command (README and .ci/run call it): fetch test models, check style (rustfmt, clippy with
# warnings as errors), build every binary, run every test, then the deployment checks (Dockerfiles,
# Kubernetes, Prometheus rules, dashboard) against a live router.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/fetch-models.sh
# Third-party corpora (stories260K, llama.cpp's vocab files, chat templates) are not redistributed: the
# tests that read them run when ../shared (or $TESSERA_SHARED) is there, as in CI, and skip otherwise.
shared=${TESSERA_SHARED:-../shared}
[ -d "$shared" ] || echo "note: $shared not found: the tests that read its corpora are skipped (each prints a line with --nocapture)"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace
# The aarch64 kernels (NEON) under qemu: always in CI, which installs the cross tools (exit 75: they could
# not be had, which is named and skipped, not a test failure); elsewhere when the tools are present.
if [ "${CI:-}" = true ] || { command -v qemu-aarch64 && command -v aarch64-linux-gnu-gcc; } >/dev/null; then
  bash tests/aarch64.sh || { rc=$?; [ "$rc" = 75 ] || exit "$rc"; }
else
  echo "note: qemu-aarch64 or aarch64-linux-gnu-gcc not found: the aarch64 kernel tests (tests/aarch64.sh) are skipped"
fi
# Client compatibility (official `openai` SDK, `huggingface_hub`) and schemathesis-style HTTP fuzzing from
# the router's own OpenAPI document, against the real router, installed into the venv fetch-models.sh
# made (.cache/venv).
.cache/venv/bin/pip install -q openai huggingface_hub pytest schemathesis jsonschema requests
.cache/venv/bin/pytest -q tests/python
# Soak: a mix of valid, invalid, cancelled, streaming, n > 1, stop and long requests; no request lost,
# no 5xx, KV blocks back to idle after the drain.
bash tests/soak.sh 300 16
# Deployment: every metric the dashboard, rules and autoscaler read is in a live router's /metrics.
bash deploy/tools/scrape-router.sh .cache/router-metrics.txt
bash .ci/deploy-checks.sh --scrape .cache/router-metrics.txt
