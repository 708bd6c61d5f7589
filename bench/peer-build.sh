#!/usr/bin/env bash
# Builds the peer, llama.cpp, from the source that the PyPI sdist of llama-cpp-python vendors, into
# .cache/peer: build-native (every ISA this host has: AVX-512, VNNI, AMX) and build-avx2 (AVX2/FMA/F16C
# only, the path of a host without AVX-512). A build whose stamp matches (sdist version + flags) is kept.
#
#   bash bench/peer-build.sh [native|avx2|all]     (default all)
#
# Sourced by bench/compare-llama-cpp.sh; JOBS (default 2) sets ninja's parallelism.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEER=$ROOT/.cache/peer
VENV=$ROOT/.cache/venv
JOBS=${JOBS:-2}
PEER_TARGETS=(llama-bench llama-batched-bench llama-server llama-quantize llama-simple)

peer_python() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    echo "$VENV/bin/python"
}

# The unpacked sdist's llama.cpp folder; downloads the sdist once. --no-build-isolation with
# scikit-build-core installed keeps pip from building cmake from source just to read metadata.
peer_source() {
    local py
    py=$(peer_python)
    mkdir -p "$PEER"
    local sdist
    sdist=$(ls "$PEER"/llama_cpp_python-*.tar.gz 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$sdist" ]; then
        # Reading the sdist's metadata runs scikit-build-core, which looks for cmake on PATH.
        peer_tools
        "$py" -m pip install -q scikit-build-core >&2
        PATH=$VENV/bin:$PATH "$py" -m pip download -q --no-deps --no-binary :all: \
            --no-build-isolation llama-cpp-python -d "$PEER" >&2
        sdist=$(ls "$PEER"/llama_cpp_python-*.tar.gz | sort -V | tail -1)
    fi
    local dir=${sdist%.tar.gz}
    if [ ! -f "$dir/vendor/llama.cpp/CMakeLists.txt" ]; then
        tar xzf "$sdist" -C "$PEER" >&2
    fi
    echo "$dir/vendor/llama.cpp"
}

# llama-cpp-python's version, which names the vendored llama.cpp.
peer_version() {
    local src
    src=$(peer_source)
    basename "$(dirname "$(dirname "$src")")" | sed 's/^llama_cpp_python-//'
}

peer_tools() {
    local py
    py=$(peer_python)
    if [ ! -x "$VENV/bin/cmake" ] || [ ! -x "$VENV/bin/ninja" ]; then
        "$py" -m pip install -q --only-binary :all: cmake ninja >&2
    fi
}

# peer_build native|avx2: builds (or keeps) .cache/peer/build-<variant>, prints its bin folder.
peer_build() {
    local variant=$1 src dir flags
    src=$(peer_source)
    peer_tools
    dir=$PEER/build-$variant
    # GCC 12 miscompiles ggml's AMX code under dead-store elimination.
    flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
        "-DCMAKE_C_FLAGS=-fno-tree-dse -fno-dse" "-DCMAKE_CXX_FLAGS=-fno-tree-dse -fno-dse"
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=ON)
    case $variant in
        native) flags+=(-DGGML_NATIVE=ON) ;;
        avx2) flags+=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
            -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
            -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
            -DGGML_AMX_BF16=OFF) ;;
        *) echo "peer_build: unknown variant $variant (native|avx2)" >&2; return 2 ;;
    esac
    local stamp
    stamp="$(peer_version) ${flags[*]} ${PEER_TARGETS[*]}"
    local have=1
    for t in "${PEER_TARGETS[@]}"; do [ -x "$dir/bin/$t" ] || have=0; done
    if [ $have = 1 ] && [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$stamp" ]; then
        echo "$dir/bin"
        return
    fi
    echo "building llama.cpp $(peer_version) ($variant) in $dir with -j$JOBS ..." >&2
    PATH=$VENV/bin:$PATH cmake -S "$src" -B "$dir" -G Ninja "${flags[@]}" >"$PEER/cmake-$variant.log" 2>&1 \
        || { tail -30 "$PEER/cmake-$variant.log" >&2; return 1; }
    PATH=$VENV/bin:$PATH ninja -C "$dir" -j"$JOBS" "${PEER_TARGETS[@]}" >"$PEER/ninja-$variant.log" 2>&1 \
        || { tail -30 "$PEER/ninja-$variant.log" >&2; return 1; }
    echo "$stamp" >"$dir/.stamp"
    echo "$dir/bin"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case ${1:-all} in
        all) peer_build native; peer_build avx2 ;;
        native | avx2) peer_build "$1" ;;
        *) echo "usage: $0 [native|avx2|all]" >&2; exit 2 ;;
    esac
fi
