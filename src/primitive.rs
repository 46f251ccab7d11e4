//! The `compile = false` engine: the maths of `op/mod.rs` (forward statistics and
//! the hand-written gradient) run with candle's primitive ops on detached
//! tensors, one chunk of `chunk_len` rows at a time, so that its f32
//! temporaries are `[chunk_len, V]`. And the same forward statistics recorded
//! in candle's graph, for devices no custom op of this crate runs on
//! (`Engine::Autograd`): candle's autograd differentiates them, to the
//! hand-written gradient.

use crate::config::{compute_dtype, Factor, OpConfig, RowTerms, STATS};
use candle::{DType, Tensor, D};

/// The `compile = false` forward: `[N, 4] = (ce, lse, logit_sum, correct)`
/// per row (see op/mod.rs), zeros on ignored rows. `logits` is `[.., V]`, `labels`
/// `[N]` i64.
pub(crate) fn row_stats_chunked(logits: &Tensor, labels: &Tensor, cfg: &OpConfig) -> candle::Result<Tensor> {
    let rows = as_rows(logits)?;
    let mut stats = Vec::new();
    for chunk in row_chunks(&rows, labels, cfg.ignore_index, cfg.chunk_len) {
        let Chunk { x, labels, .. } = chunk?;
        stats.push(block_stats(&x, &labels, cfg)?);
    }
    if stats.is_empty() {
        return Tensor::zeros((0, STATS), compute_dtype(logits.dtype()), logits.device());
    }
    Tensor::cat(&stats, 0)
}

/// The statistics of [`row_stats_chunked`], recorded in candle's graph: for
/// devices where no custom op of this crate runs (`Engine::Autograd`), so that
/// candle's autograd gives the gradient of whatever the loss composes from
/// them. All rows at once: a graph of chunks would cost the same memory (the
/// graph keeps every chunk's temporaries for backward) and `narrow`'s backward
/// pads each chunk to full size. So this holds several `[N, V]` temporaries in
/// the compute dtype, as `candle_nn`'s loss does.
pub(crate) fn row_stats_recorded(logits: &Tensor, labels: &Tensor, cfg: &OpConfig) -> candle::Result<Tensor> {
    let rows = as_rows(logits)?;
    let dtype = compute_dtype(rows.dtype());
    if rows.dim(0)? == 0 {
        // Nothing to reduce (candle's `max` refuses an empty tensor), but the
        // statistics must still depend on the logits, which then get their
        // (empty) gradient as they do from the engines' node.
        return rows.sum_keepdim(1)?.to_dtype(dtype)?.broadcast_as((0, STATS))?.contiguous();
    }
    let labels = ChunkLabels::new(labels, cfg.ignore_index)?;
    // Ignored rows are zeroed before any op reads them: whatever they hold (NaN,
    // inf), backward then multiplies their zero upstream gradient by finite
    // values only, and this `where` hands them an exact 0.
    let x = labels.zero_ignored(&rows)?.to_dtype(dtype)?;
    block_stats(&x, &labels, cfg)
}

