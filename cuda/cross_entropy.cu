// Fused cross-entropy kernels for candle-chunked-ce.
//
// Forward: a row group (one warp per row for small vocabularies, the whole
// block otherwise; see `rows_per_block`) streams its row once in 16-byte
// packs, keeping per thread a running max and a running sum of exponentials
// in f32 (f64 for f64 logits), plus the logit sum for label smoothing (class-
// weighted when the loss has class weights) and the largest logit before the
// target for token accuracy. It merges them across the group and writes
// (ce, lse, logit_sum, correct) for the row. It never
// materialises probabilities. Backward: the same traversal reads the row once
// more and writes the gradient in the logits' dtype, into a fresh buffer or
// over the logits. Both apply the optional soft-cap cap * tanh(x / cap) to each
// logit as they read it. The maths, and why the loss and the target term are
// formed as they are (no cancellation when p_y -> 1), is written once in
// src/op/mod.rs; the CPU kernels in src/cpu/ compute the same thing. The argument
// lists below are described once, in src/kernel_abi/, for both the CUDA
// launcher and the CPU-executed tests (tests/kernels_on_cpu.rs); it describes
// no launch for an empty problem (the driver refuses an empty grid). At the
// end, `ce_labels_*` turn the caller's labels into the i64 labels all of these
// read.
//
// Why the loop looks as it does (it is bound by memory bandwidth):
// - Every row is split into scalar head elements up to the first 16-byte
//   boundary, whole 16-byte packs, and scalar tail elements: rows of a
//   [B, S-1, V] view, or with an odd V, start anywhere.
// - The target class and the accuracy bookkeeping are handled per pack, not
//   per element: only the one pack that holds the target looks at indices.
// - exp(x - m) is exp2(x * log2(e) - m * log2(e)), one FMA and one ex2.
// - In-row indices are 32-bit (V < 2^31 is checked by the host); row offsets
//   are 64-bit: N * V passes 2^31 at N = 16384, V = 131072.
// - The logit sum's class weights c ([V], `sum_weights`) have entries of their
//   own (`_weighted_`): the plain entries keep their code and registers. There
//   c_j is read per element, not per pack (a row's packs start anywhere
//   relative to c's alignment); every row reads the same c, mostly from L1/L2.
// Rows may be strided: row r starts at
// start + (r / inner) * stride_outer + (r % inner) * stride_inner.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <type_traits>

// Every entry the launcher finds by name. The CPU tests (tests/hip_cpu/)
// define it as `static __global__` to compile the entries as several
// translation units in parallel, each compiling only the entries it launches.
#ifndef CE_ENTRY
#define CE_ENTRY extern "C" __global__
#endif

// The columns of a row's `stats` and `factors`, as src/config.rs names them
// (`Stat`, `Factor`; a test there holds the two together).
enum Stat { STAT_CE, STAT_LSE, STAT_LOGIT_SUM, STAT_CORRECT, STATS };
enum Factor { FACTOR_G_CE, FACTOR_G_LSE, FACTOR_G_SUM, FACTOR_LSE, FACTOR_CE, FACTORS };

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

// ---------------------------------------------------------------------------
// A thread's (then a row group's) partial reduction of a row.
// ---------------------------------------------------------------------------

template <typename A> struct RowPartial {
    A max;         // of the logits j != y (NaN skipped, as fmax does)
    A sum;         // of exp(x_j - max), j != y; NaN poisons it, as in PyTorch
    A max_before;  // of the logits j < y, NaN while there is none: token accuracy needs no other index
    double logit_sum;  // of all logits (times their class weights), only for label smoothing
};

template <typename A> __device__ __forceinline__ RowPartial<A> empty_partial() {
    return RowPartial<A>{neg_inf<A>(), A(0), A(NAN), 0.0};
}

// Merges (m2, s2) into (m, s). A sum of 0 contributes nothing whatever its max.
template <typename A> __device__ __forceinline__ void merge(A& m, A& s, A m2, A s2) {
    const A mx = m > m2 ? m : m2;
    const A a = s == A(0) ? A(0) : s * exp(m - mx);
    const A b = s2 == A(0) ? A(0) : s2 * exp(m2 - mx);
    m = mx;
    s = a + b;
}

// The class weight c_j of logit j in the logit sum: sum_weights[j] with
// WEIGHTED, else 1 (and sum_weights is not read).
template <bool WEIGHTED, typename A> __device__ __forceinline__ A sum_weight(const A* __restrict__ sum_weights, int j) {
    return WEIGHTED ? sum_weights[j] : A(1);
}

