//! How far the kernels may be from the CPU engine.
//!
//! Both engines form every output in the accumulator type A (f32; f64 for f64
//! logits) from the same inputs, by different code (SIMD lanes, a polynomial
//! exp and 16 running sums on the CPU; exp2 of an FMA, and a tree over threads
//! here), and round it once to its type T. Two such results differ by
//! - the rounding to T: at most one step of T at the value w, eps_T |w| (eps_T
//!   the spacing of T at 1: 2^-7 for bf16, 2^-10 for f16, 2^-23 for f32, 2^-52
//!   for f64), plus T's smallest subnormal (2^-24 for f16; nothing, for the rest);
//! - what A's roundings leave of the terms that form the value: a few eps_A of
//!   the terms, which may cancel to a value much smaller than themselves.
//!
//! So each bound is eps_T |w| + tiny_T + K eps_A (terms), with the terms of
//! each output written in `Tolerance`; nothing else is allowed. (Before, a
//! 16-bit gradient had `8e-3 max(1, |w|)`: at V >= 4099 every softmax term is
//! below 8e-3, and kernels that dropped them passed every random case.)
//! Ignored rows and the storage outside the view are compared bit for bit.

use crate::launch::acc;
use candle::{DType, Result, Tensor};
use candle_chunked_ce::kernel_abi::KernelOptions;

/// The few `eps_A` of `K eps_A (terms)`. Measured over every case of this
/// file (2026-12-04): at most 3.4 (f64, the rows of equal logits in
/// `deciding_logits_in_the_upper_half_of_a_warp`), 1.1 for f32, and nothing
/// beyond the rounding for bf16 and f16.
pub(crate) const K: f64 = 8.0;

/// `(eps, tiny)` of `dtype`: the spacing of its numbers at 1, and its
/// smallest positive number (the spacing of its subnormals).
pub(crate) fn precision(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::BF16 => (2f64.powi(-7), 2f64.powi(-133)),
        DType::F16 => (2f64.powi(-10), 2f64.powi(-24)),
        DType::F32 => (2f64.powi(-23), 2f64.powi(-149)),
        DType::F64 => (2f64.powi(-52), f64::from_bits(1)),
        other => panic!("no precision for {other:?}"),
    }
}

/// The sizes of the terms behind each row's outputs, from the CPU engine's
/// `lse` and the row's soft-capped logits `x'` (finite ones; a non-finite
/// output is compared bit for bit):
/// - `lse` and `ce = lse - x'_y`: exponents `x'_j - lse` rounded in A, and a
///   sum of V exponentials (in `(0, 1]`, the largest 1) in another order, whose
///   roundings walk like `sqrt(V)` relative, an absolute error on its log
///   (rows of equal terms add theirs up, and stay within K of it at the V
///   they have here): `E = |lse| + max |x'| + sqrt(V)`;
/// - the logit sum `Σ c_j x'_j` (c the class weights, else 1): V terms of
///   either sign in another order, trees and lanes, `log2 V Σ |c_j x'_j|`;
/// - the accuracy: 0 or 1 from the same comparisons, exact;
/// - a gradient off the target, `(s p_j + g_sum c_j) cap'_j` with `s = g_ce + g_lse`
///   and `p_j = exp(x'_j - lse)`: `p_j` carries its exponent's error, relative
///   (`E`: the forward with gradient uses its own `lse`), so `E |s| p_max +
///   |g_sum| max c`, `p_max` the row's largest `p_j`;
/// - the target's, `(g_ce expm1(-ce) + g_lse exp(-ce) + g_sum c_y) cap'_y`
///   (no cancellation as `p_y -> 1`; see op/mod.rs), from a `ce` that carries `E`:
///   `(|g_ce| + |g_lse|) E + |g_sum| c_y`.
pub(crate) struct Tolerance {
    /// The logits' dtype (the gradients') and the accumulator's `eps`.
    pub(crate) dtype: DType,
    pub(crate) eps_acc: f64,
    pub(crate) vocab: usize,
    pub(crate) rows: Vec<RowTerms>,
}

pub(crate) struct RowTerms {
    /// The target, `None` for an ignored row (its gradient must be exactly 0).
    pub(crate) target: Option<usize>,
    /// `E = |lse| + max |x'| + sqrt(V)`.
    pub(crate) exponent: f64,
    /// `log2 V Σ |c_j x'_j|`.
    pub(crate) logit_sum: f64,
    /// `max_j exp(x'_j - lse)`.
    pub(crate) p_max: f64,
    /// `max c` and `c_y` (1 without class weights).
    pub(crate) c_max: f64,
    pub(crate) c_target: f64,
}

