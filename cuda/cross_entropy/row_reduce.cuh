// The forward's reduction of a row: each thread's running max, sum of
// exponentials, logit sum and accuracy maximum, merged across a warp or a
// block, and the row's (lse, ce) handed back to every thread of its group.
#pragma once

#include "elements.cuh"

// ---------------------------------------------------------------------------
// A thread's (then a row group's) partial reduction of a row.
// ---------------------------------------------------------------------------

template <typename A> struct RowPartial {
    A max;         // of the logits j != y (NaN skipped, as fmax does)
    A sum;         // of exp(x_j - max), j != y; NaN poisons it, as in PyTorch
    A max_before;  // of the logits j < y, NaN while there is none: token accuracy needs no other index
    double logit_sum;  // of all logits (times their class weights), only for label smoothing
    // max log2(e), or 0 while max is -inf: what add_logits subtracts from each exponent, formed
    // when max changes instead of once per pack. Only add_logits keeps it (merges leave it stale).
    A shift;
};

template <typename A> __device__ __forceinline__ RowPartial<A> empty_partial() {
    return RowPartial<A>{neg_inf<A>(), A(0), A(NAN), 0.0, A(0)};
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
        // While the max is -inf every logit so far is -inf (contributes 0) or NaN.
        p.shift = p.max > neg_inf<A>() ? p.max * log2e<A>() : A(0);
    }
#pragma unroll
    for (int i = 0; i < N; ++i) p.sum += exp2_of(fma_of(x[i], log2e<A>(), -p.shift));
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

    // The lanes of split s of `splits` groups that share one row: lane k of
    // group s is lane s * threads + k of one group splits times as large, so
    // that the groups together take every pack once, head and tail included.
    __device__ RowGroup split(int s, int splits) const {
        RowGroup part = *this;
        part.lane += s * threads;
        part.threads *= splits;
        return part;
    }
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