// Adds N consecutive capped logits x[0..N), the first at index j0, to `p`:
// with SUM, x_j c_j to the logit sum (the product rounded in A, as on the CPU).
// The target y is left out of max and sum (`rest` in op/mod.rs must not include
// its term), and splits the accuracy maxima: only its own pack looks at indices.
template <bool SUM, bool WEIGHTED, int N, typename A>
__device__ __forceinline__ void add_logits(RowPartial<A>& p, A (&x)[N], int j0, int label,
                                           const A* __restrict__ sum_weights) {
    if (SUM) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            p.logit_sum += double(WEIGHTED ? x[i] * sum_weight<WEIGHTED>(sum_weights, j0 + i) : x[i]);
        }
    }
    if (unsigned(label - j0) < unsigned(N)) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            if (j0 + i < label) p.max_before = fmax(p.max_before, x[i]);
            if (j0 + i == label) x[i] = neg_inf<A>();
        }
    }
    A pack_max = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) pack_max = fmax(pack_max, x[i]);
    if (j0 + N <= label) p.max_before = fmax(p.max_before, pack_max);
    if (pack_max > p.max) {
        p.sum = p.sum == A(0) ? A(0) : p.sum * exp2_of((p.max - pack_max) * log2e<A>());
        p.max = pack_max;
    }
    // While the max is -inf every logit so far is -inf (contributes 0) or NaN.
    const A shift = p.max > neg_inf<A>() ? p.max * log2e<A>() : A(0);
#pragma unroll
    for (int i = 0; i < N; ++i) p.sum += exp2_of(fma_of(x[i], log2e<A>(), -shift));
}

// Merges the partials of a warp's 32 lanes; every lane returns the result.
template <bool SUM, typename A> __device__ void warp_merge(RowPartial<A>& p) {
    for (int offset = 16; offset > 0; offset /= 2) {
        const A m = __shfl_xor_sync(0xffffffffu, p.max, offset);
        const A s = __shfl_xor_sync(0xffffffffu, p.sum, offset);
        const A before = __shfl_xor_sync(0xffffffffu, p.max_before, offset);
        merge(p.max, p.sum, m, s);
        p.max_before = fmax(p.max_before, before);
        if (SUM) p.logit_sum += __shfl_xor_sync(0xffffffffu, p.logit_sum, offset);
    }
}

// Merges a row group's partials: a warp's, or the whole block's (blockDim.x a
// multiple of 32, at most 1024). Every thread of the block calls it the same
// number of times; every thread of the group returns the group's result.
template <bool SUM, typename A> __device__ void group_merge(RowPartial<A>& p, bool whole_block) {
    __shared__ RowPartial<A> warp_partials[32];
    warp_merge<SUM>(p);
    if (!whole_block) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_partials[warp] = p;
    __syncthreads();
    p = lane < int(blockDim.x / 32) ? warp_partials[lane] : empty_partial<A>();
    warp_merge<SUM>(p);
    // The next row of this block reuses warp_partials: wait until every warp has read them.
    __syncthreads();
}

// Which row of the launch a thread works on, and its place in the row group:
// rows_per_block is 1 (the block shares a row) or blockDim.x / 32 (a warp per row).
struct RowGroup {
    bool whole_block;
    int index;    // of the group in its block
    int lane;     // of the thread in its group
    int threads;  // in the group
    __device__ explicit RowGroup(int rows_per_block)
        : whole_block(rows_per_block == 1),
          index(whole_block ? 0 : int(threadIdx.x / 32)),
          lane(whole_block ? int(threadIdx.x) : int(threadIdx.x % 32)),
          threads(whole_block ? int(blockDim.x) : 32) {}
};

// Hands lane 0's (lse, ce) to every thread of its row group: a shuffle within
// a warp, or shared memory across the block. Every thread of the block calls
// it the same number of times.
template <typename A> __device__ void group_broadcast(A& lse, A& ce, bool whole_block) {
    __shared__ A shared_pair[2];
    if (!whole_block) {
        lse = __shfl_sync(0xffffffffu, lse, 0);
        ce = __shfl_sync(0xffffffffu, ce, 0);
        return;
    }
    if (threadIdx.x == 0) {
        shared_pair[0] = lse;
        shared_pair[1] = ce;
    }
    __syncthreads();
    lse = shared_pair[0];
    ce = shared_pair[1];
    // No second barrier: the next write of shared_pair comes after the next
    // row's group_merge, whose barriers every thread passes after this read.
}

