//! The tests' CPU oracle for the kernels (feature `testing`).

use super::{logits_grad, row_stats};
use crate::config::{Engine, OpConfig, RowTerms};
use crate::kernel_abi::KernelOptions;
use candle::{Result, Tensor};

/// The crate's fused CPU engine on the kernels' inputs: `[N, 4] = (ce, lse,
/// logit_sum, correct)` of `logits` (`[.., V]` on the CPU, last dim
/// unit-stride) against `labels` (`[N]` i64), with `options.sum_weights` (on
/// the CPU) as the logit sum's class weights: the oracle of
/// `tests/kernels_on_cpu.rs`, beside the launch descriptions of
/// [`crate::kernel_abi`] that it tests.
///
/// # Errors
/// A label outside `[0, V)` that is not `options.ignore_index`, named with its
/// row; class weights that are not `[V]` in the accumulator type.
pub fn cpu_row_stats(logits: &Tensor, labels: &Tensor, options: &KernelOptions) -> Result<Tensor> {
    row_stats(logits, labels, &cpu_config(logits, options, false)?)
}

/// The crate's fused CPU engine's gradient from `factors` (`[N, 5] = (g_ce,
/// g_lse, g_sum, lse, ce)`), shaped like `logits`, with `options.sum_weights`
/// in its `g_sum` terms; with `in_place` it is written over `logits`' storage.
///
/// # Errors
/// As [`cpu_row_stats`].
pub fn cpu_logits_grad(
    logits: &Tensor,
    labels: &Tensor,
    factors: &Tensor,
    options: &KernelOptions,
    in_place: bool,
) -> Result<Tensor> {
    logits_grad(logits, labels, factors, &cpu_config(logits, options, in_place)?)
}

/// The fused CPU engine's settings for `options`, whose class weights must fit
/// `logits` as they must for a launch.
fn cpu_config(logits: &Tensor, options: &KernelOptions, inplace_grad: bool) -> Result<OpConfig> {
    options.weighted(logits.dim(candle::D::Minus1)?, logits.dtype(), true)?;
    Ok(OpConfig {
        engine: Engine::Fused,
        ignore_index: options.ignore_index,
        chunk_len: 32,
        inplace_grad,
        terms: RowTerms { softcap: options.softcap, logit_sum: options.logit_sum },
        sum_weights: options.sum_weights.clone(),
        labels_checked: false,
    })
}
