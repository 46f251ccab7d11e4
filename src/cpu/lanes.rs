//! The f32 row primitives under the fused CPU kernels, written once as
//! branch-free loops over lanes and compiled for AVX-512, AVX2+FMA and a
//! portable baseline; the instruction set is detected once per process.
//!
//! Rows of f32 and bf16 are read and written directly (bf16 is widened and
//! rounded lane by lane, so it never needs a scratch row); everything is
//! accumulated in f32.

use half::bf16;
use std::sync::OnceLock;

/// A logits element the row primitives read and write directly.
pub(crate) trait Lane: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
    /// Rounds to nearest, ties to even.
    fn narrow(v: f32) -> Self;
    /// The primitives for this element type and the detected instruction set.
    fn kernels() -> &'static RowKernels<Self>;
}

impl Lane for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> f32 {
        v
    }
    fn kernels() -> &'static RowKernels<f32> {
        static KERNELS: OnceLock<RowKernels<f32>> = OnceLock::new();
        KERNELS.get_or_init(select)
    }
}

impl Lane for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    /// What `bf16::from_f32` does, in a form that vectorises; NaN stays a
    /// quiet NaN.
    #[inline(always)]
    fn narrow(v: f32) -> bf16 {
        let bits = v.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
        let out = if v.is_nan() { (bits >> 16) | 0x40 } else { rounded };
        bf16::from_bits(out as u16)
    }
    fn kernels() -> &'static RowKernels<bf16> {
        static KERNELS: OnceLock<RowKernels<bf16>> = OnceLock::new();
        KERNELS.get_or_init(select)
    }
}

/// The row primitives for one element type, compiled for one instruction set.
pub(crate) struct RowKernels<T> {
    /// `"avx512"`, `"avx2"` or `"portable"`.
    pub name: &'static str,
    /// `(max, Σ exp(x - max))` of a row: see [`max_sum_exp_body`].
    pub max_sum_exp: fn(&[T]) -> (f32, f32),
    /// `out = exp(row - lse) * scale + shift`.
    pub scaled_softmax: fn(&[T], f32, f32, f32, &mut [T]),
    /// `row = exp(row - lse) * scale + shift`.
    pub scaled_softmax_in_place: fn(&mut [T], f32, f32, f32),
}

/// The f32-only primitives of the optional loss terms (soft-capping and label
/// smoothing), which run on a widened f32 copy of the row.
pub(crate) struct F32Kernels {
    /// `row = cap * tanh(row / cap)`.
    pub softcap_in_place: fn(&mut [f32], f32),
    /// `row = (exp(c - lse) * scale + shift) * (1 - tanh²(row / cap))` with
    /// `c = cap * tanh(row / cap)`: the gradient through the soft-cap of a raw row.
    pub softcap_grad_in_place: fn(&mut [f32], f32, f32, f32, f32),
    /// `Σ row`, accumulated in f64.
    pub sum: fn(&[f32]) -> f64,
    /// `Σ row_j w_j`, accumulated in f64: the class-weighted logit sum.
    pub weighted_sum: fn(&[f32], &[f32]) -> f64,
    /// `row = exp(row - lse) * scale + shift * w_j`: the gradient of a row
    /// whose logit sum is class-weighted by `w`.
    pub weighted_grad_in_place: fn(&mut [f32], &[f32], f32, f32, f32),
    /// [`softcap_grad_in_place`](Self::softcap_grad_in_place) with the
    /// class-weighted shift `shift * w_j`.
    pub weighted_softcap_grad_in_place: fn(&mut [f32], &[f32], f32, f32, f32, f32),
}

/// Lanes per accumulator block: one AVX-512 register of f32.
const LANES: usize = 16;

/// Elements per block of the online reduction: 4 KiB of f32, so that the
/// second read of a block (for the exponentials) hits L1 while the first
/// streams from memory.
const BLOCK: usize = 1024;