/// The statistics `[n, 4]` of the rows `x` (`[n, V]`, `n > 0`, in the compute
/// dtype), zeros on ignored rows. Written so that candle's autograd, where `x`
/// is recorded, differentiates them exactly as op/mod.rs's backward does: the
/// shift by the row's max carries no gradient (it changes no statistic), the
/// confident branch's `ln(1 + rest / t)` differentiates to `p_j` and `-Σ_{j≠y}
/// p_j` without cancellation, and the branch `where` does not take never sees
/// a zero divisor (its zero upstream gradient times an infinite one would be
/// NaN). The one difference: the soft-cap's slope is candle's `1 - tanh²`,
/// which, where the cap saturates, keeps an absolute (not relative) precision
/// of about 1e-7.
fn block_stats(x: &Tensor, labels: &ChunkLabels, cfg: &OpConfig) -> candle::Result<Tensor> {
    let terms = cfg.terms;
    let x = softcapped(x, terms)?;
    let max = x.max_keepdim(1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let target = shifted.gather(&labels.safe, 1)?;
    let target_term = target.exp()?;
    let exps = shifted.exp()?;
    let log_total = exps.sum_keepdim(1)?.log()?;
    let rest = exps.mul(&labels.not_target(x.dim(1)?, x.dtype())?)?.sum_keepdim(1)?;
    // See op/mod.rs: ln(1 + rest / target_term) when the target dominates, else lse - x_y.
    let confident = rest.le(&target_term)?;
    let divisor = confident.where_cond(&target_term, &target_term.ones_like()?)?;
    let ce = confident.where_cond(&ln_1p(&(rest / divisor)?)?, &(&log_total - &target)?)?;
    let lse = (log_total + max)?;
    let logit_sum = match (terms.logit_sum, &cfg.sum_weights) {
        (false, _) => lse.zeros_like()?,
        (true, None) => x.sum_keepdim(1)?,
        (true, Some(w)) => x.broadcast_mul(&w.unsqueeze(0)?)?.sum_keepdim(1)?,
    };
    let correct = labels.first_argmax(&x.detach())?;
    // The columns in `Stat`'s order.
    labels.zero_ignored(&Tensor::cat(&[ce, lse, logit_sum, correct], 1)?)
}

/// The `compile = false` backward (see op/mod.rs) in the logits' dtype and shape,
/// zero on ignored rows. `factors` is `[N, 5] = (g_ce, g_lse, g_sum, lse,
/// ce)`; the target's `p_y - 1` is formed as `-Σ_{j≠y} p_j`.
pub(crate) fn grad_chunked(
    logits: &Tensor,
    labels: &Tensor,
    factors: &Tensor,
    cfg: &OpConfig,
) -> candle::Result<Tensor> {
    let rows = as_rows(logits)?;
    let mut grads = Vec::new();
    for chunk in row_chunks(&rows, labels, cfg.ignore_index, cfg.chunk_len) {
        let Chunk { start, x, labels } = chunk?;
        let raw = x;
        let x = softcapped(&raw, cfg.terms)?;
        let f = factors.narrow(0, start, x.dim(0)?)?;
        let (g_ce, g_lse, g_sum, lse) =
            (Factor::GCe.of(&f)?, Factor::GLse.of(&f)?, Factor::GSum.of(&f)?, Factor::Lse.of(&f)?);
        let probs = x.broadcast_sub(&lse)?.exp()?;
        let not_target = labels.not_target(x.dim(1)?, probs.dtype())?;
        let others = probs.mul(&not_target)?;
        let rest = others.sum_keepdim(1)?;
        let target_prob = probs.gather(&labels.safe, 1)?;
        // The logit sum's term, `g_sum c_j` (see op/mod.rs): `[n, 1]`, or `[n, V]` with class weights.
        let (sum_term, target_sum_term) = match &cfg.sum_weights {
            None => (g_sum.clone(), g_sum),
            Some(w) => {
                let w = w.unsqueeze(0)?;
                (
                    g_sum.broadcast_mul(&w)?,
                    g_sum.mul(&w.squeeze(0)?.gather(&labels.safe.squeeze(1)?, 0)?.unsqueeze(1)?)?,
                )
            }
        };
        let target_grad = ((g_ce.neg()? * rest)? + (&g_lse * target_prob)?)?.add(&target_sum_term)?;
        let off_target = others.broadcast_mul(&(&g_ce + &g_lse)?)?.broadcast_add(&sum_term)?.mul(&not_target)?;
        let onehot = (1.0 - not_target)?;
        let mut grad = (off_target + onehot.broadcast_mul(&target_grad)?)?;
        if let Some(cap) = cfg.terms.softcap {
            // 1 - tanh²(u) as 4e / (1 + e)², e = exp(-2|u|): no cancellation where the cap saturates.
            let e = ((&raw / cap)?.abs()? * -2.0)?.exp()?;
            grad = grad.mul(&((&e * 4.0)? / (&e + 1.0)?.sqr()?)?)?;
        }
        grads.push(labels.zero_ignored(&grad)?.to_dtype(logits.dtype())?);
    }
    if grads.is_empty() {
        return logits.zeros_like();
    }
    Tensor::cat(&grads, 0)?.reshape(logits.shape())
}

/// `cap * tanh(x / cap)` with a soft-cap, else `x` itself.
fn softcapped(x: &Tensor, terms: RowTerms) -> candle::Result<Tensor> {
    match terms.softcap {
        Some(cap) => (x / cap)?.tanh()? * cap,
        None => Ok(x.clone()),
    }
}

/// `chunk_len` rows of `[N, V]` logits, widened to the compute dtype, with
/// their labels.
struct Chunk {
    start: usize,
    x: Tensor,
    labels: ChunkLabels,
}

fn row_chunks<'a>(
    rows: &'a Tensor,
    labels: &'a Tensor,
    ignore_index: i64,
    chunk_len: usize,
) -> impl Iterator<Item = candle::Result<Chunk>> + 'a {
    let total = rows.dim(0).unwrap_or(0);
    (0..total).step_by(chunk_len).map(move |start| {
        let len = chunk_len.min(total - start);
        let x = rows.narrow(0, start, len)?;
        let x = x.to_dtype(compute_dtype(x.dtype()))?;
        let labels = ChunkLabels::new(&labels.narrow(0, start, len)?, ignore_index)?;
        Ok(Chunk { start, x, labels })
    })
}