// Writes N gradient values g[0..N) to `out` at j0: one 16-byte store when
// `out + j0` is aligned like the input pack, else element by element.
template <typename T, int N, typename A>
__device__ __forceinline__ void store_grad(T* out, int j0, const A (&g)[N], bool out_aligned_like_in) {
    if (N == Pack<T>::kLen && out_aligned_like_in) {
        Pack<T> pack;
#pragma unroll
        for (int i = 0; i < N; ++i) pack.e[i] = narrow<T>(g[i]);
        *reinterpret_cast<Pack<T>*>(out + j0) = pack;
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) out[j0 + i] = narrow<T>(g[i]);
    }
}

// A valid row's backward factors (see op/mod.rs), and what the gradient of each of
// its elements needs from them; `target_weight` is the target's class weight
// c_y in the logit sum (1 without class weights).
template <typename A> struct RowGrad {
    A scale;        // g_ce + g_lse
    A g_sum;
    A target_grad;  // g_ce expm1(-ce) + g_lse exp(-ce) + g_sum c_y: exact when p_y -> 1
    A lse_shift;    // lse log2(e)
    __device__ RowGrad(A g_ce, A g_lse, A g_sum, A lse, A ce, A target_weight)
        : scale(g_ce + g_lse), g_sum(g_sum),
          target_grad(g_ce * expm1(-ce) + g_lse * exp(-ce) + g_sum * target_weight), lse_shift(lse * log2e<A>()) {}
};

// The gradient of N consecutive raw logits x[0..N), the first at index j0.
template <bool CAP, bool WEIGHTED, int N, typename A>
__device__ __forceinline__ void grad_of(const A (&x)[N], A (&g)[N], int j0, int label, const RowGrad<A>& f, A cap,
                                        const A* __restrict__ sum_weights) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const A p = exp2_of(fma_of(capped<CAP>(x[i], cap), log2e<A>(), -f.lse_shift));
        const A shift = WEIGHTED ? f.g_sum * sum_weight<WEIGHTED>(sum_weights, j0 + i) : f.g_sum;
        g[i] = (p * f.scale + shift) * cap_slope<CAP>(x[i], cap);
    }
    if (unsigned(label - j0) < unsigned(N)) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            if (j0 + i == label) g[i] = f.target_grad * cap_slope<CAP>(x[i], cap);
        }
    }
}

// grad of one row from its factors, as written in src/op/mod.rs: ((g_ce + g_lse)
// p_j + g_sum c_j) * cap'_j off the target, and (g_ce expm1(-ce) + g_lse
// exp(-ce) + g_sum c_y) * cap'_y on it, formed in A (c the class weights with
// WEIGHTED, else 1); zeros when the row has no valid label (y < 0). `out` may
// be `row` itself (in place): each element is read before it is written, by
// the same thread, and by no other thread.
template <typename T, typename A, bool CAP, bool WEIGHTED>
__device__ void write_row_grad(const T* row, T* out, int vocab, int y, const RowGrad<A>& f, A cap,
                               const A* __restrict__ sum_weights, const RowGroup& group) {
    constexpr int W = Pack<T>::kLen;
    const bool valid = y >= 0;
    const int head = head_len(row, vocab);
    const int packs = (vocab - head) / W;
    const int tail = head + packs * W;
    const bool out_aligned_like_in = head_len(out, vocab) == head;
    if (group.lane < head) {
        const int j = group.lane;
        A x[1] = {A(widen(row[j]))}, g[1] = {A(0)};
        if (valid) grad_of<CAP, WEIGHTED>(x, g, j, y, f, cap, sum_weights);
        store_grad<T>(out, j, g, false);
    }
    const Pack<T>* body = reinterpret_cast<const Pack<T>*>(row + head);
    if (valid) {
        constexpr int U = kInFlight<T, CAP || WEIGHTED>;
        for_each_pack<T, U>(body, packs, group.lane, group.threads, [&](const Pack<T>& pack, int k) {
            const int j0 = head + k * W;
            A x[W], g[W];
#pragma unroll
            for (int i = 0; i < W; ++i) x[i] = A(widen(pack.e[i]));
            grad_of<CAP, WEIGHTED>(x, g, j0, y, f, cap, sum_weights);
            store_grad<T>(out, j0, g, out_aligned_like_in);
        });
    } else {
        // An ignored row's gradient is zero: nothing to read.
        A zeros[W];
#pragma unroll
        for (int i = 0; i < W; ++i) zeros[i] = A(0);
        for (int k = group.lane; k < packs; k += group.threads) store_grad<T>(out, head + k * W, zeros, out_aligned_like_in);
    }
    if (group.lane < vocab - tail) {
        const int j = tail + group.lane;
        A x[1] = {A(widen(row[j]))}, g[1] = {A(0)};
        if (valid) grad_of<CAP, WEIGHTED>(x, g, j, y, f, cap, sum_weights);
        store_grad<T>(out, j, g, false);
    }
}