/// `e^x` for `x <= 0` (larger values are not needed: rows are shifted by their
/// max or their log-sum-exp first). Cody-Waite reduction `x = n ln2 + r`,
/// `|r| <= ln2 / 2`, then a degree-6 polynomial interpolating `e^r` at the
/// Chebyshev nodes of that interval (2.5e-9 relative error in exact
/// arithmetic, about 1e-7 once evaluated in f32, as for degree 7).
/// Branch-free and without float-to-int casts (Rust's saturating `as i32`
/// does not vectorise), so the loops below compile to AVX-512 / AVX2 lanes;
/// NaN propagates, and inputs below f32's normal range give exactly 0.
/// `FMA` fuses the multiply-adds: only where the instruction set has FMA
/// (elsewhere `mul_add` is a slow library call).
#[inline(always)]
fn exp_nonpositive<const FMA: bool>(x: f32) -> f32 {
    let fma = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const UNDERFLOW: f32 = -87.336_55;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;
    let clamped = if x < UNDERFLOW { UNDERFLOW } else { x };
    let shifted = clamped * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = fma(-n, LN2_LO, fma(-n, LN2_HI, clamped));
    // The coefficients of r^6 .. r^0, rounded to f32 (those of r^2, r and 1 round to 0.5, 1 and 1).
    let mut p = 0.001_394_110_8;
    for c in [0.008_375_126, 0.041_666_35, 0.166_664_15, 0.5, 1.0, 1.0] {
        p = fma(p, r, c);
    }
    // 2^n for n in [-126, 0]: the low bits of `shifted` hold n; add the exponent
    // bias and shift it into the exponent field (the rounder's own bits shift out).
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    if x < UNDERFLOW {
        0.0
    } else {
        p * scale
    }
}

/// The largest element (`-inf` for an empty slice; NaN is skipped here and
/// surfaces through the sum of exponentials).
#[inline(always)]
fn max_body<T: Lane>(row: &[T]) -> f32 {
    let blocks = row.chunks_exact(LANES);
    let tail = blocks.remainder();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for block in blocks {
        for (m, &x) in lanes.iter_mut().zip(block) {
            let x = x.widen();
            *m = if x > *m { x } else { *m };
        }
    }
    lanes.into_iter().chain(tail.iter().map(|x| x.widen())).fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m })
}

/// `Σ exp(x - shift)` with `LANES` independent f32 accumulators.
#[inline(always)]
fn sum_exp_body<T: Lane, const FMA: bool>(row: &[T], shift: f32) -> f32 {
    let blocks = row.chunks_exact(LANES);
    let tail = blocks.remainder();
    let mut sums = [0f32; LANES];
    for block in blocks {
        for (s, &x) in sums.iter_mut().zip(block) {
            *s += exp_nonpositive::<FMA>(x.widen() - shift);
        }
    }
    sums.iter().sum::<f32>() + tail.iter().map(|&x| exp_nonpositive::<FMA>(x.widen() - shift)).sum::<f32>()
}

/// `(max, Σ exp(x - max))` in one pass over memory: each block's max is found,
/// the running sum is rescaled when the max grows, and the block's
/// exponentials are summed while it is in L1. `(-inf, 0)` for an empty or
/// all `-inf` row; NaN propagates into the sum.
#[inline(always)]
fn max_sum_exp_body<T: Lane, const FMA: bool>(row: &[T]) -> (f32, f32) {
    let mut max = f32::NEG_INFINITY;
    let mut sum = 0f32;
    for block in row.chunks(BLOCK) {
        let block_max = max_body(block);
        if block_max > max {
            sum *= (max - block_max).exp();
            max = block_max;
        }
        if max > f32::NEG_INFINITY {
            sum += sum_exp_body::<T, FMA>(block, max);
        } else if block.iter().any(|x| x.widen().is_nan()) {
            sum = f32::NAN;
        }
    }
    (max, sum)
}

#[inline(always)]
fn scaled_softmax_body<T: Lane, const FMA: bool>(row: &[T], lse: f32, scale: f32, shift: f32, out: &mut [T]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = T::narrow(exp_nonpositive::<FMA>(x.widen() - lse) * scale + shift);
    }
}

#[inline(always)]
fn scaled_softmax_in_place_body<T: Lane, const FMA: bool>(row: &mut [T], lse: f32, scale: f32, shift: f32) {
    for x in row.iter_mut() {
        *x = T::narrow(exp_nonpositive::<FMA>(x.widen() - lse) * scale + shift);
    }
}

/// `(tanh(u), 1 - tanh²(u))`, branch-free, from `e = exp(-2|u|)`: `tanh =
/// ±(1 - e) / (1 + e)`, or its Taylor series `u - u^3/3 + 2u^5/15 - 17u^7/315`
/// for `|u| < 1/16`, where `1 - e` would lose relative precision (the series'
/// truncation error there is below 4e-9 relative); the slope is `4e / (1 +
/// e)²`, which keeps full relative precision where `1 - tanh²` cancels (a
/// saturated soft-cap, `|u|` of 5 and more).
#[inline(always)]
fn tanh_and_slope<const FMA: bool>(u: f32) -> (f32, f32) {
    let fma = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let magnitude = u.abs();
    let e = exp_nonpositive::<FMA>(-2.0 * magnitude);
    let large = ((1.0 - e) / (1.0 + e)).copysign(u);
    let u2 = u * u;
    let small = u * fma(u2, fma(u2, fma(u2, -17.0 / 315.0, 2.0 / 15.0), -1.0 / 3.0), 1.0);
    let tanh = if magnitude < 0.0625 { small } else { large };
    (tanh, 4.0 * e / ((1.0 + e) * (1.0 + e)))
}

