//! The loss as one node of candle's graph, and its hand-written backward.
//!
//! # The maths (the one place it is written)
//!
//! For a row of logits `x` (length `V`) with target `y`, in f32 (f64 for f64
//! logits), after the optional soft-cap `x'_j = cap * tanh(x_j / cap)`
//! (`x' = x` without it), the kernels compute four statistics:
//!
//! ```text
//! ce        = lse - x'_y                 lse = max(x') + ln Σ_j exp(x'_j - max(x'))
//! logit_sum = Σ_j c_j x'_j               (only with label smoothing)
//! correct   = 1 if y is the first index of max(x'), else 0  (token accuracy)
//! ```
//!
//! all 0 on ignored rows, with `c` the class weights (`c_j = 1` without
//! them). The per-token loss is then composed from them by ordinary candle
//! ops on `[N]` values (`loss.rs`):
//!
//! ```text
//! loss = t [c_y (1 - ε) ce + ε (C lse - logit_sum) / V + z lse²]      C = Σ_j c_j
//! ```
//!
//! (label smoothing `ε` and class weights `c` as in PyTorch, whose smoothing
//! term is `ε / V Σ_j c_j (lse - x'_j)`; `z` the z-loss coefficient; `t` the
//! token's loss weight, 1 without them), so that candle's autograd delivers
//! the upstream gradients `g_ce`, `g_lse`, `g_sum` of the three differentiable
//! statistics (the mean's `1 / n`, the weights, the `(1 - ε)`, the `2 z lse`
//! are folded into them). The gradient of the row is then
//!
//! ```text
//! p_j    = exp(x'_j - lse)
//! grad_j = ((g_ce + g_lse) p_j + g_sum c_j) * cap'_j          for j != y
//! grad_y = (g_ce (p_y - 1) + g_lse p_y + g_sum c_y) * cap'_y
//! cap'_j = 1 - tanh²(x_j / cap) = 4e / (1 + e)²,  e = exp(-2 |x_j / cap|)
//!                                                         (1 without soft-cap)
//! ```
//!
//! and 0 on ignored rows. The slope is formed from the raw logit as `4e / (1 +
//! e)²`, not as `1 - (x'_j / cap)²`, which cancels where the cap saturates.
//!
//! `ce` and `p_y - 1` are evaluated so that they do not cancel when the target
//! holds most of the probability (`p_y -> 1`, common late in training): with
//! `rest = Σ_{j≠y} exp(x'_j - max)`, `ce = ln(1 + rest / exp(x'_y - max))` when
//! `rest <= exp(x'_y - max)`, and `p_y - 1` is `expm1(-ce)` (the fused kernels)
//! or `-Σ_{j≠y} p_j` (the primitive engine), formed in f32 before the gradient
//! is rounded to the logits' dtype. PyTorch forms `exp(log_softmax) - 1` and
//! keeps only about 3 significant digits of a 3e-5 gradient in f32. The CPU
//! kernels (`src/cpu/`), the CUDA kernels (`cuda/cross_entropy.cu`) and the
//! primitive engine (`src/primitive.rs`) all compute exactly this.
//!
//! # The graph
//!
//! A forward engine computes the per-row statistics `[N, 4] = (ce, lse,
//! logit_sum, correct)` without recording anything; a [`StatsNode`] then
//! attaches them to the graph as a single node over the loss's differentiable
//! inputs (`logits`, or `hidden`, `weight` and an optional bias for the linear
//! loss). Chunking happens inside the engines, never as `narrow` nodes in the
//! graph (candle's `narrow` backward pads every chunk to full size, which would
//! make the loss quadratic). The node's backward keeps `lse` and `ce` from the
//! forward, so backward is one pass that never re-reduces a row.
//!
//! On a device where no custom op of this crate runs ([`kernels_cover`]),
//! there is no node: `Engine::Autograd` records the primitive engine's
//! statistics op by op (`primitive::row_stats_recorded`), and candle's
//! autograd differentiates them.
//!
//! # Files
//!
//! This module holds what the losses call; `node.rs` the graph node and its
//! backward; `fused.rs` the fused engine as candle custom ops (CPU kernels in
//! `src/cpu/`, CUDA launchers in `src/cuda.rs`).