// The factors of a scalar loss whose value receives a gradient of 1 (see
// `UnitFactors` in src/loss.rs): g_ce = ce_unit, g_lse = lse_unit +
// lse_squared_unit * lse, g_sum = sum_unit.
template <typename A> struct UnitFactors {
    A ce, lse, lse_squared, sum;
};

// ---------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------

// stats[r] = (ce, lse, logit_sum, correct), zeros on ignored rows; logit_sum
// only with SUM, class-weighted by sum_weights with WEIGHTED. A label outside
// [0, V) that is not ignore_index lowers *first_bad_row (which the host sets
// to ULLONG_MAX) to its row, so that the host reports the first bad row, as
// the CPU path does; the row's stats stay zero. Every thread of a block runs
// the same number of row iterations and merges (rows past the end and ignored
// rows merge empty partials), so that warp-per-row blocks never diverge
// across a shuffle.
//
// With a GRAD other than NO_GRAD (a scalar loss, as Liger does), the row group
// then reads its row once more (mostly from L2) and writes the gradient of a
// loss whose value receives 1, from `unit`: two passes over the logits instead
// of the three of a forward and a separate backward. The target's term is
// formed in A from ce, as in the backward. GRAD_OUT writes it to `grad`, `[rows,
// V]` contiguous, and leaves the logits as they were; GRAD_IN_PLACE writes it
// over the logits, whose pointer is then writable and not __restrict__ all the
// way down (a read-only one would let the compiler read them through the
// non-coherent cache while they change; scripts/check-ptx.sh fails on such a
// load). Class weights never come with a gradient: a weighted loss runs the
// forward, then the backward.
enum GradMode { NO_GRAD, GRAD_OUT, GRAD_IN_PLACE };
template <int GRAD, typename T>
using LogitsPtr = typename std::conditional<GRAD == GRAD_IN_PLACE, T*, const T*>::type;

