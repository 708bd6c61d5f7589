#!/usr/bin/env bash
# gpu-check.sh: the prepared device check for a session that is lent a GPU. NOT YET RUN: no session
# so far had a GPU (docs/cuda.md says what was verified on CPU only). Two halves:
#   bash shard/src/backend/cuda/gpu-check.sh host    # on the CPU machine: build, strip, stage carry
#   bash shard/src/backend/cuda/gpu-check.sh device  # on the GPU machine, with the staged paths carried
# The device half needs no cargo and no network: it runs what the host half staged in .cache/gpu-check/
# (stripped binaries and NVRTC as an xz tarball, since the 106 MB library exceeds the 64 MiB carry).
# Carry: .cache/gpu-check (check the `du` line the host half prints: it must stay under 64 MiB).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../../.." && pwd)
stage=$root/.cache/gpu-check
nvrtc=$root/.cache/nvrtc/nvidia/cuda_nvrtc/lib
cd "$root"

host() {
  bash tests/fetch-models.sh >/dev/null   # NVRTC into .cache/nvrtc
  cargo build --release -p tessera-shard --bin tessera-shard
  # The NVRTC compile test binary, built but not run here.
  cargo test --release -p tessera-shard --test cuda_nvrtc --no-run \
    --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("profile", {}).get("test") and m.get("executable"): print(m["executable"])' \
    >"$root/.cache/gpu-check.list"
  rm -rf "$stage" && mkdir -p "$stage"
  cp target/release/tessera-shard "$stage/"
  while read -r exe; do cp "$exe" "$stage/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"; done \
    <"$root/.cache/gpu-check.list"
  strip "$stage"/*
  tar -C "$nvrtc" -cJf "$stage/nvrtc.tar.xz" libnvrtc.so.12 libnvrtc-builtins.so.12.9
  du -sh "$stage"
  echo "carry: .cache/gpu-check"
}

device() {
  out=${OUT:-/tmp/gpu-check}
  mkdir -p "$out"
  mkdir -p /tmp/tessera-nvrtc && tar -C /tmp/tessera-nvrtc -xJf "$stage/nvrtc.tar.xz"
  export TESSERA_NVRTC_DIR=/tmp/tessera-nvrtc TESSERA_KERNEL_CACHE=$out/kernels
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$out/gpu.csv"
  # 1. Discovery on a real driver. Expected today: one line "found GPU 0 (...), but the CUDA model
  #    path is not yet available", exit 1 (the honest answer until the engine lands).
  "$stage/tessera-shard" random-model --shape tiny --out "$out/tiny" --seed 1
  "$stage/tessera-shard" generate --model-id "$out/tiny" --prompt "w5 w6" --device cuda \
    2>&1 | tee "$out/device-cuda.txt" || true
  # 2. NVRTC of this machine's driver compiles every kernel (sm_80 and sm_90 PTX); the driver's CUDA
  #    version must be at least NVRTC's (12.9) for the PTX to JIT, see docs/cuda.md.
  "$stage/cuda_nvrtc" --test-threads=1 2>&1 | tee "$out/nvrtc.txt"
  # 3. Once the CUDA engine exists (docs/cuda.md, "What remains"), the same session runs:
  #    kernel parity (a cuda_kernels test against the CPU layers on awkward sizes), SmolLM2 parity
  #    against tests/fixtures/smollm2/reference.json, then the benchmark on a random Llama-3-8B:
  #    "$stage/tessera-shard" random-model --shape llama3-8b --dtype bf16 --out "$out/l8b" --seed 0
  #    "$stage/tessera-shard" bench --model-id "$out/l8b" --device cuda --batch-sizes 1,8,32,64 \
  #      --prefill-tokens 2048
  # Those commands are comments because the CUDA model path they need does not exist yet.
}

case "${1:-}" in
  host) host ;;
  device) device ;;
  *) echo "usage: $0 host|device" >&2; exit 2 ;;
esac