#[inline(always)]
fn softcap_in_place_body<const FMA: bool>(row: &mut [f32], cap: f32) {
    let inv_cap = 1.0 / cap;
    for x in row.iter_mut() {
        *x = cap * tanh_and_slope::<FMA>(*x * inv_cap).0;
    }
}

#[inline(always)]
fn softcap_grad_in_place_body<const FMA: bool>(row: &mut [f32], lse: f32, scale: f32, shift: f32, cap: f32) {
    let inv_cap = 1.0 / cap;
    for x in row.iter_mut() {
        let (tanh, slope) = tanh_and_slope::<FMA>(*x * inv_cap);
        *x = (exp_nonpositive::<FMA>(cap * tanh - lse) * scale + shift) * slope;
    }
}

/// The soft-cap's slope `1 - tanh²(x / cap)` at one raw logit `x` (see
/// [`tanh_and_slope`]).
pub(crate) fn softcap_slope(x: f32, cap: f32) -> f32 {
    tanh_and_slope::<false>(x / cap).1
}

#[inline(always)]
fn weighted_grad_in_place_body<const FMA: bool>(row: &mut [f32], weights: &[f32], lse: f32, scale: f32, shift: f32) {
    for (x, &w) in row.iter_mut().zip(weights) {
        *x = exp_nonpositive::<FMA>(*x - lse) * scale + shift * w;
    }
}

#[inline(always)]
fn weighted_softcap_grad_in_place_body<const FMA: bool>(
    row: &mut [f32],
    weights: &[f32],
    lse: f32,
    scale: f32,
    shift: f32,
    cap: f32,
) {
    let inv_cap = 1.0 / cap;
    for (x, &w) in row.iter_mut().zip(weights) {
        let (tanh, slope) = tanh_and_slope::<FMA>(*x * inv_cap);
        *x = (exp_nonpositive::<FMA>(cap * tanh - lse) * scale + shift * w) * slope;
    }
}

#[inline(always)]
fn weighted_sum_body(row: &[f32], weights: &[f32]) -> f64 {
    let (blocks, weight_blocks) = (row.chunks_exact(LANES), weights.chunks_exact(LANES));
    let tail: f64 = blocks.remainder().iter().zip(weight_blocks.remainder()).map(|(&x, &w)| (x * w) as f64).sum();
    let mut sums = [0f64; LANES];
    for (block, weight_block) in blocks.zip(weight_blocks) {
        for ((s, &x), &w) in sums.iter_mut().zip(block).zip(weight_block) {
            *s += (x * w) as f64;
        }
    }
    sums.iter().sum::<f64>() + tail
}

#[inline(always)]
fn sum_body(row: &[f32]) -> f64 {
    let blocks = row.chunks_exact(LANES);
    let tail = blocks.remainder();
    let mut sums = [0f64; LANES];
    for block in blocks {
        for (s, &x) in sums.iter_mut().zip(block) {
            *s += x as f64;
        }
    }
    sums.iter().sum::<f64>() + tail.iter().map(|&x| x as f64).sum::<f64>()
}

