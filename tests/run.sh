#!/usr/bin/env bash
# The one test command (README and .ci/run call it): fetch test models, build every binary, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/fetch-models.sh
cargo build --workspace --bins
cargo test --workspace
