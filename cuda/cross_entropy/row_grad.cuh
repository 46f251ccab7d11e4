// Writing a row's gradient from its backward factors: the formula per
// element, on and off the target, and the 16-byte stores.
#pragma once

#include <type_traits>

#include "elements.cuh"
#include "row_reduce.cuh"

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
//
// With LOOP_PER_ALIGNMENT the packs run in one of two loops, picked by whether
// `out` is aligned like the row, so that no pack tests it: 197 instructions
// per batch of four bf16 packs instead of 235 in the backward (cuobjdump
// -sass, sm_90). The forward with its gradient out of place keeps the test in
// its one loop: with a second, ptxas spills its bf16 and f16 entries.
template <typename T, typename A, bool CAP, bool WEIGHTED, bool LOOP_PER_ALIGNMENT>
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
        // `alignment`: 1 or 0 for a loop whose `out` is known to be aligned like
        // the row or not, -1 for one that tests out_aligned_like_in.
        const auto each_pack = [&](auto alignment) {
            constexpr int kAlignment = decltype(alignment)::value;
            const bool aligned = kAlignment < 0 ? out_aligned_like_in : kAlignment == 1;
            for_each_pack<T, U>(body, packs, group.lane, group.threads, [&](const Pack<T>& pack, int k) {
                const int j0 = head + k * W;
                A x[W], g[W];
                widen_pack(pack, x);
                grad_of<CAP, WEIGHTED>(x, g, j0, y, f, cap, sum_weights);
                store_grad<T>(out, j0, g, aligned);
            });
        };
        if (!LOOP_PER_ALIGNMENT) {
            each_pack(std::integral_constant<int, -1>{});
        } else if (out_aligned_like_in) {
            each_pack(std::integral_constant<int, 1>{});
        } else {
            each_pack(std::integral_constant<int, 0>{});
        }
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
