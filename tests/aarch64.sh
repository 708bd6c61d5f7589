#!/usr/bin/env bash
# The aarch64 kernels under qemu-aarch64: the shard's unit tests (every integer kernel set against f32
# arithmetic, exp, matmuls) and llama.cpp's greedy ids on the default model, cross-built for
# aarch64-unknown-linux-gnu, once on qemu's default CPU (it has the dot-product extension: the NEON
# `sdot` kernels run) and once as a Cortex-A53 (Armv8.0, no dot product: the portable kernels run).
# Needs rustup's aarch64 target and Debian's gcc-aarch64-linux-gnu and qemu-user: adds the target and,
# as root with apt-get, installs the packages; when it cannot get them it says so and exits 75
# (tests/run.sh then skips these tests, naming what was missing).
set -euo pipefail
cd "$(dirname "$0")/.."
unavailable() {
  echo "aarch64.sh: $1; the aarch64 tests did not run" >&2
  exit 75
}
target=aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx "$target" || timeout 600 rustup target add "$target" ||
  unavailable "rustup could not add $target"
need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || unavailable "install ${need[*]} (Debian/Ubuntu)"
  { timeout 600 apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "${need[@]}" >/dev/null; } ||
    unavailable "apt-get could not install ${need[*]}"
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
cargo test --target "$target" -p tessera-shard --lib --test llama_cpp_greedy
QEMU_CPU=cortex-a53 cargo test --target "$target" -p tessera-shard --lib --test llama_cpp_greedy
