// paged_attention_decode.cu: attention of one new token per sequence over its paged KV cache,
// flash-decoding style (Dao et al. 2023, "Flash-Decoding for long-context inference"): the
// sequence's positions are split into chunks of `blocks_per_split` cache blocks, each chunk is a
// CTA computing a partial softmax-weighted sum with its log-sum-exp, and a reduce kernel combines
// the chunks. Within a CTA each warp takes positions in turn with an online softmax (Milakov &
// Gimelshein 2018), and the warps are merged through shared memory. GQA: query head h reads KV
// head h / (num_heads / num_kv_heads). The sliding window keeps positions > pos - window, as
// layers/attention.rs does.

template <typename T>
__device__ void decode_split(float* part_out, float* part_lse, const T* q, long long q_stride,
                             const T* k_cache, const T* v_cache, const int* block_tables,
                             int bt_stride, const int* context_lens, int num_heads,
                             int num_kv_heads, int head_dim, int block_size,
                             int blocks_per_split, int window, float scale) {
    __shared__ float sm_m[TESSERA_DECODE_THREADS / WARP], sm_l[TESSERA_DECODE_THREADS / WARP];
    __shared__ float sm_acc[TESSERA_DECODE_THREADS / WARP][TESSERA_MAX_HEAD_DIM];
    int head = blockIdx.x, seq = blockIdx.y, split = blockIdx.z;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    int ctx = context_lens[seq];
    int lo = window > 0 ? max(0, ctx - window) : 0;
    int begin = max(lo, split * blocks_per_split * block_size);
    int end = min(ctx, (split + 1) * blocks_per_split * block_size);
    int kv_head = head / (num_heads / num_kv_heads);
    int kv_dim = num_kv_heads * head_dim;
    const int* table = block_tables + (long long)seq * bt_stride;

    float qr[LANE_DIMS], acc[LANE_DIMS];
    const T* qrow = q + seq * q_stride + head * head_dim;
#pragma unroll
    for (int j = 0; j < LANE_DIMS; j++) {
        int d = lane + j * WARP;
        qr[j] = d < head_dim ? to_f32(qrow[d]) * scale : 0.0f;
        acc[j] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int p = begin + warp; p < end; p += warps) {
        long long base = slot_of(table, p, block_size) * kv_dim + kv_head * head_dim;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < LANE_DIMS; j++) {
            int d = lane + j * WARP;
            if (d < head_dim) s += qr[j] * to_f32(k_cache[base + d]);
        }
        s = warp_sum(s);
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new), w = expf(s - m_new);
        l = l * corr + w;
#pragma unroll
        for (int j = 0; j < LANE_DIMS; j++) {
            int d = lane + j * WARP;
            if (d < head_dim) acc[j] = acc[j] * corr + w * to_f32(v_cache[base + d]);
        }
        m = m_new;
    }

    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < LANE_DIMS; j++) {
        int d = lane + j * WARP;
        if (d < head_dim) sm_acc[warp][d] = acc[j];
    }
    __syncthreads();
    long long part = ((long long)seq * num_heads + head) * gridDim.z + split;
    float* out = part_out + part * head_dim;
    float gm = NEG_INF;
    for (int w = 0; w < warps; w++) gm = fmaxf(gm, sm_m[w]);
    if (gm == NEG_INF) {
        // Nothing visible in this chunk (past the end, or before the window): weight zero.
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) out[d] = 0.0f;
        if (threadIdx.x == 0) part_lse[part] = NEG_INF;
        return;
    }
    float gl = 0.0f;
    for (int w = 0; w < warps; w++) gl += sm_l[w] * expf(sm_m[w] - gm);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < warps; w++) o += sm_acc[w][d] * expf(sm_m[w] - gm);
        out[d] = o / gl;
    }
    if (threadIdx.x == 0) part_lse[part] = gm + logf(gl);
}

template <typename T>
__device__ void decode_reduce(T* out, long long out_stride, const float* part_out,
                              const float* part_lse, int num_heads, int head_dim,
                              int max_splits) {
    int head = blockIdx.x, seq = blockIdx.y;
    long long base = ((long long)seq * num_heads + head) * max_splits;
    float gm = NEG_INF;
    for (int s = 0; s < max_splits; s++) gm = fmaxf(gm, part_lse[base + s]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f, z = 0.0f;
        for (int s = 0; s < max_splits; s++) {
            float lse = part_lse[base + s];
            if (lse == NEG_INF) continue;
            float w = expf(lse - gm);
            z += w;
            o += w * part_out[(base + s) * head_dim + d];
        }
        out[seq * out_stride + head * head_dim + d] = from_f32<T>(z > 0.0f ? o / z : 0.0f);
    }
}

// Split: grid (num_heads, num_seqs, max_splits), block TESSERA_DECODE_THREADS. Workspace:
// part_out [num_seqs, num_heads, max_splits, head_dim] and part_lse [.., max_splits], f32.
// Reduce: grid (num_heads, num_seqs), block: any multiple of 32.
#define DECODE(S, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(TESSERA_DECODE_THREADS)                    \
        paged_attention_decode_split_##S(                                                   \
            float* part_out, float* part_lse, const T* q, long long q_stride,               \
            const T* k_cache, const T* v_cache, const int* block_tables, int bt_stride,     \
            const int* context_lens, int num_heads, int num_kv_heads, int head_dim,         \
            int block_size, int blocks_per_split, int window, float scale) {                \
        decode_split<T>(part_out, part_lse, q, q_stride, k_cache, v_cache, block_tables,    \
                        bt_stride, context_lens, num_heads, num_kv_heads, head_dim,         \
                        block_size, blocks_per_split, window, scale);                       \
    }                                                                                        \
    extern "C" __global__ void paged_attention_decode_reduce_##S(                           \
        T* out, long long out_stride, const float* part_out, const float* part_lse,         \
        int num_heads, int head_dim, int max_splits) {                                      \
        decode_reduce<T>(out, out_stride, part_out, part_lse, num_heads, head_dim,          \
                         max_splits);                                                       \
    }
FOR_EACH_DTYPE(DECODE)
