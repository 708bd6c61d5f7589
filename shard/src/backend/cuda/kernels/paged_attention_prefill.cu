// paged_attention_prefill.cu: causal attention of a ragged batch of query chunks over their
// paged KV cache (the chunk's own K/V are written to the cache first, so a cached prefix and the
// new tokens are read the same way, through the block table). FlashAttention-style tiling (Dao et
// al. 2022): a CTA owns TESSERA_PREFILL_BQ query rows of one head, walks the visible positions in
// tiles of TESSERA_PREFILL_BK K/V rows staged in shared memory, and keeps an online softmax per
// row. Each warp owns BQ / warps rows; its lanes split head_dim. Semantics are those of
// layers/attention.rs: query i of a sequence is at position context_len - q_len + i and sees
// positions (pos - window, pos] (all of 0..=pos without a window); GQA maps head h to KV head
// h / (num_heads / num_kv_heads).

#define PREFILL_WARPS (TESSERA_PREFILL_THREADS / WARP)
#define PREFILL_ROWS (TESSERA_PREFILL_BQ / PREFILL_WARPS)

template <typename T>
__device__ void prefill(T* out, long long out_stride, const T* q, long long q_stride,
                        const T* k_cache, const T* v_cache, const int* block_tables,
                        int bt_stride, const int* cu_seqlens_q, const int* context_lens,
                        int num_heads, int num_kv_heads, int head_dim, int block_size,
                        int window, float scale) {
    __shared__ float ks[TESSERA_PREFILL_BK][TESSERA_MAX_HEAD_DIM];
    __shared__ float vs[TESSERA_PREFILL_BK][TESSERA_MAX_HEAD_DIM];
    __shared__ long long rows_at[TESSERA_PREFILL_BK];
    int tile = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
    int q0 = cu_seqlens_q[seq], q_len = cu_seqlens_q[seq + 1] - q0;
    int row0 = tile * TESSERA_PREFILL_BQ;
    if (row0 >= q_len) return;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int start = context_lens[seq] - q_len;
    int kv_head = head / (num_heads / num_kv_heads);
    int kv_dim = num_kv_heads * head_dim;
    const int* table = block_tables + (long long)seq * bt_stride;

    float qr[PREFILL_ROWS][LANE_DIMS], acc[PREFILL_ROWS][LANE_DIMS];
    float m[PREFILL_ROWS], l[PREFILL_ROWS];
    int pos[PREFILL_ROWS];
#pragma unroll
    for (int r = 0; r < PREFILL_ROWS; r++) {
        int i = row0 + warp * PREFILL_ROWS + r;
        pos[r] = i < q_len ? start + i : -1;  // -1: no row here (warp-uniform)
        m[r] = NEG_INF;
        l[r] = 0.0f;
        const T* qrow = q + (q0 + (long long)i) * q_stride + head * head_dim;
#pragma unroll
        for (int j = 0; j < LANE_DIMS; j++) {
            int d = lane + j * WARP;
            qr[r][j] = (pos[r] >= 0 && d < head_dim) ? to_f32(qrow[d]) * scale : 0.0f;
            acc[r][j] = 0.0f;
        }
    }
    int kv_hi = start + min(q_len, row0 + TESSERA_PREFILL_BQ);  // exclusive
    int kv_lo = window > 0 ? max(0, start + row0 + 1 - window) : 0;

    for (int k0 = kv_lo; k0 < kv_hi; k0 += TESSERA_PREFILL_BK) {
        int cnt = min(TESSERA_PREFILL_BK, kv_hi - k0);
        __syncthreads();  // the previous tile is no longer read
        if (threadIdx.x < cnt)
            rows_at[threadIdx.x] =
                slot_of(table, k0 + threadIdx.x, block_size) * kv_dim + kv_head * head_dim;
        __syncthreads();
        for (int idx = threadIdx.x; idx < cnt * head_dim; idx += blockDim.x) {
            int j = idx / head_dim, d = idx % head_dim;
            ks[j][d] = to_f32(k_cache[rows_at[j] + d]);
            vs[j][d] = to_f32(v_cache[rows_at[j] + d]);
        }
        __syncthreads();
        for (int j = 0; j < cnt; j++) {
            int p = k0 + j;
#pragma unroll
            for (int r = 0; r < PREFILL_ROWS; r++) {
                if (pos[r] < 0 || p > pos[r] || (window > 0 && p <= pos[r] - window)) continue;
                float s = 0.0f;
#pragma unroll
                for (int jj = 0; jj < LANE_DIMS; jj++) {
                    int d = lane + jj * WARP;
                    if (d < head_dim) s += qr[r][jj] * ks[j][d];
                }
                s = warp_sum(s);
                float m_new = fmaxf(m[r], s);
                float corr = expf(m[r] - m_new), w = expf(s - m_new);
                l[r] = l[r] * corr + w;
#pragma unroll
                for (int jj = 0; jj < LANE_DIMS; jj++) {
                    int d = lane + jj * WARP;
                    if (d < head_dim) acc[r][jj] = acc[r][jj] * corr + w * vs[j][d];
                }
                m[r] = m_new;
            }
        }
    }

#pragma unroll
    for (int r = 0; r < PREFILL_ROWS; r++) {
        if (pos[r] < 0) continue;
        long long i = q0 + row0 + warp * PREFILL_ROWS + r;
        T* orow = out + i * out_stride + head * head_dim;
        float inv = 1.0f / l[r];  // l > 0: a query always sees its own position
#pragma unroll
        for (int j = 0; j < LANE_DIMS; j++) {
            int d = lane + j * WARP;
            if (d < head_dim) orow[d] = from_f32<T>(acc[r][j] * inv);
        }
    }
}

// grid: (ceil(max_q_len / BQ), num_heads, num_seqs), block: TESSERA_PREFILL_THREADS.
#define PREFILL(S, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(TESSERA_PREFILL_THREADS)                   \
        paged_attention_prefill_##S(                                                        \
            T* out, long long out_stride, const T* q, long long q_stride, const T* k_cache, \
            const T* v_cache, const int* block_tables, int bt_stride,                       \
            const int* cu_seqlens_q, const int* context_lens, int num_heads,                \
            int num_kv_heads, int head_dim, int block_size, int window, float scale) {      \
        prefill<T>(out, out_stride, q, q_stride, k_cache, v_cache, block_tables, bt_stride, \
                   cu_seqlens_q, context_lens, num_heads, num_kv_heads, head_dim,           \
                   block_size, window, scale);                                              \
    }
FOR_EACH_DTYPE(PREFILL)
