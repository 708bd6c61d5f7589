// embedding.cu: gathers embedding rows for the batch's tokens into the f32 residual stream.
// With a vocabulary-parallel table this rank holds rows [vocab_start, vocab_start + rows); tokens
// outside it give zero rows, and the all-reduce over ranks completes the lookup.

template <typename T>
__device__ void embedding_gather(float* out, const T* table, const unsigned int* tokens,
                                 int hidden, int vocab_start, int rows) {
    int t = blockIdx.x;
    long long local = (long long)tokens[t] - vocab_start;
    float* dst = out + (long long)t * hidden;
    if (local < 0 || local >= rows) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = 0.0f;
        return;
    }
    const T* src = table + local * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = to_f32(src[i]);
}

// grid: (tokens), block: any multiple of 32.
#define EMBEDDING(S, T)                                                                       \
    extern "C" __global__ void embedding_gather_##S(float* out, const T* table,              \
                                                    const unsigned int* tokens, int hidden,  \
                                                    int vocab_start, int rows) {             \
        embedding_gather<T>(out, table, tokens, hidden, vocab_start, rows);                  \
    }
FOR_EACH_DTYPE(EMBEDDING)
