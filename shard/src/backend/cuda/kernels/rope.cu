// rope.cu: rotary position embedding (Su et al. 2021) in Hugging Face's rotate-half form, applied
// in place to the q and k heads of each token. The inverse frequencies (with linear or Llama-3
// rescaling) are computed on the host exactly as layers/rope.rs does and passed in, so both
// backends rotate by the same f32 angles.

template <typename T>
__device__ void rope(T* q, T* k, long long row_stride, const int* positions,
                     const float* inv_freq, int num_heads, int num_kv_heads, int head_dim) {
    int t = blockIdx.x;
    int half = head_dim / 2;
    float pos = (float)positions[t];
    int total = (num_heads + num_kv_heads) * half;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        int head = i / half, d = i % half;
        T* base = head < num_heads ? q + t * row_stride + head * head_dim
                                   : k + t * row_stride + (head - num_heads) * head_dim;
        float s, c;
        sincosf(pos * inv_freq[d], &s, &c);
        float a = to_f32(base[d]), b = to_f32(base[d + half]);
        base[d] = from_f32<T>(a * c - b * s);
        base[d + half] = from_f32<T>(b * c + a * s);
    }
}

// grid: (tokens), block: any multiple of 32. q and k rows are `row_stride` elements apart (the
// fused qkv projection output).
#define ROPE(S, T)                                                                           \
    extern "C" __global__ void rope_##S(T* q, T* k, long long row_stride,                   \
                                        const int* positions, const float* inv_freq,        \
                                        int num_heads, int num_kv_heads, int head_dim) {    \
        rope<T>(q, k, row_stride, positions, inv_freq, num_heads, num_kv_heads, head_dim);  \
    }
FOR_EACH_DTYPE(ROPE)
