// rms_norm.cu: RMSNorm (Zhang & Sennrich 2019) fused with the residual add, as Llama uses it:
// residual += x (when x is given), then out = residual / sqrt(mean(residual^2) + eps) * w.
// The residual stream stays f32; `out` is the storage type the next GEMM reads.

template <typename T>
__device__ void rms_norm_residual(T* out, float* residual, const T* x, const T* weight, int dim,
                                  float eps) {
    __shared__ float scratch[32];
    long long row = blockIdx.x;
    float* r = residual + row * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = r[i];
        if (x != 0) {
            v += to_f32(x[row * dim + i]);
            r[i] = v;
        }
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        out[row * dim + i] = from_f32<T>(to_f32(weight[i]) * (r[i] * inv));
}

// grid: (rows), block: a multiple of 32 up to 1024. `x` may be null (first layer: no add).
#define RMS_NORM(S, T)                                                                       \
    extern "C" __global__ void rms_norm_residual_##S(T* out, float* residual, const T* x,   \
                                                     const T* weight, int dim, float eps) { \
        rms_norm_residual<T>(out, residual, x, weight, dim, eps);                           \
    }
FOR_EACH_DTYPE(RMS_NORM)
