// Fused cross-entropy kernels for candle-chunked-ce.
//
// Forward: one block per row reads the row once, keeping a running max and a
// running sum of exponentials in f32 (f64 for f64 logits) per thread (plus the
// logit sum for label smoothing, and the largest logits before and after the
// target for token accuracy), merges them across the block, and writes
// (ce, lse, logit_sum, correct) for the row. It never materialises
// probabilities. Backward: one block per row reads the row once more and
// writes the gradient in the logits' dtype, into a fresh buffer or over the
// logits. Both apply the optional soft-cap cap * tanh(x / cap) to each logit
// as they read it (cap = 0: none). The maths, and why the loss and the target
// term are formed as they are (no cancellation when p_y -> 1), is written once
// in src/op.rs; the CPU kernels in src/cpu/ compute the same thing.
//
// Offsets are 64-bit everywhere: N * V passes 2^31 at N = 16384, V = 131072.
// Rows may be strided (a [B, S-1, V] view of [B, S, V] logits): row r starts
// at start + (r / inner) * stride_outer + (r % inner) * stride_inner.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// ---------------------------------------------------------------------------
// Element conversions: every reduction runs in the accumulator type A.
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

__device__ __forceinline__ int64_t row_offset(int64_t r, int64_t start, int64_t inner, int64_t stride_outer,
                                              int64_t stride_inner) {
    return start + (r / inner) * stride_outer + (r % inner) * stride_inner;
}

// ---------------------------------------------------------------------------
// (max, sum of exp(x - max)) pairs: the online softmax reduction.
// ---------------------------------------------------------------------------

// Adds one logit to a running (max, sum). -inf logits contribute nothing;
// NaN poisons the sum (and so the row's loss), as in PyTorch.
template <typename A> __device__ __forceinline__ void push(A& m, A& s, A x) {
    if (x > m) {
        s = (s == A(0) ? A(0) : s * exp(m - x)) + A(1);
        m = x;
    } else if (x != x) {
        s = x;
    } else if (x > neg_inf<A>()) {
        s += exp(x - m);
    }
}

// Merges (m2, s2) into (m, s). A sum of 0 contributes nothing whatever its max.
template <typename A> __device__ __forceinline__ void merge(A& m, A& s, A m2, A s2) {
    A mx = m > m2 ? m : m2;
    A a = s == A(0) ? A(0) : s * exp(m - mx);
    A b = s2 == A(0) ? A(0) : s2 * exp(m2 - mx);
    m = mx;
    s = a + b;
}

