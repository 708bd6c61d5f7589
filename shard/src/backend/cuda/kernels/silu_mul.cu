// silu_mul.cu: SwiGLU's activation on the fused gate|up projection: each row of `gate_up` is
// [gate (ff) | up (ff)] and out = silu(gate) * up, as the CPU backend's `gated` computes it.

template <typename T>
__device__ void silu_mul(T* out, const T* gate_up, long long n, int ff) {
    long long total = n * ff;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long row = i / ff, col = i % ff;
        float g = to_f32(gate_up[row * 2 * ff + col]);
        float u = to_f32(gate_up[row * 2 * ff + ff + col]);
        out[i] = from_f32<T>(g / (1.0f + expf(-g)) * u);
    }
}

// Grid-stride: any grid and block.
#define SILU_MUL(S, T)                                                                       \
    extern "C" __global__ void silu_mul_##S(T* out, const T* gate_up, long long n, int ff) { \
        silu_mul<T>(out, gate_up, n, ff);                                                   \
    }
FOR_EACH_DTYPE(SILU_MUL)