template <typename T, typename A, bool CAP, bool SUM, bool WEIGHTED, int GRAD>
__device__ void forward(LogitsPtr<GRAD, T> logits, const int64_t* __restrict__ labels,
                        const A* __restrict__ sum_weights, A* __restrict__ stats,
                        unsigned long long* __restrict__ first_bad_row, T* __restrict__ grad, int64_t rows,
                        int vocab, int64_t ignore_index, A cap, UnitFactors<A> unit, int rows_per_block,
                        int64_t start, int64_t inner, int64_t stride_outer, int64_t stride_inner) {
    const RowGroup group(rows_per_block);
    for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < rows;
         first += int64_t(gridDim.x) * rows_per_block) {
        const int64_t r = first + group.index;
        const int64_t label = r < rows ? labels[r] : ignore_index;
        const bool valid = r < rows && label != ignore_index && label >= 0 && label < vocab;
        const LogitsPtr<GRAD, T> row = logits + row_offset(r < rows ? r : 0, start, inner, stride_outer, stride_inner);
        const int y = valid ? int(label) : -1;
        RowPartial<A> p = empty_partial<A>();
        if (valid) {
            constexpr int W = Pack<T>::kLen;
            const int head = head_len(row, vocab);
            const int packs = (vocab - head) / W;
            const int tail = head + packs * W;
            if (group.lane < head) {
                A x[1] = {capped<CAP>(A(widen(row[group.lane])), cap)};
                add_logits<SUM, WEIGHTED>(p, x, group.lane, y, sum_weights);
            }
            const Pack<T>* __restrict__ body = reinterpret_cast<const Pack<T>*>(row + head);
            // Out of place, f16 keeps two packs in flight: its 64 registers hold no
            // more beside the gradient's pointer (ptxas spills with four).
            constexpr bool HEAVY = CAP || SUM || (GRAD == GRAD_OUT && std::is_same<T, __half>::value);
            constexpr int U = kInFlight<T, HEAVY>;
            for_each_pack<T, U>(body, packs, group.lane, group.threads, [&](const Pack<T>& pack, int k) {
                A x[W];
#pragma unroll
                for (int i = 0; i < W; ++i) x[i] = capped<CAP>(A(widen(pack.e[i])), cap);
                add_logits<SUM, WEIGHTED>(p, x, head + k * W, y, sum_weights);
            });
            if (group.lane < vocab - tail) {
                A x[1] = {capped<CAP>(A(widen(row[tail + group.lane])), cap)};
                add_logits<SUM, WEIGHTED>(p, x, tail + group.lane, y, sum_weights);
            }
        }
        group_merge<SUM>(p, group.whole_block);
        A lse = A(0), ce = A(0);
        if (group.lane == 0 && r < rows) {
            A* out = stats + STATS * r;
            if (valid) {
                const A target_logit = capped<CAP>(A(widen(row[y])), cap);
                const A max = p.max > target_logit ? p.max : target_logit;
                // +inf logits: x - max is NaN in PyTorch's formula; say so.
                const A rest = max == -neg_inf<A>() ? A(NAN) : (p.sum == A(0) ? A(0) : p.sum * exp(p.max - max));
                const A target_term = exp(target_logit - max);
                const A total = rest + target_term;
                ce = rest <= target_term ? log1p(rest / target_term) : (max - target_logit) + log(total);
                lse = max + log(total);
                out[STAT_CE] = ce;
                out[STAT_LSE] = lse;
                out[STAT_LOGIT_SUM] = A(p.logit_sum);
                // argmax picks the first largest logit: none after the target may exceed it, none
                // before it reach it (fmax skips NaN, and max_before stays NaN with nothing before).
                const bool first = p.max_before != p.max_before || target_logit > p.max_before;
                out[STAT_CORRECT] = target_logit >= p.max && first ? A(1) : A(0);
            } else {
                for (int k = 0; k < STATS; ++k) out[k] = A(0);
                if (label != ignore_index) atomicMin(first_bad_row, (unsigned long long)r);
            }
        }
        if constexpr (GRAD != NO_GRAD) {
            static_assert(!WEIGHTED, "the forward with gradient takes no class weights");
            group_broadcast(lse, ce, group.whole_block);
            if (r < rows) {
                const RowGrad<A> f(unit.ce, unit.lse + unit.lse_squared * lse, unit.sum, lse, ce, A(1));
                if constexpr (GRAD == GRAD_IN_PLACE) {
                    // Each element is read before its own thread rewrites it.
                    write_row_grad<T, A, CAP, false>(row, row, vocab, y, f, cap, sum_weights, group);
                } else {
                    // 64-bit: rows * V passes 2^31 at realistic sizes.
                    T* out = grad + r * int64_t(vocab);
                    write_row_grad<T, A, CAP, false>(row, out, vocab, y, f, cap, sum_weights, group);
                }
            }
        }
    }
}

// The gradient of every row from factors[r] = (g_ce, g_lse, g_sum, lse, ce),
// into `grad` or over `logits` (in place), with the class weights sum_weights
// in the g_sum terms with WEIGHTED. No barriers: rows are independent.
template <typename T, typename A, bool CAP, bool WEIGHTED>
__device__ void backward(const T* logits, const int64_t* __restrict__ labels, const A* __restrict__ sum_weights,
                         const A* __restrict__ factors, T* grad, int64_t rows, int vocab, int64_t ignore_index, A cap,
                         int rows_per_block, int64_t start, int64_t inner, int64_t stride_outer,
                         int64_t stride_inner, int64_t out_start, int64_t out_inner, int64_t out_stride_outer,
                         int64_t out_stride_inner) {
    const RowGroup group(rows_per_block);
    for (int64_t r = int64_t(blockIdx.x) * rows_per_block + group.index; r < rows;
         r += int64_t(gridDim.x) * rows_per_block) {
        const int64_t label = labels[r];
        const T* row = logits + row_offset(r, start, inner, stride_outer, stride_inner);
        T* out = grad + row_offset(r, out_start, out_inner, out_stride_outer, out_stride_inner);
        const bool valid = label != ignore_index && label >= 0 && label < vocab;
        const A* f = factors + FACTORS * r;
        const A target_weight = valid ? sum_weight<WEIGHTED>(sum_weights, int(label)) : A(1);
        const RowGrad<A> row_grad = valid ? RowGrad<A>(f[FACTOR_G_CE], f[FACTOR_G_LSE], f[FACTOR_G_SUM], f[FACTOR_LSE],
                                                       f[FACTOR_CE], target_weight)
                                          : RowGrad<A>(0, 0, 0, 0, 0, 0);
        write_row_grad<T, A, CAP, WEIGHTED>(row, out, vocab, valid ? int(label) : -1, row_grad, cap, sum_weights,
                                            group);
    }
}