impl Tolerance {
    pub(crate) fn new(logits: &Tensor, labels: &[i64], options: &KernelOptions, cpu_stats: &Tensor) -> Result<Self> {
        let (dtype, vocab) = (logits.dtype(), logits.dim(candle::D::Minus1)?);
        let rows: Vec<Vec<f64>> = logits.to_dtype(DType::F64)?.reshape(((), vocab))?.to_vec2()?;
        let lse: Vec<f64> = cpu_stats.narrow(1, 1, 1)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let weights: Option<Vec<f64>> =
            options.sum_weights.as_ref().map(|w| w.to_dtype(DType::F64)?.to_vec1()).transpose()?;
        let weight = |j: usize| weights.as_ref().map_or(1.0, |w| w[j]);
        let log_vocab = (vocab.max(2) as f64).log2();
        let rows = rows
            .iter()
            .zip(&lse)
            .zip(labels)
            .map(|((row, &lse), &label)| {
                let capped = row.iter().map(|&x| options.softcap.map_or(x, |cap| cap * (x / cap).tanh()));
                let finite: Vec<(usize, f64)> = capped.enumerate().filter(|(_, x)| x.is_finite()).collect();
                let largest = finite.iter().fold(0f64, |m, (_, x)| m.max(x.abs()));
                let lse_size = if lse.is_finite() { lse.abs() } else { 0.0 };
                let target = (label != options.ignore_index).then_some(label as usize);
                RowTerms {
                    target,
                    exponent: lse_size + largest + (vocab as f64).sqrt(),
                    logit_sum: log_vocab * finite.iter().map(|&(j, x)| (weight(j) * x).abs()).sum::<f64>(),
                    // f64::max skips the NaN of a NaN lse.
                    p_max: finite.iter().fold(0f64, |m, (_, x)| m.max((x - lse).exp())),
                    c_max: weights.as_ref().map_or(1.0, |w| w.iter().fold(0f64, |m, c| m.max(c.abs()))),
                    c_target: target.map_or(1.0, |y| weight(y).abs()),
                }
            })
            .collect();
        Ok(Self { dtype, eps_acc: precision(acc(dtype)).0, vocab, rows })
    }

    /// Per row, the bounds of statistic `stat` (as `Stat` names it) around the CPU's `want` `[rows, 1]`.
    pub(crate) fn stat_bounds(&self, stat: &str, want: &Tensor) -> Result<Vec<f64>> {
        let (eps, tiny) = precision(want.dtype());
        let want: Vec<f64> = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        Ok(self
            .rows
            .iter()
            .zip(want)
            .map(|(row, w)| {
                let terms = match stat {
                    "ce" | "lse" => row.exponent,
                    "logit_sum" => row.logit_sum,
                    "correct" => return 0.0,
                    other => panic!("no statistic {other}"),
                };
                eps * w.abs() + tiny + K * self.eps_acc * terms
            })
            .collect())
    }

    /// Per element, the bounds of the gradient around the CPU's `want`
    /// `[rows.., V]`, from the factors `[rows, 5] = (g_ce, g_lse, g_sum, lse, ce)`.
    pub(crate) fn grad_bounds(&self, factors: &Tensor, want: &Tensor) -> Result<Vec<f64>> {
        let (eps, tiny) = precision(self.dtype);
        let factors: Vec<Vec<f64>> = factors.to_dtype(DType::F64)?.to_vec2()?;
        let want: Vec<f64> = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let mut bounds = vec![0.0; want.len()];
        for (r, (row, f)) in self.rows.iter().zip(&factors).enumerate() {
            let Some(target) = row.target else { continue };
            let (g_ce, g_lse, g_sum) = (f[0].abs(), f[1].abs(), f[2].abs());
            let off_target = row.exponent * (f[0] + f[1]).abs() * row.p_max + g_sum * row.c_max;
            let at_target = (g_ce + g_lse) * row.exponent + g_sum * row.c_target;
            for j in 0..self.vocab {
                let terms = if j == target { at_target } else { off_target };
                let i = r * self.vocab + j;
                bounds[i] = eps * want[i].abs() + tiny + K * self.eps_acc * terms;
            }
        }
        Ok(bounds)
    }
}

/// `|got - want| <= bound` element by element, in f64; where `want` is NaN,
/// `got` is NaN, and where it is infinite, the same infinity.
pub(crate) fn assert_within(what: &str, got: &Tensor, want: &Tensor, bounds: &[f64]) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let want = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(bounds.len(), want.len(), "{what}: one bound per element");
    for (i, ((g, w), bound)) in got.iter().zip(&want).zip(bounds).enumerate() {
        let ok = if w.is_nan() || w.is_infinite() {
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
        } else {
            (g - w).abs() <= *bound
        };
        assert!(ok, "{what}: element {i} is {g}, the CPU engine gives {w} (bound {bound:e})");
    }
    Ok(())
}
