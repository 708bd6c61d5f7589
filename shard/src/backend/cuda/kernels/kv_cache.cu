// kv_cache.cu: writes each token's new K and V rows into its paged-cache slot. Cache layout is
// kv_cache.rs's: per layer, K and V each `[slot][kv_head][head_dim]`, slot = block · block_size +
// offset; the source rows are `src_stride` apart (k and v inside the fused qkv output).

template <typename T>
__device__ void kv_cache_write(T* k_cache, T* v_cache, const T* k, const T* v,
                               const int* slots, int kv_dim, long long src_stride) {
    int t = blockIdx.x;
    long long dst = (long long)slots[t] * kv_dim, src = t * src_stride;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        k_cache[dst + i] = k[src + i];
        v_cache[dst + i] = v[src + i];
    }
}

// grid: (tokens), block: any multiple of 32.
#define KV_CACHE_WRITE(S, T)                                                                 \
    extern "C" __global__ void kv_cache_write_##S(T* k_cache, T* v_cache, const T* k,       \
                                                  const T* v, const int* slots, int kv_dim, \
                                                  long long src_stride) {                   \
        kv_cache_write<T>(k_cache, v_cache, k, v, slots, kv_dim, src_stride);               \
    }
FOR_EACH_DTYPE(KV_CACHE_WRITE)