// ---------------------------------------------------------------------------
// Entry points: one per dtype, direction and class weighting; the soft-cap,
// the logit sum and the gradient are picked once per launch, not per element.
// The class-weighted logit sum has entries of its own (`_weighted_`), so that
// its extra registers never lower the occupancy of the plain ones. The
// forward and backward entries take sum_weights, the [V] class weights in A:
// the weighted entries read them (the forward only with want_sum, as the
// CPU's; the gradient always), the plain ones never (the host passes
// nullptr). The forward with gradient has no weighted entries (see forward); it
// writes the gradient over the logits (`ce_fwd_grad_*`) or to a buffer of its
// own (`ce_fwd_grad_out_*`).
// MAX_THREADS is the largest block an entry is compiled for (64 registers a
// thread at 1024); f64's double-precision maths would spill there, so f64
// blocks stop at 512 threads. src/kernel_abi/shape.rs holds the same limits and
// every argument list.
// ---------------------------------------------------------------------------

// Picks forward<T, A, CAP, SUM, WEIGHTED, GRAD> from the launch's cap and
// want_sum (without SUM, the class weights go unread).
template <typename T, typename A, bool WEIGHTED, int GRAD>
__device__ __forceinline__ void dispatch_forward(LogitsPtr<GRAD, T> logits, const int64_t* __restrict__ labels,
                                                 const A* __restrict__ sum_weights, A* __restrict__ stats,
                                                 unsigned long long* __restrict__ first_bad_row,
                                                 T* __restrict__ grad, int64_t rows, int vocab,
                                                 int64_t ignore_index, A cap, int want_sum, UnitFactors<A> unit,
                                                 int rows_per_block, int64_t start, int64_t inner,
                                                 int64_t stride_outer, int64_t stride_inner) {
#define CE_FORWARD(CAP, SUM, W)                                                                                    \
    forward<T, A, CAP, SUM, W, GRAD>(logits, labels, sum_weights, stats, first_bad_row, grad, rows, vocab,         \
                                     ignore_index, cap, unit, rows_per_block, start, inner, stride_outer,           \
                                     stride_inner)
    if (cap > A(0) && want_sum)
        CE_FORWARD(true, true, WEIGHTED);
    else if (cap > A(0))
        CE_FORWARD(true, false, false);
    else if (want_sum)
        CE_FORWARD(false, true, WEIGHTED);
    else
        CE_FORWARD(false, false, false);
#undef CE_FORWARD
}

#define FORWARD(NAME, T, A, MAX_THREADS, WEIGHTED)                                                                 \
    CE_ENTRY void __launch_bounds__(MAX_THREADS, 1)                                                                \
        NAME(const T* __restrict__ logits, const int64_t* __restrict__ labels, const A* __restrict__ sum_weights,  \
             A* __restrict__ stats, unsigned long long* __restrict__ first_bad_row, int64_t rows, int vocab,       \
             int64_t ignore_index, A cap, int want_sum, int rows_per_block, int64_t start, int64_t inner,          \
             int64_t stride_outer, int64_t stride_inner) {                                                         \
        dispatch_forward<T, A, WEIGHTED, NO_GRAD>(logits, labels, sum_weights, stats, first_bad_row, nullptr, rows, \
                                                  vocab, ignore_index, cap, want_sum, UnitFactors<A>{0, 0, 0, 0},  \
                                                  rows_per_block, start, inner, stride_outer, stride_inner);       \
    }