/// A chunk's labels as gather indices (`[len, 1]`, ignored rows pointing at
/// class 0) and the mask of its valid rows.
struct ChunkLabels {
    safe: Tensor,
    valid: Tensor,
}

impl ChunkLabels {
    fn new(labels: &Tensor, ignore_index: i64) -> candle::Result<Self> {
        let valid = labels.ne(ignore_index as f64)?.unsqueeze(1)?;
        let safe = valid.where_cond(&labels.unsqueeze(1)?, &labels.unsqueeze(1)?.zeros_like()?)?;
        Ok(Self { safe, valid })
    }

    /// `[len, vocab]`: 0 at each row's target class, 1 elsewhere.
    fn not_target(&self, vocab: usize, dtype: DType) -> candle::Result<Tensor> {
        let classes = Tensor::arange(0, vocab as i64, self.safe.device())?.unsqueeze(0)?;
        self.safe.broadcast_ne(&classes)?.to_dtype(dtype)
    }

    /// `[len, 1]`: 1 where the row's first largest logit is its target's (as
    /// `argmax` picks it: no class before the target reaches its logit, none
    /// after exceeds it, and it is not NaN), else 0.
    fn first_argmax(&self, x: &Tensor) -> candle::Result<Tensor> {
        let target = x.gather(&self.safe, 1)?;
        let classes = Tensor::arange(0, x.dim(1)? as i64, x.device())?.unsqueeze(0)?;
        let before = classes.broadcast_lt(&self.safe)?;
        let beats = before.where_cond(&x.broadcast_ge(&target)?, &x.broadcast_gt(&target)?)?;
        let unbeaten = beats.to_dtype(DType::F32)?.sum_keepdim(1)?.eq(0f64)?;
        unbeaten.to_dtype(x.dtype())? * target.eq(&target)?.to_dtype(x.dtype())?
    }

    /// Zeroes the ignored rows of `t` (`[len, k]`), NaN or not.
    fn zero_ignored(&self, t: &Tensor) -> candle::Result<Tensor> {
        self.valid.broadcast_as(t.shape())?.where_cond(t, &t.zeros_like()?)
    }
}

/// `ln(1 + z)` without losing small `z` to the rounding of `1 + z`
/// (Goldberg's trick; candle has no `log1p`): `ln(u) * z / (u - 1)` with
/// `u = 1 + z`, and `z` itself where `u` rounds to 1. Recorded, it also
/// differentiates to `1 / (1 + z)` at full precision: the rounding of `u - 1`
/// against `z` enters the derivatives through `z / (u - 1)` and `ln(u) / (u -
/// 1)` with opposite signs and cancels (the confident-token tests hold it to
/// 2e-6 where that rounding can reach 4% of `z`).
fn ln_1p(z: &Tensor) -> candle::Result<Tensor> {
    let u = (z + 1.0)?;
    let d = (&u - 1.0)?;
    let exact = d.eq(0f64)?;
    let safe_d = exact.where_cond(&d.ones_like()?, &d)?;
    exact.where_cond(z, &u.log()?.mul(z)?.div(&safe_d)?)
}

/// Views `[.., V]` logits as `[N, V]` (copying only when the leading dims
/// cannot be merged).
fn as_rows(logits: &Tensor) -> candle::Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    let rows = logits.elem_count().checked_div(vocab).unwrap_or(0);
    logits.reshape((rows, vocab))
}
