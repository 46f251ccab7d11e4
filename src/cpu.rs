//! CPU kernels for the fused cross-entropy: one generic row driver, rayon over
//! chunks of rows, and f32 row primitives compiled for AVX-512, AVX2+FMA and a
//! portable baseline, chosen once per process at run time.
//!
//! The maths (what each row computes) is written once, in `op.rs`. Here a row is
//! a contiguous slice of `V` logits; every row is reduced in f32 (f64 for f64
//! logits) whatever the storage type, because candle's own bf16 reductions
//! accumulate in bf16 and lose about a nat at V = 50257.

use half::{bf16, f16, slice::HalfFloatSliceExt};
use num_traits::Float;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Where the rows of a logits tensor live in its storage: row `r` is
/// `storage[row_offsets[r]..row_offsets[r] + vocab]`.
pub(crate) struct RowLayout {
    pub row_offsets: Vec<usize>,
    pub vocab: usize,
}

/// One validated label per row; `None` marks an ignored row.
pub(crate) type RowLabel = Option<usize>;

/// A logits element type: how a row is widened to f32 for the maths and how an
/// f32 gradient row is written back.
pub(crate) trait Logit: Copy + Send + Sync + 'static {
    /// `(loss, lse)` of one row with target class `target` (see `op.rs`).
    fn row_loss_lse(row: &[Self], target: usize, scratch: &mut Vec<f32>) -> (f32, f32);
    /// Writes `softmax(row) * scale` into `out`.
    fn row_scaled_softmax(row: &[Self], lse: f32, scale: f32, out: &mut [Self], s: &mut Vec<f32>);
    /// Overwrites `row` with `softmax(row) * scale`.
    fn row_scaled_softmax_in_place(row: &mut [Self], lse: f32, scale: f32, s: &mut Vec<f32>);
    /// Rounds an f32 to this type.
    fn from_f32(v: f32) -> Self;
}

impl Logit for f32 {
    fn row_loss_lse(row: &[f32], target: usize, _: &mut Vec<f32>) -> (f32, f32) {
        loss_and_lse_f32(row, target)
    }
    fn row_scaled_softmax(row: &[f32], lse: f32, scale: f32, out: &mut [f32], _: &mut Vec<f32>) {
        (kernels().scaled_softmax)(row, lse, scale, out)
    }
    fn row_scaled_softmax_in_place(row: &mut [f32], lse: f32, scale: f32, _: &mut Vec<f32>) {
        (kernels().scaled_softmax_in_place)(row, lse, scale)
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
}

/// bf16 and f16 rows are widened into a per-thread f32 scratch row (it stays in
/// L2), processed there, and rounded back once.
macro_rules! impl_half_logit {
    ($t:ty, $widen:expr, $narrow:expr) => {
        impl Logit for $t {
            fn row_loss_lse(row: &[$t], target: usize, scratch: &mut Vec<f32>) -> (f32, f32) {
                loss_and_lse_f32(widen_into(row, scratch, $widen), target)
            }
            fn row_scaled_softmax(row: &[$t], lse: f32, scale: f32, out: &mut [$t], scratch: &mut Vec<f32>) {
                let wide = widen_into(row, scratch, $widen);
                (kernels().scaled_softmax_in_place)(wide, lse, scale);
                $narrow(wide, out);
            }
            fn row_scaled_softmax_in_place(row: &mut [$t], lse: f32, scale: f32, scratch: &mut Vec<f32>) {
                let wide = widen_into(row, scratch, $widen);
                (kernels().scaled_softmax_in_place)(wide, lse, scale);
                $narrow(wide, row);
            }
            fn from_f32(v: f32) -> $t {
                <$t>::from_f32(v)
            }
        }
    };
}
impl_half_logit!(bf16, |s: &[bf16], d: &mut [f32]| (kernels().widen_bf16)(s, d), |s: &[f32], d: &mut [bf16]| {
    (kernels().narrow_bf16)(s, d)
});
impl_half_logit!(f16, |s: &[f16], d: &mut [f32]| s.convert_to_f32_slice(d), |s: &[f32], d: &mut [f16]| d
    .convert_from_f32_slice(s));

fn widen_into<'a, T>(row: &[T], scratch: &'a mut Vec<f32>, widen: impl Fn(&[T], &mut [f32])) -> &'a mut [f32] {
    scratch.resize(row.len(), 0.0);
    widen(row, scratch);
    scratch
}

