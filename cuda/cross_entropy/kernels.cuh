// The forward (optionally with the gradient) and the backward over a launch's
// rows, as device functions; cross_entropy.cu instantiates them as entries.
#pragma once

#include <type_traits>

#include "columns.cuh"
#include "elements.cuh"
#include "row_grad.cuh"
#include "row_reduce.cuh"

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
                widen_pack(pack, x);
#pragma unroll
                for (int i = 0; i < W; ++i) x[i] = capped<CAP>(x[i], cap);
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
                    write_row_grad<T, A, CAP, false, false>(row, row, vocab, y, f, cap, sum_weights, group);
                } else {
                    // 64-bit: rows * V passes 2^31 at realistic sizes.
                    T* out = grad + r * int64_t(vocab);
                    write_row_grad<T, A, CAP, false, false>(row, out, vocab, y, f, cap, sum_weights, group);
                }
            }
        }
    }
}

// The gradient of every row from factors[r] = (g_ce, g_lse, g_sum, lse, ce),
// into `grad` or over `logits` (in place), with the class weights sum_weights
// in the g_sum terms with WEIGHTED. No barriers: rows are independent, and so
// is every element of a row once its factors are known: with row_splits > 1
// (a block per row, rows_per_block 1) that many consecutive blocks share a
// row, block s of them taking the stretches s, s + row_splits, ... of
// blockDim.x packs (`RowGroup::split`). The resident blocks then cover a
// row_splits-th as many rows at a time: a smaller span of memory in flight.
template <typename T, typename A, bool CAP, bool WEIGHTED>
__device__ void backward(const T* logits, const int64_t* __restrict__ labels, const A* __restrict__ sum_weights,
                         const A* __restrict__ factors, T* grad, int64_t rows, int vocab, int64_t ignore_index, A cap,
                         int rows_per_block, int row_splits, int64_t start, int64_t inner, int64_t stride_outer,
                         int64_t stride_inner, int64_t out_start, int64_t out_inner, int64_t out_stride_outer,
                         int64_t out_stride_inner) {
    const RowGroup whole(rows_per_block);
    const int64_t items = rows * row_splits;
    for (int64_t item = int64_t(blockIdx.x) * rows_per_block + whole.index; item < items;
         item += int64_t(gridDim.x) * rows_per_block) {
        const int64_t r = item / row_splits;
        const RowGroup group = whole.split(int(item % row_splits), row_splits);
        const int64_t label = labels[r];
        const T* row = logits + row_offset(r, start, inner, stride_outer, stride_inner);
        T* out = grad + row_offset(r, out_start, out_inner, out_stride_outer, out_stride_inner);
        const bool valid = label != ignore_index && label >= 0 && label < vocab;
        const A* f = factors + FACTORS * r;
        const A target_weight = valid ? sum_weight<WEIGHTED>(sum_weights, int(label)) : A(1);
        const RowGrad<A> row_grad = valid ? RowGrad<A>(f[FACTOR_G_CE], f[FACTOR_G_LSE], f[FACTOR_G_SUM], f[FACTOR_LSE],
                                                       f[FACTOR_CE], target_weight)
                                          : RowGrad<A>(0, 0, 0, 0, 0, 0);
        write_row_grad<T, A, CAP, WEIGHTED, true>(row, out, vocab, valid ? int(label) : -1, row_grad, cap,
                                                  sum_weights, group);
    }
}