// Block-wide merge; every thread returns the block's pair. blockDim.x is a
// multiple of 32, at most 1024.
template <typename A> __device__ void block_merge(A& m, A& s) {
    __shared__ A shared_m[32];
    __shared__ A shared_s[32];
    for (int offset = 16; offset > 0; offset /= 2) {
        merge(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) {
        shared_m[warp] = m;
        shared_s[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? shared_m[lane] : neg_inf<A>();
    s = lane < warps ? shared_s[lane] : A(0);
    for (int offset = 16; offset > 0; offset /= 2) {
        merge(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
    }
    // The shared arrays are reused by the next row of this block: wait until
    // every warp has read them.
    __syncthreads();
}

// Block-wide max (NaN skipped, as fmax does) and sum; every thread returns the
// block's value.
template <typename A> __device__ A block_max(A v) {
    __shared__ A shared[32];
    for (int offset = 16; offset > 0; offset /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : neg_inf<A>();
    for (int offset = 16; offset > 0; offset /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
    __syncthreads();
    return v;
}

__device__ double block_sum(double v) {
    __shared__ double shared[32];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __syncthreads();
    return v;
}

// The logit the loss sees: cap * tanh(x / cap), or x itself when cap == 0.
template <typename A> __device__ __forceinline__ A capped(A x, A cap) { return cap > A(0) ? cap * tanh(x / cap) : x; }

// The soft-cap's derivative at a raw logit x: 1 - tanh^2(x / cap), as 4e / (1 + e)^2 with
// e = exp(-2 |x / cap|), which does not cancel where the cap saturates (1 without a cap).
template <typename A> __device__ __forceinline__ A cap_slope(A x, A cap) {
    if (cap <= A(0)) return A(1);
    const A e = exp(A(-2) * fabs(x / cap));
    return A(4) * e / ((A(1) + e) * (A(1) + e));
}

// ---------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------

// stats[r] = (ce, lse, logit_sum, correct), zeros on ignored rows; logit_sum
// only when want_sum. A label outside [0, V) that is not ignore_index lowers
// *first_bad_row (which the host sets to ULLONG_MAX) to its row, so that the
// host reports the first bad row, as the CPU path does; the row's stats stay
// zero.
template <typename T, typename A>
__device__ void forward(const T* logits, const int64_t* labels, A* stats, unsigned long long* first_bad_row, int64_t rows,
                        int64_t vocab, int64_t ignore_index, A cap, int want_sum, int64_t start, int64_t inner,
                        int64_t stride_outer, int64_t stride_inner) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t label = labels[r];
        if (label == ignore_index || label < 0 || label >= vocab) {
            if (threadIdx.x == 0) {
                for (int k = 0; k < 4; ++k) stats[4 * r + k] = A(0);
                if (label != ignore_index) atomicMin(first_bad_row, (unsigned long long)r);
            }
            continue;
        }
        const T* row = logits + row_offset(r, start, inner, stride_outer, stride_inner);
        // The target is left out of the sum: `rest` must not include its term.
        A m = neg_inf<A>(), s = A(0), before_max = neg_inf<A>(), after_max = neg_inf<A>();
        double logit_sum = 0.0;
        for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
            const A x = capped(A(widen(row[j])), cap);
            if (want_sum) logit_sum += double(x);
            if (j < label) before_max = fmax(before_max, x);
            if (j > label) after_max = fmax(after_max, x);
            if (j != label) push(m, s, x);
        }
        block_merge(m, s);
        before_max = block_max(before_max);
        after_max = block_max(after_max);
        if (want_sum) logit_sum = block_sum(logit_sum);
        if (threadIdx.x == 0) {
            const A target_logit = capped(A(widen(row[label])), cap);
            const A max = m > target_logit ? m : target_logit;
            // +inf logits: x - max is NaN in PyTorch's formula; say so.
            const A rest = max == -neg_inf<A>() ? A(NAN) : (s == A(0) ? A(0) : s * exp(m - max));
            const A target_term = exp(target_logit - max);
            const A total = rest + target_term;
            stats[4 * r] = rest <= target_term ? log1p(rest / target_term) : (max - target_logit) + log(total);
            stats[4 * r + 1] = max + log(total);
            stats[4 * r + 2] = A(logit_sum);
            // argmax picks the first largest logit: none before the target may reach it.
            stats[4 * r + 3] = target_logit > before_max && target_logit >= after_max ? A(1) : A(0);
        }
    }
}

// grad[r] from factors[r] = (g_ce, g_lse, g_sum, lse, ce), as written in
// src/op.rs: ((g_ce + g_lse) p_j + g_sum) * cap'_j off the target, and
// (g_ce expm1(-ce) + g_lse exp(-ce) + g_sum) * cap'_y on it, formed in A.
// Ignored rows (and, defensively, rows with an invalid label) are written as
// zeros. `grad` may be `logits` itself (in place): each element is read
// before it is written, by the same thread.
template <typename T, typename A>
__device__ void backward(const T* logits, const int64_t* labels, const A* factors, T* grad, int64_t rows,
                         int64_t vocab, int64_t ignore_index, A cap, int64_t start, int64_t inner,
                         int64_t stride_outer, int64_t stride_inner, int64_t out_start, int64_t out_inner,
                         int64_t out_stride_outer, int64_t out_stride_inner) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t label = labels[r];
        const T* row = logits + row_offset(r, start, inner, stride_outer, stride_inner);
        T* out = grad + row_offset(r, out_start, out_inner, out_stride_outer, out_stride_inner);
        if (label == ignore_index || label < 0 || label >= vocab) {
            for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) out[j] = narrow<T>(A(0));
            continue;
        }
        const A* f = factors + 5 * r;
        const A g_ce = f[0], g_lse = f[1], g_sum = f[2], lse = f[3], ce = f[4];
        const A scale = g_ce + g_lse;
        const A target_grad = g_ce * expm1(-ce) + g_lse * exp(-ce) + g_sum;
        for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
            const A raw = A(widen(row[j]));
            const A g = j == label ? target_grad : exp(capped(raw, cap) - lse) * scale + g_sum;
            out[j] = narrow<T>(g * cap_slope(raw, cap));
        }
    }
}

#define FORWARD(NAME, T, A)                                                                                        \
    extern "C" __global__ void NAME(const T* logits, const int64_t* labels, A* stats,                              \
                                    unsigned long long* first_bad_row, int64_t rows, int64_t vocab,                \
                                    int64_t ignore_index, A cap, int want_sum, int64_t start, int64_t inner,       \
                                    int64_t stride_outer, int64_t stride_inner) {                                  \
        forward<T, A>(logits, labels, stats, first_bad_row, rows, vocab, ignore_index, cap, want_sum, start, inner, \
                      stride_outer, stride_inner);                                                                 \
    }

#define BACKWARD(NAME, NAME_IN_PLACE, T, A)                                                                        \
    extern "C" __global__ void NAME(const T* logits, const int64_t* labels, const A* factors, T* grad,            \
                                    int64_t rows, int64_t vocab, int64_t ignore_index, A cap, int64_t start,       \
                                    int64_t inner, int64_t stride_outer, int64_t stride_inner) {                   \
        backward<T, A>(logits, labels, factors, grad, rows, vocab, ignore_index, cap, start, inner, stride_outer,  \
                       stride_inner, 0, rows > 0 ? rows : 1, 0, vocab);                                            \
    }                                                                                                              \
    extern "C" __global__ void NAME_IN_PLACE(T* logits, const int64_t* labels, const A* factors, int64_t rows,     \
                                             int64_t vocab, int64_t ignore_index, A cap, int64_t start,            \
                                             int64_t inner, int64_t stride_outer, int64_t stride_inner) {          \
        backward<T, A>(logits, labels, factors, logits, rows, vocab, ignore_index, cap, start, inner,              \
                       stride_outer, stride_inner, start, inner, stride_outer, stride_inner);                      \
    }

FORWARD(ce_fwd_f32, float, float)
FORWARD(ce_fwd_bf16, __nv_bfloat16, float)
FORWARD(ce_fwd_f16, __half, float)
FORWARD(ce_fwd_f64, double, double)
BACKWARD(ce_bwd_f32, ce_bwd_inplace_f32, float, float)
BACKWARD(ce_bwd_bf16, ce_bwd_inplace_bf16, __nv_bfloat16, float)
BACKWARD(ce_bwd_f16, ce_bwd_inplace_f16, __half, float)
BACKWARD(ce_bwd_f64, ce_bwd_inplace_f64, double, double)