// NAME rewrites the logits with their gradient: a writable pointer, not __restrict__ (see forward).
// NAME_OUT writes it to `grad`, [rows, V] contiguous, and only reads the logits.
#define FORWARD_WITH_GRAD(NAME, NAME_OUT, T, A, MAX_THREADS)                                                       \
    CE_ENTRY void __launch_bounds__(MAX_THREADS, 1)                                                                \
        NAME(T* logits, const int64_t* __restrict__ labels, A* __restrict__ stats,                                 \
             unsigned long long* __restrict__ first_bad_row, int64_t rows, int vocab, int64_t ignore_index, A cap, \
             int want_sum, A unit_ce, A unit_lse, A unit_lse_squared, A unit_sum, int rows_per_block,              \
             int64_t start, int64_t inner, int64_t stride_outer, int64_t stride_inner) {                           \
        dispatch_forward<T, A, false, GRAD_IN_PLACE>(logits, labels, nullptr, stats, first_bad_row, nullptr, rows, \
                                                     vocab, ignore_index, cap, want_sum,                           \
                                                     UnitFactors<A>{unit_ce, unit_lse, unit_lse_squared, unit_sum}, \
                                                     rows_per_block, start, inner, stride_outer, stride_inner);    \
    }                                                                                                              \
    CE_ENTRY void __launch_bounds__(MAX_THREADS, 1)                                                                \
        NAME_OUT(const T* __restrict__ logits, const int64_t* __restrict__ labels, T* __restrict__ grad,           \
                 A* __restrict__ stats, unsigned long long* __restrict__ first_bad_row, int64_t rows, int vocab,   \
                 int64_t ignore_index, A cap, int want_sum, A unit_ce, A unit_lse, A unit_lse_squared, A unit_sum, \
                 int rows_per_block, int64_t start, int64_t inner, int64_t stride_outer, int64_t stride_inner) {   \
        dispatch_forward<T, A, false, GRAD_OUT>(logits, labels, nullptr, stats, first_bad_row, grad, rows, vocab,  \
                                                ignore_index, cap, want_sum,                                       \
                                                UnitFactors<A>{unit_ce, unit_lse, unit_lse_squared, unit_sum},     \
                                                rows_per_block, start, inner, stride_outer, stride_inner);         \
    }

#define BACKWARD(NAME, NAME_IN_PLACE, T, A, MAX_THREADS, WEIGHTED)                                                 \
    CE_ENTRY void __launch_bounds__(MAX_THREADS, 1)                                                                \
        NAME(const T* __restrict__ logits, const int64_t* __restrict__ labels, const A* __restrict__ sum_weights,  \
             const A* __restrict__ factors, T* __restrict__ grad, int64_t rows, int vocab, int64_t ignore_index,   \
             A cap, int rows_per_block, int64_t start, int64_t inner, int64_t stride_outer,                        \
             int64_t stride_inner) {                                                                               \
        if (cap > A(0))                                                                                            \
            backward<T, A, true, WEIGHTED>(logits, labels, sum_weights, factors, grad, rows, vocab, ignore_index,  \
                                           cap, rows_per_block, start, inner, stride_outer, stride_inner, 0, rows, \
                                           0, vocab);                                                              \
        else                                                                                                       \
            backward<T, A, false, WEIGHTED>(logits, labels, sum_weights, factors, grad, rows, vocab, ignore_index, \
                                            cap, rows_per_block, start, inner, stride_outer, stride_inner, 0,      \
                                            rows, 0, vocab);                                                       \
    }                                                                                                              \
    CE_ENTRY void __launch_bounds__(MAX_THREADS, 1)                                                                \
        NAME_IN_PLACE(T* logits, const int64_t* __restrict__ labels, const A* __restrict__ sum_weights,            \
                      const A* __restrict__ factors, int64_t rows, int vocab, int64_t ignore_index, A cap,         \
                      int rows_per_block, int64_t start, int64_t inner, int64_t stride_outer,                      \
                      int64_t stride_inner) {                                                                      \
        if (cap > A(0))                                                                                            \
            backward<T, A, true, WEIGHTED>(logits, labels, sum_weights, factors, logits, rows, vocab,              \
                                           ignore_index, cap, rows_per_block, start, inner, stride_outer,          \
                                           stride_inner, start, inner, stride_outer, stride_inner);                \
        else                                                                                                       \
            backward<T, A, false, WEIGHTED>(logits, labels, sum_weights, factors, logits, rows, vocab,             \
                                            ignore_index, cap, rows_per_block, start, inner, stride_outer,         \
                                            stride_inner, start, inner, stride_outer, stride_inner);               \
    }

