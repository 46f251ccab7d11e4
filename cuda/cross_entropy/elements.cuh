// Reading a row's elements: the element types and the accumulator type A,
// 16-byte packs and the loop that keeps several of them in flight, a row's
// unaligned head, strided row offsets, and the soft-cap applied to each logit
// as it is read.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <float.h>
#include <stdint.h>
#include <string.h>

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

// 2^x in f32, as the GPU's ex2 unit forms it, with results below 2^-126 (about
// 1.2e-38, f32's subnormals) flushed to zero: one instruction, where exp2f
// adds three per element to scale subnormal results (a compare and two
// multiplies: 96 of the 355 instructions a thread issued per batch of four bf16
// packs in the forward's loop, by cuobjdump -sass). Every exponential these
// kernels take this way is of a logit less a max or the log-sum-exp: a flushed
// term is below 2^-126 of a term of 1 in the forward's sums, or a probability
// below 2^-126 in the gradient, under any rounding of the outputs. The CPU
// build of the kernels (HIP-CPU) flushes the same results.
__device__ __forceinline__ float exp2_of(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    const float y = exp2f(x);
    return y < FLT_MIN ? 0.0f : y;
#endif
}
__device__ __forceinline__ double exp2_of(double x) { return exp2(x); }
__device__ __forceinline__ float fma_of(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_of(double a, double b, double c) { return fma(a, b, c); }

// Sixteen bytes of elements: one vector load or store.
template <typename T> struct alignas(16) Pack {
    static constexpr int kLen = 16 / sizeof(T);
    T e[kLen];
};

// The elements of a pack, widened to A.
template <typename T, typename A> __device__ __forceinline__ void widen_pack(const Pack<T>& pack, A (&x)[Pack<T>::kLen]) {
#pragma unroll
    for (int i = 0; i < Pack<T>::kLen; ++i) x[i] = A(widen(pack.e[i]));
}

// bf16 is the top half of an f32: each 32-bit word of the pack holds two, the
// first (lower address) in its low half. Widened a word at a time, each
// element costs one instruction (a shift, a mask), where the element-wise
// conversion spent two on every second one.
template <> __device__ __forceinline__ void widen_pack(const Pack<__nv_bfloat16>& pack, float (&x)[8]) {
    uint32_t words[4];
    memcpy(words, &pack, sizeof words);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const uint32_t low = words[k] << 16, high = words[k] & 0xffff0000u;
        memcpy(&x[2 * k], &low, sizeof low);
        memcpy(&x[2 * k + 1], &high, sizeof high);
    }
}

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