thread_local! {
    /// One f32 row per worker thread, reused across rows and calls so that the
    /// kernels allocate nothing in steady state.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Forward over all rows: returns `[loss, lse]` per row, row-major (`2 * rows`
/// values), zeros on ignored rows.
pub(crate) fn forward<T: Logit>(logits: &[T], layout: &RowLayout, labels: &[RowLabel], chunk_len: usize) -> Vec<f32> {
    let mut stats = vec![0f32; 2 * labels.len()];
    stats
        .par_chunks_mut(2 * chunk_len)
        .zip(labels.par_chunks(chunk_len))
        .zip(layout.row_offsets.par_chunks(chunk_len))
        .for_each(|((stats, labels), offsets)| {
            SCRATCH.with_borrow_mut(|scratch| {
                for ((out, label), &offset) in stats.chunks_exact_mut(2).zip(labels).zip(offsets) {
                    let Some(target) = *label else { continue };
                    let row = &logits[offset..offset + layout.vocab];
                    (out[0], out[1]) = T::row_loss_lse(row, target, scratch);
                }
            })
        });
    stats
}

/// Backward into a fresh contiguous `[rows, V]` buffer. `factors` holds
/// `[scale, lse, loss]` per row.
pub(crate) fn backward<T: Logit + Zeroed>(
    logits: &[T],
    layout: &RowLayout,
    labels: &[RowLabel],
    factors: &[f32],
    chunk_len: usize,
) -> Vec<T> {
    let vocab = layout.vocab;
    let mut grad = T::zeroed_vec(labels.len() * vocab);
    if vocab == 0 {
        return grad;
    }
    grad.par_chunks_mut(chunk_len * vocab)
        .zip(labels.par_chunks(chunk_len))
        .zip(factors.par_chunks(FACTORS * chunk_len))
        .zip(layout.row_offsets.par_chunks(chunk_len))
        .for_each(|(((grad, labels), factors), offsets)| {
            SCRATCH.with_borrow_mut(|scratch| {
                let rows = grad.chunks_exact_mut(vocab).zip(labels).zip(factors.chunks_exact(FACTORS)).zip(offsets);
                for (((out, label), f), &offset) in rows {
                    // Ignored rows keep the zeros the buffer was created with.
                    let Some(target) = *label else { continue };
                    let (scale, lse, loss) = (f[0], f[1], f[2]);
                    T::row_scaled_softmax(&logits[offset..offset + vocab], lse, scale, out, scratch);
                    out[target] = T::from_f32(target_grad(loss, scale));
                }
            })
        });
    grad
}

/// Backward written over the logits themselves (`inplace_grad`).
pub(crate) fn backward_in_place<T: Logit>(
    logits: &mut [T],
    layout: &RowLayout,
    labels: &[RowLabel],
    factors: &[f32],
    chunk_len: usize,
) {
    let vocab = layout.vocab;
    let base = SharedRows(logits.as_mut_ptr());
    let len = logits.len();
    (0..labels.len()).into_par_iter().with_min_len(chunk_len).for_each(|r| {
        let offset = layout.row_offsets[r];
        assert!(offset + vocab <= len, "row {r} outside the logits storage");
        // SAFETY: the caller rejected layouts with internal overlap (candle's
        // `inplace_op` refuses them), so distinct rows are disjoint slices of
        // `logits`, each inside it (asserted above); `logits` is borrowed
        // mutably for the whole call.
        let row = unsafe { std::slice::from_raw_parts_mut(base.get().add(offset), vocab) };
        match labels[r] {
            None => row.fill(T::from_f32(0.0)),
            Some(target) => SCRATCH.with_borrow_mut(|scratch| {
                let f = &factors[FACTORS * r..FACTORS * (r + 1)];
                let (scale, lse, loss) = (f[0], f[1], f[2]);
                T::row_scaled_softmax_in_place(row, lse, scale, scratch);
                row[target] = T::from_f32(target_grad(loss, scale));
            }),
        }
    });
}

/// Values per row in the backward `factors`: `[scale, lse, loss]`.
const FACTORS: usize = 3;

/// `(loss, lse)` of a row from its max, the target logit, and `rest`, the sum
/// of `exp(x_j - max)` over the other classes. When the target holds most of
/// the probability (`rest <= exp(x_y - max)`), `loss = ln(1 + rest /
/// exp(x_y - max))` keeps full relative precision where `lse - x_y` would
/// cancel (a confident token's loss of 3e-5 would lose ~1% in f32).
fn loss_and_lse<F: Float>(max: F, target_logit: F, rest: F) -> (F, F) {
    let target_term = (target_logit - max).exp();
    let total = rest + target_term;
    let lse = max + total.ln();
    let loss = if rest <= target_term { (rest / target_term).ln_1p() } else { (max - target_logit) + total.ln() };
    (loss, lse)
}

/// The target-class gradient `(p_y - 1) * scale` with `p_y = exp(-loss)`,
/// formed as `expm1` in f32 (f64) before any rounding to the logits' dtype, so
/// that it does not cancel when `p_y` is close to 1.
fn target_grad<F: Float>(loss: F, scale: F) -> F {
    (-loss).exp_m1() * scale
}

fn loss_and_lse_f32(row: &[f32], target: usize) -> (f32, f32) {
    let k = kernels();
    let max = (k.max)(row);
    let rest = (k.sum_exp)(&row[..target], max) + (k.sum_exp)(&row[target + 1..], max);
    loss_and_lse(max, row[target], rest)
}

/// A raw row pointer that rayon may share between threads.
#[derive(Clone, Copy)]
struct SharedRows<T>(*mut T);
// SAFETY: only used by `backward_in_place`, where every thread writes its own
// disjoint rows.
unsafe impl<T: Send> Send for SharedRows<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedRows<T> {}
impl<T> SharedRows<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// Float types whose all-zero bit pattern is `0.0`: a gradient buffer can come
/// straight from `calloc`, so its pages are first touched by the kernel's own
/// write instead of by a zero-fill pass.
pub(crate) trait Zeroed: Sized {
    fn zeroed_vec(len: usize) -> Vec<Self>;
}

macro_rules! impl_zeroed {
    ($($t:ty => $bits:ty),*) => {$(
        impl Zeroed for $t {
            fn zeroed_vec(len: usize) -> Vec<$t> {
                let bits = vec![<$bits>::default(); len];
                let mut bits = std::mem::ManuallyDrop::new(bits);
                let (ptr, len, cap) = (bits.as_mut_ptr(), bits.len(), bits.capacity());
                // SAFETY: `$t` has the size and alignment of `$bits`, and the
                // all-zero bit pattern is a valid `$t` (0.0); the allocation is
                // handed over whole and dropped only once, as a `Vec<$t>`.
                unsafe { Vec::from_raw_parts(ptr.cast::<$t>(), len, cap) }
            }
        }
    )*};
}
impl_zeroed!(f32 => u32, f64 => u64, bf16 => u16, f16 => u16);

// ---------------------------------------------------------------------------
// f64 rows: plain scalar maths in f64 (used for gradient checks, not speed).
// ---------------------------------------------------------------------------

/// Forward for f64 logits; returns `[loss, lse]` per row in f64.
pub(crate) fn forward_f64(logits: &[f64], layout: &RowLayout, labels: &[RowLabel]) -> Vec<f64> {
    let mut stats = vec![0f64; 2 * labels.len()];
    stats.par_chunks_mut(2).zip(labels.par_iter()).zip(layout.row_offsets.par_iter()).for_each(
        |((out, label), &offset)| {
            if let Some(target) = *label {
                let row = &logits[offset..offset + layout.vocab];
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum_exp = |xs: &[f64]| xs.iter().map(|&x| (x - max).exp()).sum::<f64>();
                let rest = sum_exp(&row[..target]) + sum_exp(&row[target + 1..]);
                (out[0], out[1]) = loss_and_lse(max, row[target], rest);
            }
        },
    );
    stats
}

/// Backward for f64 logits into a fresh contiguous buffer.
pub(crate) fn backward_f64(logits: &[f64], layout: &RowLayout, labels: &[RowLabel], factors: &[f64]) -> Vec<f64> {
    let vocab = layout.vocab;
    let mut grad = f64::zeroed_vec(labels.len() * vocab);
    if vocab == 0 {
        return grad;
    }
    grad.par_chunks_mut(vocab).enumerate().for_each(|(r, out)| {
        let row = &logits[layout.row_offsets[r]..layout.row_offsets[r] + vocab];
        out.copy_from_slice(row);
        row_grad_f64(out, labels[r], &factors[FACTORS * r..FACTORS * (r + 1)]);
    });
    grad
}

/// Backward for f64 logits written over the logits.
pub(crate) fn backward_in_place_f64(logits: &mut [f64], layout: &RowLayout, labels: &[RowLabel], factors: &[f64]) {
    for (r, &label) in labels.iter().enumerate() {
        let row = &mut logits[layout.row_offsets[r]..layout.row_offsets[r] + layout.vocab];
        row_grad_f64(row, label, &factors[FACTORS * r..FACTORS * (r + 1)]);
    }
}

/// Turns one row of f64 logits into its gradient, in place.
fn row_grad_f64(row: &mut [f64], label: RowLabel, factors: &[f64]) {
    let Some(target) = label else {
        row.fill(0.0);
        return;
    };
    let (scale, lse, loss) = (factors[0], factors[1], factors[2]);
    for x in row.iter_mut() {
        *x = (*x - lse).exp() * scale;
    }
    row[target] = target_grad(loss, scale);
}

// ---------------------------------------------------------------------------
// f32 row primitives, one body compiled per instruction set.
// ---------------------------------------------------------------------------

/// The f32 row primitives for the instruction set picked at start-up.
struct RowKernels {
    name: &'static str,
    max: fn(&[f32]) -> f32,
    sum_exp: fn(&[f32], f32) -> f32,
    scaled_softmax: fn(&[f32], f32, f32, &mut [f32]),
    scaled_softmax_in_place: fn(&mut [f32], f32, f32),
    widen_bf16: fn(&[bf16], &mut [f32]),
    narrow_bf16: fn(&[f32], &mut [bf16]),
}

/// Lanes per accumulator block: one AVX-512 register of f32.
const LANES: usize = 16;

/// `e^x` for `x <= 0` (larger values are not needed: rows are shifted by their
/// max or their log-sum-exp first). Cody-Waite reduction `x = n ln2 + r`,
/// `|r| <= ln2 / 2`, then a degree-7 Taylor polynomial (truncation error
/// below 6e-9 relative). Branch-free so that the loops below vectorise;
/// NaN propagates, and inputs below f32's normal range give exactly 0.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const UNDERFLOW: f32 = -87.336_55;
    let clamped = if x < UNDERFLOW { UNDERFLOW } else { x };
    let n = (clamped * LOG2_E + 0.5).floor();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    if x < UNDERFLOW {
        0.0
    } else {
        p * scale
    }
}

