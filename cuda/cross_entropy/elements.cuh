// Reading a row's elements: the element types and the accumulator type A,
// 16-byte packs and the loop that keeps several of them in flight, a row's
// unaligned head, strided row offsets, and the soft-cap applied to each logit
// as it is read.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// ---------------------------------------------------------------------------
// Elements, 16-byte packs and the accumulator type A.
// ---------------------------------------------------------------------------

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ double widen(double x) { return x; }

template <typename T> __device__ __forceinline__ T narrow(float x);
template <> __device__ __forceinline__ float narrow<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }
template <typename T> __device__ __forceinline__ T narrow(double x) { return x; }

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -INFINITY; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -(double)INFINITY; }

template <typename A> __device__ __forceinline__ A log2e();
template <> __device__ __forceinline__ float log2e<float>() { return 1.4426950408889634f; }
template <> __device__ __forceinline__ double log2e<double>() { return 1.4426950408889634; }

__device__ __forceinline__ float exp2_of(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_of(double x) { return exp2(x); }
__device__ __forceinline__ float fma_of(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_of(double a, double b, double c) { return fma(a, b, c); }

// Sixteen bytes of elements: one vector load or store.
template <typename T> struct alignas(16) Pack {
    static constexpr int kLen = 16 / sizeof(T);
    T e[kLen];
};

// Packs a thread loads before it uses the first (see for_each_pack): 64 bytes
// on the plain paths; half that where the soft-cap, the logit sum, the class
// weights or f64's maths need the registers (ptxas would spill otherwise).
template <typename T, bool HEAVY> constexpr int kInFlight = HEAVY || sizeof(T) == 8 ? 2 : 4;

// Calls f(pack, k) for the packs k = lane, lane + threads, ... < packs of
// `body`, loading them in batches of U: every load of a batch
// is issued before the first pack is used. The loops are bound by memory
// latency, and registers cap a block at 64 per thread (1024 threads per SM),
// so the bytes a thread keeps in flight set the bandwidth: the forward's
// earlier loop (two packs unrolled, 1024 threads a block) read 2.0 TB/s on an
// H200, 48% of its copy bandwidth. The last, partial batch goes pack by pack. When f writes
// (the gradient in place), it writes only the pack it was handed, which this
// thread has already read.
template <typename T, int U, typename P, typename F>
__device__ __forceinline__ void for_each_pack(P* body, int packs, int lane, int threads, F&& f) {
    int k = lane;
    for (; k + (U - 1) * threads < packs; k += U * threads) {
        Pack<T> batch[U];
#pragma unroll
        for (int u = 0; u < U; ++u) batch[u] = body[k + u * threads];
#pragma unroll
        for (int u = 0; u < U; ++u) f(batch[u], k + u * threads);
    }
    for (; k < packs; k += threads) f(body[k], k);
}

// Elements of `row` before its first 16-byte boundary (all of them when the
// row is shorter).
template <typename T> __device__ __forceinline__ int head_len(const T* row, int vocab) {
    const int misaligned = int(reinterpret_cast<uintptr_t>(row) % 16);
    const int head = misaligned == 0 ? 0 : (16 - misaligned) / int(sizeof(T));
    return head < vocab ? head : vocab;
}

__device__ __forceinline__ int64_t row_offset(int64_t r, int64_t start, int64_t inner, int64_t stride_outer,
                                              int64_t stride_inner) {
    return start + (r / inner) * stride_outer + (r % inner) * stride_inner;
}

// ---------------------------------------------------------------------------
// The soft-cap.
// ---------------------------------------------------------------------------

// The logit the loss sees: cap * tanh(x / cap), or x itself without a cap.
template <bool CAP, typename A> __device__ __forceinline__ A capped(A x, A cap) {
    return CAP ? cap * tanh(x / cap) : x;
}

// The soft-cap's derivative at a raw logit x: 1 - tanh^2(x / cap), as 4e / (1 + e)^2 with
// e = exp(-2 |x / cap|), which does not cancel where the cap saturates (1 without a cap).
template <bool CAP, typename A> __device__ __forceinline__ A cap_slope(A x, A cap) {
    if (!CAP) return A(1);
    const A e = exp(A(-2) * fabs(x / cap));
    return A(4) * e / ((A(1) + e) * (A(1) + e));
}
