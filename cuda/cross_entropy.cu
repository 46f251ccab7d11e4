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
// over the logits; given the row's factors every element is independent, so
// `row_splits` blocks may share a row there. Both apply the optional soft-cap
// cap * tanh(x / cap) to each logit as they read it. The maths, and why the loss and the target term are
// formed as they are (no cancellation when p_y -> 1), is written once in
// src/op/mod.rs; the CPU kernels in src/cpu/ compute the same thing. The argument
// lists of the entries below are described once, in src/kernel_abi/, for both the CUDA
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
// - exp(x - m) is exp2(x * log2(e) - m * log2(e)), one FMA and one ex2 that
//   flushes results below 2^-126 to zero (`exp2_of`: exp2f spends three more
//   instructions an element on them); bf16 packs are widened a 32-bit word at
//   a time (`widen_pack`); the backward's gradient has a loop of its own for
//   each alignment (`write_row_grad`); the forward forms its exponents' shift
//   when the running max changes, not per pack (`RowPartial::shift`). The
//   forward's bf16 loop issues 225 instructions per batch of four packs where
//   it issued 355, the backward's 197 where it issued 346 out of place and 309
//   in place; f32's forward 127 (191), backward 109 (173 out of place, 148 in
//   place), by `bash scripts/sass-loops.sh` (sm_90, 2026-12-05). Fewer
//   instructions leave more of each SM's issue slots to absorb stalls (see
//   that script); no GPU has timed them yet.
// - In-row indices are 32-bit (V < 2^31 is checked by the host); row offsets
//   are 64-bit: N * V passes 2^31 at N = 16384, V = 131072.
// - The logit sum's class weights c ([V], `sum_weights`) have entries of their
//   own (`_weighted_`): the plain entries keep their code and registers. There
//   c_j is read per element, not per pack (a row's packs start anywhere
//   relative to c's alignment); every row reads the same c, mostly from L1/L2.
// Rows may be strided: row r starts at
// start + (r / inner) * stride_outer + (r % inner) * stride_inner.
//
// The device code lives in cross_entropy/, one concept a header: elements.cuh
// (reading elements and packs, the soft-cap), row_reduce.cuh (a row's
// reduction), row_grad.cuh (a row's gradient), kernels.cuh (forward and
// backward over a launch's rows), labels.cuh (the labels' conversion). This
// file holds the entry points the launcher finds by name.

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

#include "cross_entropy/kernels.cuh"
#include "cross_entropy/labels.cuh"

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
             A cap, int rows_per_block, int row_splits, int64_t start, int64_t inner, int64_t stride_outer,        \
             int64_t stride_inner) {                                                                               \
        if (cap > A(0))                                                                                            \
            backward<T, A, true, WEIGHTED>(logits, labels, sum_weights, factors, grad, rows, vocab, ignore_index,  \
                                           cap, rows_per_block, row_splits, start, inner, stride_outer,            \
                                           stride_inner, 0, rows, 0, vocab);                                       \
        else                                                                                                       \
            backward<T, A, false, WEIGHTED>(logits, labels, sum_weights, factors, grad, rows, vocab, ignore_index, \
                                            cap, rows_per_block, row_splits, start, inner, stride_outer,           \
                                            stride_inner, 0, rows, 0, vocab);                                      \
    }                                                                                                              \
    CE_ENTRY void __launch_bounds__(MAX_THREADS, 1)                                                                \
        NAME_IN_PLACE(T* logits, const int64_t* __restrict__ labels, const A* __restrict__ sum_weights,            \
                      const A* __restrict__ factors, int64_t rows, int vocab, int64_t ignore_index, A cap,         \
                      int rows_per_block, int row_splits, int64_t start, int64_t inner, int64_t stride_outer,      \
                      int64_t stride_inner) {                                                                      \
        if (cap > A(0))                                                                                            \
            backward<T, A, true, WEIGHTED>(logits, labels, sum_weights, factors, logits, rows, vocab,              \
                                           ignore_index, cap, rows_per_block, row_splits, start, inner,            \
                                           stride_outer, stride_inner, start, inner, stride_outer, stride_inner);  \
        else                                                                                                       \
            backward<T, A, false, WEIGHTED>(logits, labels, sum_weights, factors, logits, rows, vocab,             \
                                            ignore_index, cap, rows_per_block, row_splits, start, inner,           \
                                            stride_outer, stride_inner, start, inner, stride_outer, stride_inner); \
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
// Labels (see cross_entropy/labels.cuh): one entry per label dtype.
// ---------------------------------------------------------------------------

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