/// The largest element (`-inf` for an empty slice; NaN is skipped, and
/// surfaces later through `sum_exp`).
#[inline(always)]
fn max_body(row: &[f32]) -> f32 {
    let blocks = row.chunks_exact(LANES);
    let tail = blocks.remainder();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for block in blocks {
        for (m, &x) in lanes.iter_mut().zip(block) {
            *m = if x > *m { x } else { *m };
        }
    }
    lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `Σ exp(x - shift)` with `LANES` independent f32 accumulators.
#[inline(always)]
fn sum_exp_body(row: &[f32], shift: f32) -> f32 {
    let blocks = row.chunks_exact(LANES);
    let tail = blocks.remainder();
    let mut sums = [0f32; LANES];
    for block in blocks {
        for (s, &x) in sums.iter_mut().zip(block) {
            *s += exp_nonpositive(x - shift);
        }
    }
    sums.iter().sum::<f32>() + tail.iter().map(|&x| exp_nonpositive(x - shift)).sum::<f32>()
}

#[inline(always)]
fn scaled_softmax_body(row: &[f32], lse: f32, scale: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = exp_nonpositive(x - lse) * scale;
    }
}

#[inline(always)]
fn scaled_softmax_in_place_body(row: &mut [f32], lse: f32, scale: f32) {
    for x in row.iter_mut() {
        *x = exp_nonpositive(*x - lse) * scale;
    }
}