mod fused;
mod node;
#[cfg(feature = "testing")]
mod oracle;

use crate::config::{backward_factors, bad_label, Engine, OpConfig, RowLabel, Stat, UnitFactors};
use crate::primitive;
use candle::{DType, DeviceLocation, Result, Tensor};
use fused::{FusedBackward, FusedBackwardInPlace, FusedForward, FusedForwardWithGrad};
pub(crate) use node::{LogitsBackward, NodeBackward, StatsNode};
#[cfg(feature = "testing")]
pub use oracle::{cpu_logits_grad, cpu_row_stats};

/// Whether this build's custom ops run on tensors at `location`: the fused
/// kernels, and also the [`StatsNode`] that makes either engine one graph node
/// (a custom op with no implementation for a device fails there, whatever it
/// computes). The CPU always; CUDA only when this crate has its `cuda` feature,
/// since candle can have CUDA through another crate's feature while our
/// `cuda_fwd`s were not compiled; Metal never.
pub(crate) fn kernels_cover(location: DeviceLocation) -> bool {
    match location {
        DeviceLocation::Cpu => true,
        DeviceLocation::Cuda { .. } => cfg!(feature = "cuda"),
        DeviceLocation::Metal { .. } => false,
    }
}

/// Computes the per-row statistics `[N, 4] = (ce, lse, logit_sum, correct)`
/// of `logits` (`[.., V]`, last dim unit-stride) against `labels` (`[N]`,
/// i64, contiguous), with nothing recorded for backward. `Autograd` runs the
/// primitive engine, which needs no custom op (the losses record their
/// statistics with `primitive::row_stats_recorded` instead; only the
/// benchmarks' [`crate::ChunkedCrossEntropy::bench_ops`] come here with it).
pub(crate) fn row_stats(logits: &Tensor, labels: &Tensor, cfg: &OpConfig) -> Result<Tensor> {
    match cfg.engine {
        Engine::Fused => logits.apply_op2_no_bwd(labels, &FusedForward(cfg.clone())),
        Engine::Primitive | Engine::Autograd => primitive::row_stats_chunked(&logits.detach(), labels, cfg),
    }
}

/// The gradient of the loss with respect to `logits` (shaped like them, in
/// their dtype), from `factors = [N, 5] = (g_ce, g_lse, g_sum, lse, ce)`, with
/// nothing recorded for backward. With `inplace_grad` it is written over
/// `logits`. `Autograd` runs the primitive engine, as in [`row_stats`].
pub(crate) fn logits_grad(logits: &Tensor, labels: &Tensor, factors: &Tensor, cfg: &OpConfig) -> Result<Tensor> {
    // `cat` along dim 1 of non-contiguous columns can return a strided tensor.
    let factors = &factors.contiguous()?;
    match (cfg.engine, cfg.inplace_grad) {
        (Engine::Fused, false) => logits.apply_op3_no_bwd(labels, factors, &FusedBackward(cfg.clone())),
        (Engine::Fused, true) => {
            logits.inplace_op3(labels, factors, &FusedBackwardInPlace(cfg.clone()))?;
            Ok(logits.detach())
        }
        (Engine::Primitive | Engine::Autograd, _) => primitive::grad_chunked(&logits.detach(), labels, factors, cfg),
    }
}

/// The per-row multipliers of a weighted loss's [`UnitFactors`] (see the
/// maths above), `[n, 1]` each in the compute dtype: `ce` (`t c_y`) scales
/// `g_ce`, `rest` (`t`) scales `g_lse` and `g_sum`.
#[derive(Debug, Clone)]
pub(crate) struct RowWeights {
    pub ce: Tensor,
    pub rest: Tensor,
}

impl RowWeights {
    /// The multipliers of rows `start..start + len`.
    pub(crate) fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        self.map(|column| column.narrow(0, start, len))
    }

    /// The multipliers of the rows `f` picks from each column.
    pub(crate) fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self { ce: f(&self.ce)?, rest: f(&self.rest)? })
    }
}