FORWARD(ce_fwd_f32, float, float, 1024, false)
FORWARD(ce_fwd_bf16, __nv_bfloat16, float, 1024, false)
FORWARD(ce_fwd_f16, __half, float, 1024, false)
FORWARD(ce_fwd_f64, double, double, 512, false)
FORWARD(ce_fwd_weighted_f32, float, float, 1024, true)
FORWARD(ce_fwd_weighted_bf16, __nv_bfloat16, float, 1024, true)
FORWARD(ce_fwd_weighted_f16, __half, float, 1024, true)
FORWARD(ce_fwd_weighted_f64, double, double, 512, true)
FORWARD_WITH_GRAD(ce_fwd_grad_f32, ce_fwd_grad_out_f32, float, float, 1024)
FORWARD_WITH_GRAD(ce_fwd_grad_bf16, ce_fwd_grad_out_bf16, __nv_bfloat16, float, 1024)
FORWARD_WITH_GRAD(ce_fwd_grad_f16, ce_fwd_grad_out_f16, __half, float, 1024)
FORWARD_WITH_GRAD(ce_fwd_grad_f64, ce_fwd_grad_out_f64, double, double, 512)
BACKWARD(ce_bwd_f32, ce_bwd_inplace_f32, float, float, 1024, false)
BACKWARD(ce_bwd_bf16, ce_bwd_inplace_bf16, __nv_bfloat16, float, 1024, false)
BACKWARD(ce_bwd_f16, ce_bwd_inplace_f16, __half, float, 1024, false)
BACKWARD(ce_bwd_f64, ce_bwd_inplace_f64, double, double, 512, false)
BACKWARD(ce_bwd_weighted_f32, ce_bwd_inplace_weighted_f32, float, float, 1024, true)
BACKWARD(ce_bwd_weighted_bf16, ce_bwd_inplace_weighted_bf16, __nv_bfloat16, float, 1024, true)
BACKWARD(ce_bwd_weighted_f16, ce_bwd_inplace_weighted_f16, __half, float, 1024, true)
BACKWARD(ce_bwd_weighted_f64, ce_bwd_inplace_weighted_f64, double, double, 512, true)

// ---------------------------------------------------------------------------
// Labels: the caller's labels, of any integer dtype L and any strides, to the
// [N] contiguous i64 every kernel above reads, with masked tokens set to
// ignore_index. candle-kernels has no CUDA cast from i16 or i32 (nor compare
// on them), so the loss converts them here, in one pass. Element r of the
// labels is at start + (r / inner) * stride_outer + (r % inner) * stride_inner
// (a [N] or [B, S] view), and of the mask at its own offsets. The mask, when
// there is one, is read as raw bytes: mask_bytes (1, 2, 4 or 8) per element,
// 0 unless some bit is set, the sign bit left out for a float mask
// (mask_float), so that -0.0 is 0 and NaN is not, as `mask != 0`.
// ---------------------------------------------------------------------------

__device__ __forceinline__ bool mask_keeps(const unsigned char* __restrict__ mask, int64_t offset, int mask_bytes,
                                           int mask_float) {
    const unsigned char* element = mask + offset * mask_bytes;
    uint64_t bits;
    switch (mask_bytes) {
    case 1: bits = *element; break;
    case 2: bits = *reinterpret_cast<const uint16_t*>(element); break;
    case 4: bits = *reinterpret_cast<const uint32_t*>(element); break;
    default: bits = *reinterpret_cast<const uint64_t*>(element); break;
    }
    if (mask_float) bits &= ~(uint64_t(1) << (8 * mask_bytes - 1));
    return bits != 0;
}

template <typename L>
__device__ void labels_to_i64(const L* __restrict__ labels, const unsigned char* __restrict__ mask,
                              int64_t* __restrict__ out, int64_t rows, int64_t ignore_index, int mask_bytes,
                              int mask_float, int64_t start, int64_t inner, int64_t stride_outer,
                              int64_t stride_inner, int64_t mask_start, int64_t mask_inner, int64_t mask_stride_outer,
                              int64_t mask_stride_inner) {
    for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
        const bool kept = mask == nullptr ||
                          mask_keeps(mask, row_offset(r, mask_start, mask_inner, mask_stride_outer, mask_stride_inner),
                                     mask_bytes, mask_float);
        out[r] = kept ? int64_t(labels[row_offset(r, start, inner, stride_outer, stride_inner)]) : ignore_index;
    }
}

#define LABELS(NAME, L)                                                                                            \
    CE_ENTRY void NAME(const L* __restrict__ labels, const unsigned char* __restrict__ mask,                      \
                                    int64_t* __restrict__ out, int64_t rows, int64_t ignore_index,                 \
                                    int mask_bytes, int mask_float, int64_t start, int64_t inner,                  \
                                    int64_t stride_outer, int64_t stride_inner, int64_t mask_start,                \
                                    int64_t mask_inner, int64_t mask_stride_outer, int64_t mask_stride_inner) {    \
        labels_to_i64<L>(labels, mask, out, rows, ignore_index, mask_bytes, mask_float, start, inner,              \
                         stride_outer, stride_inner, mask_start, mask_inner, mask_stride_outer,                    \
                         mask_stride_inner);                                                                       \
    }

LABELS(ce_labels_u8, uint8_t)
LABELS(ce_labels_u32, uint32_t)
LABELS(ce_labels_i16, int16_t)
LABELS(ce_labels_i32, int32_t)
LABELS(ce_labels_i64, int64_t)