#[inline(always)]
fn widen_bf16_body(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

/// Round-to-nearest-even from f32 to bf16 (what `bf16::from_f32` does), in a
/// form that vectorises; NaN stays a quiet NaN.
#[inline(always)]
fn narrow_bf16_body(src: &[f32], dst: &mut [bf16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        let bits = s.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
        let out = if s.is_nan() { (bits >> 16) | 0x40 } else { rounded };
        *d = bf16::from_bits(out as u16);
    }
}

/// Instantiates the row primitives for one instruction set.
macro_rules! row_kernels {
    ($name:ident, $($feature:literal),*) => {
        mod $name {
            use super::*;
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn max(row: &[f32]) -> f32 { max_body(row) }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn sum_exp(row: &[f32], shift: f32) -> f32 { sum_exp_body(row, shift) }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn scaled_softmax(row: &[f32], lse: f32, scale: f32, out: &mut [f32]) {
                scaled_softmax_body(row, lse, scale, out)
            }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn scaled_softmax_in_place(row: &mut [f32], lse: f32, scale: f32) {
                scaled_softmax_in_place_body(row, lse, scale)
            }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn widen_bf16(src: &[bf16], dst: &mut [f32]) { widen_bf16_body(src, dst) }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn narrow_bf16(src: &[f32], dst: &mut [bf16]) { narrow_bf16_body(src, dst) }
        }
    };
}

#[cfg(target_arch = "x86_64")]
row_kernels!(avx512, "avx512f", "avx512bw", "avx512vl", "fma");
#[cfg(target_arch = "x86_64")]
row_kernels!(avx2, "avx2", "fma");

/// Builds a safe [`RowKernels`] table from one instruction set's module.
macro_rules! kernel_table {
    ($name:ident) => {
        RowKernels {
            name: stringify!($name),
            // SAFETY (all six): the table is built only after
            // `is_x86_feature_detected!` confirmed this module's features.
            max: |row| unsafe { $name::max(row) },
            sum_exp: |row, shift| unsafe { $name::sum_exp(row, shift) },
            scaled_softmax: |row, lse, scale, out| unsafe { $name::scaled_softmax(row, lse, scale, out) },
            scaled_softmax_in_place: |row, lse, scale| unsafe { $name::scaled_softmax_in_place(row, lse, scale) },
            widen_bf16: |src, dst| unsafe { $name::widen_bf16(src, dst) },
            narrow_bf16: |src, dst| unsafe { $name::narrow_bf16(src, dst) },
        }
    };
}

fn kernels() -> &'static RowKernels {
    static KERNELS: OnceLock<RowKernels> = OnceLock::new();
    KERNELS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
            {
                return kernel_table!(avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return kernel_table!(avx2);
            }
        }
        RowKernels {
            name: "portable",
            max: max_body,
            sum_exp: sum_exp_body,
            scaled_softmax: scaled_softmax_body,
            scaled_softmax_in_place: scaled_softmax_in_place_body,
            widen_bf16: widen_bf16_body,
            narrow_bf16: narrow_bf16_body,
        }
    })
}

/// The instruction set the CPU row kernels run with: `"avx512"`, `"avx2"` or
/// `"portable"`, detected once per process.
pub fn instruction_set() -> &'static str {
    kernels().name
}
