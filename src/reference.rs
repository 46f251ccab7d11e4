//! The slow twin: the plain, unchunked cross-entropy from candle's primitive
//! ops, differentiated by candle's own autograd, that the tests hold every
//! engine against. The crate's own engines never call it (the `compile =
//! false` engine is `src/primitive.rs`).

use crate::config::compute_dtype;
use candle::{DType, Tensor, D};

/// Per-row cross-entropy of `logits` (`[N, V]`, any float dtype and strides)
/// against `labels` (`[N]`, u8/u32/i64), by candle's autograd: `logsumexp(x) -
/// x[y]` computed in f32 (f64 for f64 logits), 0 on rows whose label equals
/// `ignore_index`. Returns `[N]`.
///
/// This is the slow twin of [`crate::ChunkedCrossEntropy`]: it materialises
/// several `[N, V]` f32 buffers and records every op for backward.
///
/// # Errors
/// If `logits` is not rank 2, `labels` not `[N]`, or a label (other than
/// `ignore_index`) falls outside `[0, V)` (candle's `gather` reports it).
pub fn cross_entropy_slow(logits: &Tensor, labels: &Tensor, ignore_index: i64) -> candle::Result<Tensor> {
    let (rows, _vocab) = logits.dims2()?;
    let labels = labels.to_dtype(DType::I64)?;
    if labels.dims() != [rows] {
        candle::bail!("cross_entropy_slow: labels {:?} do not match logits {:?}", labels.shape(), logits.shape())
    }
    let x = logits.to_dtype(compute_dtype(logits.dtype()))?;
    let valid = labels.ne(ignore_index as f64)?;
    let safe_labels = valid.where_cond(&labels, &labels.zeros_like()?)?;
    // log_softmax from candle-core's ops (as candle-nn writes it): x - max - ln Σ exp(x - max).
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let target = log_probs.gather(&safe_labels.unsqueeze(1)?, 1)?.squeeze(1)?;
    valid.where_cond(&target.neg()?, &target.zeros_like()?)
}
