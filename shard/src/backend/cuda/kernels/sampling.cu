// sampling.cu: next-token choice on the device, so only token ids cross to the host: greedy
// argmax, and top-k sampling with temperature from a host-drawn uniform per row (the host keeps
// each request's seeded RNG). Ties go to the lower id; NaN logits are never chosen (an all-NaN
// row yields id -1, which the host reports as an error).

#define NO_INDEX 0x7fffffff

// (v, i) ranks before (bv, bi): larger value, then lower index.
__device__ __forceinline__ bool ranks_before(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

// Block-wide best (value, index); every thread gets it. Scratch: one slot per warp.
__device__ void block_best(float* v, int* i, float* sv, int* si) {
    for (int o = WARP / 2; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        int oi = __shfl_xor_sync(0xffffffffu, *i, o);
        if (ranks_before(ov, oi, *v, *i)) {
            *v = ov;
            *i = oi;
        }
    }
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    __syncthreads();
    if (lane == 0) {
        sv[warp] = *v;
        si[warp] = *i;
    }
    __syncthreads();
    *v = NEG_INF;
    *i = NO_INDEX;
    for (int w = 0; w < (int)(blockDim.x / WARP); w++)
        if (ranks_before(sv[w], si[w], *v, *i)) {
            *v = sv[w];
            *i = si[w];
        }
}

// grid: (rows), block: a multiple of 32 up to 1024.
extern "C" __global__ void argmax_f32(int* out, const float* logits, int vocab) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const float* x = logits + (long long)blockIdx.x * vocab;
    float bv = NEG_INF;
    int bi = NO_INDEX;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (ranks_before(x[i], i, bv, bi)) {
            bv = x[i];
            bi = i;
        }
    block_best(&bv, &bi, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = bi == NO_INDEX ? -1 : bi;
}

// grid: (rows), block: a multiple of 32 up to 1024. Per row: temperature > 0, top_k in
// 1..=TESSERA_MAX_TOP_K (clamped), uniform in [0, 1). The k best are found by k block-wide
// passes, each taking the best element ranked after the previous one.
extern "C" __global__ void topk_sample_f32(int* out, const float* logits, int vocab,
                                           const float* temperature, const int* top_k,
                                           const float* uniform) {
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float top_v[TESSERA_MAX_TOP_K];
    __shared__ int top_i[TESSERA_MAX_TOP_K];
    int row = blockIdx.x;
    const float* x = logits + (long long)row * vocab;
    int k = min(min(max(top_k[row], 1), TESSERA_MAX_TOP_K), vocab);
    float prev_v = __int_as_float(0x7f800000);
    int prev_i = -1, found = 0;
    for (int it = 0; it < k; it++) {
        float bv = NEG_INF;
        int bi = NO_INDEX;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float v = x[i];
            bool after = v < prev_v || (v == prev_v && i > prev_i);
            if (after && ranks_before(v, i, bv, bi)) {
                bv = v;
                bi = i;
            }
        }
        block_best(&bv, &bi, sv, si);
        if (bi == NO_INDEX) break;  // fewer than k non-NaN logits
        if (threadIdx.x == 0) {
            top_v[it] = bv;
            top_i[it] = bi;
        }
        prev_v = bv;
        prev_i = bi;
        found = it + 1;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    if (found == 0) {
        out[row] = -1;
        return;
    }
    float inv_t = 1.0f / temperature[row], z = 0.0f;
    for (int j = 0; j < found; j++) z += expf((top_v[j] - top_v[0]) * inv_t);
    float target = uniform[row] * z, cum = 0.0f;
    int pick = found - 1;
    for (int j = 0; j < found; j++) {
        cum += expf((top_v[j] - top_v[0]) * inv_t);
        if (cum > target) {
            pick = j;
            break;
        }
    }
    out[row] = top_i[pick];
}