/// The statistics `[N, 4]` of `logits` and the gradient of a scalar loss whose
/// value receives 1, from `unit` (see [`UnitFactors`]) and, for a weighted
/// loss, the rows' `weights`; with `cfg.inplace_grad` written over the
/// logits' storage, which must then be a temporary nobody else reads (the
/// linear loss's chunk logits) or a caller's that gave them up. Returns the
/// statistics and the gradient (the per-row factors it was formed with are
/// [`unit_factors`] of the statistics). In place, unweighted, with the fused
/// kernels (f64 on CUDA only), one in-place op computes both: on CUDA one
/// kernel makes two passes over the logits (the forward's read, then a read
/// mostly from L2 and the write), on the CPU each row is rewritten right after
/// its statistics. Otherwise the forward engine runs, then the backward.
pub(crate) fn row_stats_and_unit_grad(
    logits: &Tensor,
    labels: &Tensor,
    cfg: &OpConfig,
    unit: UnitFactors,
    weights: Option<&RowWeights>,
) -> Result<(Tensor, Tensor)> {
    let cpu = logits.device().is_cpu() && logits.dtype() != DType::F64 && cfg.inplace_grad;
    if cfg.engine == Engine::Fused && weights.is_none() && (logits.device().is_cuda() || cpu) {
        let op = FusedForwardWithGrad::new(cfg.clone(), unit);
        let grad = if cfg.inplace_grad {
            logits.inplace_op2(labels, &op)?;
            logits.detach()
        } else {
            logits.apply_op2_no_bwd(labels, &op)?
        };
        return Ok((op.stats(labels)?, grad));
    }
    let stats = row_stats(logits, labels, cfg)?;
    let factors = backward_factors(&unit_factors(&stats, unit, weights)?, &stats)?;
    Ok((stats, logits_grad(logits, labels, &factors, cfg)?))
}

/// The per-row factors `[N, 3] = (g_ce, g_lse, g_sum)` that rows with the
/// statistics `stats` (`[N, 4]`) receive when a scalar loss receives 1, from
/// `unit` and, for a weighted loss, the rows' `weights` (see the maths above).
pub(crate) fn unit_factors(stats: &Tensor, unit: UnitFactors, weights: Option<&RowWeights>) -> Result<Tensor> {
    let lse = Stat::Lse.of(stats)?;
    let constant = |v: f64| Tensor::full(v, (stats.dim(0)?, 1), lse.device())?.to_dtype(lse.dtype());
    let (mut g_ce, mut g_lse, mut g_sum) =
        (constant(unit.ce)?, lse.affine(unit.lse_squared, unit.lse)?, constant(unit.logit_sum)?);
    if let Some(w) = weights {
        (g_ce, g_lse, g_sum) = ((g_ce * &w.ce)?, (g_lse * &w.rest)?, (g_sum * &w.rest)?);
    }
    Tensor::cat(&[g_ce, g_lse, g_sum], 1)
}

/// Checks every label against `[0, vocab)` and turns it into a row index, or
/// `None` for `ignore_index`. The error names the first bad row and its value.
pub(crate) fn row_labels(labels: &[i64], vocab: usize, ignore_index: i64) -> Result<Vec<RowLabel>> {
    labels
        .iter()
        .enumerate()
        .map(|(row, &label)| match label {
            l if l == ignore_index => Ok(None),
            l if l >= 0 && (l as u64) < vocab as u64 => Ok(Some(l as usize)),
            l => Err(bad_label(row, l, vocab, ignore_index)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_cover_cpu_always_cuda_with_the_feature_metal_never() {
        assert!(kernels_cover(DeviceLocation::Cpu));
        for gpu_id in [0, 3] {
            assert_eq!(kernels_cover(DeviceLocation::Cuda { gpu_id }), cfg!(feature = "cuda"));
            assert!(!kernels_cover(DeviceLocation::Metal { gpu_id }));
        }
    }

    #[test]
    fn uncovered_devices_get_the_autograd_engine_whatever_compile_says() {
        assert_eq!(Engine::select(true, true), Engine::Fused);
        assert_eq!(Engine::select(true, false), Engine::Primitive);
        assert_eq!(Engine::select(false, true), Engine::Autograd);
        assert_eq!(Engine::select(false, false), Engine::Autograd);
    }
}