/// Instantiates the row primitives for one instruction set.
macro_rules! instruction_set {
    ($name:ident, $($feature:literal),*) => {
        mod $name {
            use super::*;
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn max_sum_exp<T: Lane>(row: &[T]) -> (f32, f32) {
                max_sum_exp_body::<T, true>(row)
            }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn scaled_softmax<T: Lane>(row: &[T], lse: f32, scale: f32, shift: f32, out: &mut [T]) {
                scaled_softmax_body::<T, true>(row, lse, scale, shift, out)
            }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn scaled_softmax_in_place<T: Lane>(row: &mut [T], lse: f32, scale: f32, shift: f32) {
                scaled_softmax_in_place_body::<T, true>(row, lse, scale, shift)
            }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn softcap_in_place(row: &mut [f32], cap: f32) {
                softcap_in_place_body::<true>(row, cap)
            }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn softcap_grad_in_place(row: &mut [f32], lse: f32, scale: f32, shift: f32, cap: f32) {
                softcap_grad_in_place_body::<true>(row, lse, scale, shift, cap)
            }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn sum(row: &[f32]) -> f64 {
                sum_body(row)
            }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn weighted_sum(row: &[f32], weights: &[f32]) -> f64 {
                weighted_sum_body(row, weights)
            }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn weighted_grad_in_place(row: &mut [f32], weights: &[f32], lse: f32, scale: f32, shift: f32) {
                weighted_grad_in_place_body::<true>(row, weights, lse, scale, shift)
            }
            #[target_feature($(enable = $feature),*)]
            pub unsafe fn weighted_softcap_grad_in_place(
                row: &mut [f32],
                weights: &[f32],
                lse: f32,
                scale: f32,
                shift: f32,
                cap: f32,
            ) {
                weighted_softcap_grad_in_place_body::<true>(row, weights, lse, scale, shift, cap)
            }
            // SAFETY (every closure below): `table` and `f32_table` are only called
            // after `is_x86_feature_detected!` confirmed this module's features.
            pub fn table<T: Lane>() -> RowKernels<T> {
                RowKernels {
                    name: stringify!($name),
                    max_sum_exp: |row| unsafe { max_sum_exp(row) },
                    scaled_softmax: |row, lse, scale, shift, out| unsafe { scaled_softmax(row, lse, scale, shift, out) },
                    scaled_softmax_in_place: |row, lse, scale, shift| unsafe {
                        scaled_softmax_in_place(row, lse, scale, shift)
                    },
                }
            }
            pub fn f32_table() -> F32Kernels {
                F32Kernels {
                    softcap_in_place: |row, cap| unsafe { softcap_in_place(row, cap) },
                    softcap_grad_in_place: |row, lse, scale, shift, cap| unsafe {
                        softcap_grad_in_place(row, lse, scale, shift, cap)
                    },
                    sum: |row| unsafe { sum(row) },
                    weighted_sum: |row, weights| unsafe { weighted_sum(row, weights) },
                    weighted_grad_in_place: |row, weights, lse, scale, shift| unsafe {
                        weighted_grad_in_place(row, weights, lse, scale, shift)
                    },
                    weighted_softcap_grad_in_place: |row, weights, lse, scale, shift, cap| unsafe {
                        weighted_softcap_grad_in_place(row, weights, lse, scale, shift, cap)
                    },
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
instruction_set!(avx512, "avx512f", "avx512bw", "avx512vl", "fma");
#[cfg(target_arch = "x86_64")]
instruction_set!(avx2, "avx2", "fma");

/// The f32 primitives of the optional loss terms, for the detected instruction set.
pub(crate) fn f32_kernels() -> &'static F32Kernels {
    static KERNELS: OnceLock<F32Kernels> = OnceLock::new();
    KERNELS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        match detect() {
            Some(InstructionSet::Avx512) => return avx512::f32_table(),
            Some(InstructionSet::Avx2) => return avx2::f32_table(),
            None => {}
        }
        F32Kernels {
            softcap_in_place: softcap_in_place_body::<false>,
            softcap_grad_in_place: softcap_grad_in_place_body::<false>,
            sum: sum_body,
            weighted_sum: weighted_sum_body,
            weighted_grad_in_place: weighted_grad_in_place_body::<false>,
            weighted_softcap_grad_in_place: weighted_softcap_grad_in_place_body::<false>,
        }
    })
}

#[cfg(target_arch = "x86_64")]
enum InstructionSet {
    Avx512,
    Avx2,
}

/// The best of our instruction sets this CPU has, if any.
#[cfg(target_arch = "x86_64")]
fn detect() -> Option<InstructionSet> {
    let has = |features: &[bool]| features.iter().all(|&f| f);
    if has(&[
        is_x86_feature_detected!("avx512f"),
        is_x86_feature_detected!("avx512bw"),
        is_x86_feature_detected!("avx512vl"),
        is_x86_feature_detected!("fma"),
    ]) {
        Some(InstructionSet::Avx512)
    } else if has(&[is_x86_feature_detected!("avx2"), is_x86_feature_detected!("fma")]) {
        Some(InstructionSet::Avx2)
    } else {
        None
    }
}

/// The row primitives for the best instruction set this CPU has.
fn select<T: Lane>() -> RowKernels<T> {
    #[cfg(target_arch = "x86_64")]
    match detect() {
        Some(InstructionSet::Avx512) => return avx512::table(),
        Some(InstructionSet::Avx2) => return avx2::table(),
        None => {}
    }
    RowKernels {
        name: "portable",
        max_sum_exp: max_sum_exp_body::<T, false>,
        scaled_softmax: scaled_softmax_body::<T, false>,
        scaled_softmax_in_place: scaled_softmax_in_place_body::<T, false>,
    }
}
