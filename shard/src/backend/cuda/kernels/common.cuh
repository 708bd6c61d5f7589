// common.cuh: helpers prepended to every Tessera kernel file before NVRTC compiles it (no system
// headers, so NVRTC needs no include path). Storage types are 16-bit bit patterns converted with
// single PTX instructions (sm_80+); all arithmetic is f32.
//
// Tuning constants (TESSERA_*) are passed as -D options by the host (launch.rs) so the Rust launch
// code and the kernels agree on one value each; the defaults below only serve a stand-alone compile.

#ifndef TESSERA_MAX_HEAD_DIM
#define TESSERA_MAX_HEAD_DIM 256
#endif
#ifndef TESSERA_DECODE_THREADS
#define TESSERA_DECODE_THREADS 128
#endif
#ifndef TESSERA_PREFILL_BQ
#define TESSERA_PREFILL_BQ 16
#endif
#ifndef TESSERA_PREFILL_BK
#define TESSERA_PREFILL_BK 16
#endif
#ifndef TESSERA_PREFILL_THREADS
#define TESSERA_PREFILL_THREADS 128
#endif
#ifndef TESSERA_MAX_TOP_K
#define TESSERA_MAX_TOP_K 256
#endif

#define WARP 32
#define NEG_INF (-__int_as_float(0x7f800000))
// Values each lane holds when a warp splits one head vector.
#define LANE_DIMS (TESSERA_MAX_HEAD_DIM / WARP)

struct Bf16 { unsigned short bits; };
struct F16 { unsigned short bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(Bf16 x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}
__device__ __forceinline__ float to_f32(F16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float f);
template <> __device__ __forceinline__ float from_f32<float>(float f) { return f; }
template <> __device__ __forceinline__ Bf16 from_f32<Bf16>(float f) {
    Bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
    return r;
}
template <> __device__ __forceinline__ F16 from_f32<F16>(float f) {
    F16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int warps = (blockDim.x + WARP - 1) / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// Slot of position `pos` of a sequence through its block table row (vLLM's paged layout).
__device__ __forceinline__ long long slot_of(const int* table_row, int pos, int block_size) {
    return (long long)table_row[pos / block_size] * block_size + pos % block_size;
}

// Instantiates `M(suffix, type)` for every 16-bit storage type.
#define FOR_EACH_DTYPE(M) M(bf16, Bf16) M(f16, F16)
