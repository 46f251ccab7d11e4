//! f64 rows: plain scalar maths in f64 (used for gradient checks, not speed),
//! the same maths as the SIMD rows of `mod.rs`.

use super::{ce_and_lse, target_is_first_argmax, RowGrad, RowLayout, Zeroed};
use crate::config::{RowLabel, RowTerms, FACTORS, STATS};
use rayon::prelude::*;

/// Forward for f64 logits; returns [`STATS`] values per row in f64.
pub(crate) fn forward_f64(
    logits: &[f64],
    layout: &RowLayout,
    labels: &[RowLabel],
    terms: RowTerms,
    sum_weights: Option<&[f64]>,
) -> Vec<f64> {
    let mut stats = vec![0f64; STATS * labels.len()];
    stats.par_chunks_mut(STATS).zip(labels.par_iter()).zip(layout.row_offsets.par_iter()).for_each(
        |((out, label), &offset)| {
            if let Some(target) = *label {
                let row: Vec<f64> = logits[offset..offset + layout.vocab].iter().map(|&x| capped(x, terms)).collect();
                let first_max = |xs: &[f64]| xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let (before_max, after_max) = (first_max(&row[..target]), first_max(&row[target + 1..]));
                let max = before_max.max(after_max).max(row[target]);
                let sum_exp = |xs: &[f64]| xs.iter().map(|&x| (x - max).exp()).sum::<f64>();
                let rest = sum_exp(&row[..target]) + sum_exp(&row[target + 1..]);
                let (ce, lse) = ce_and_lse(max, row[target], rest);
                let logit_sum = match (terms.logit_sum, sum_weights) {
                    (false, _) => 0.0,
                    (true, None) => row.iter().sum(),
                    (true, Some(weights)) => row.iter().zip(weights).map(|(x, w)| x * w).sum(),
                };
                let reaches_before = || row[..target].iter().any(|&x| x >= row[target]);
                let correct = target_is_first_argmax(row[target], before_max, after_max, reaches_before);
                // In `Stat`'s order.
                out.copy_from_slice(&[ce, lse, logit_sum, f64::from(u8::from(correct))]);
            }
        },
    );
    stats
}

/// `1 - tanh²(u)` as `4e / (1 + e)²`, `e = exp(-2|u|)`: no cancellation where
/// the soft-cap saturates.
fn softcap_slope(u: f64) -> f64 {
    let e = (-2.0 * u.abs()).exp();
    4.0 * e / ((1.0 + e) * (1.0 + e))
}

/// `cap * tanh(x / cap)` when soft-capping, else `x`.
fn capped(x: f64, terms: RowTerms) -> f64 {
    match terms.softcap {
        Some(cap) => cap * (x / cap).tanh(),
        None => x,
    }
}

/// Backward for f64 logits into a fresh contiguous buffer.
pub(crate) fn backward_f64(
    logits: &[f64],
    layout: &RowLayout,
    labels: &[RowLabel],
    factors: &[f64],
    terms: RowTerms,
    sum_weights: Option<&[f64]>,
) -> Vec<f64> {
    let vocab = layout.vocab;
    let mut grad = f64::zeroed_vec(labels.len() * vocab);
    if vocab == 0 {
        return grad;
    }
    grad.par_chunks_mut(vocab).enumerate().for_each(|(r, out)| {
        let row = &logits[layout.row_offsets[r]..layout.row_offsets[r] + vocab];
        out.copy_from_slice(row);
        row_grad_f64(out, labels[r], &factors[FACTORS * r..FACTORS * (r + 1)], terms, sum_weights);
    });
    grad
}

/// Backward for f64 logits written over the logits.
pub(crate) fn backward_in_place_f64(
    logits: &mut [f64],
    layout: &RowLayout,
    labels: &[RowLabel],
    factors: &[f64],
    terms: RowTerms,
    sum_weights: Option<&[f64]>,
) {
    for (r, &label) in labels.iter().enumerate() {
        let row = &mut logits[layout.row_offsets[r]..layout.row_offsets[r] + layout.vocab];
        row_grad_f64(row, label, &factors[FACTORS * r..FACTORS * (r + 1)], terms, sum_weights);
    }
}

/// Turns one row of f64 logits into its gradient, in place.
fn row_grad_f64(row: &mut [f64], label: RowLabel, factors: &[f64], terms: RowTerms, sum_weights: Option<&[f64]>) {
    let Some(target) = label else {
        row.fill(0.0);
        return;
    };
    let weight = |j: usize| sum_weights.map_or(1.0, |w| w[j]);
    let g = RowGrad::new(factors, weight(target));
    let cap_slope = |x: f64| match terms.softcap {
        Some(cap) => softcap_slope(x / cap),
        None => 1.0,
    };
    let target_slope = cap_slope(row[target]);
    for (j, x) in row.iter_mut().enumerate() {
        *x = ((capped(*x, terms) - g.lse).exp() * g.scale + g.shift * weight(j)) * cap_slope(*x);
    }
    row[target] = g.target * target_slope;
}
