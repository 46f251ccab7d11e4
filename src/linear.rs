//! Fused linear cross-entropy: the loss of `hidden @ weight^T` with `chunk_len`
//! rows of logits alive at a time. Any `[N, V]` logits tensor, even computed
//! chunk by chunk, would cost candle's backprop two more full-size buffers (it
//! adds every gradient into fresh zeros); here the gradient never leaves the
//! node as logits: its backward recomputes each chunk's logits, turns them into
//! their gradient in place (the maths of `op.rs`), and folds that into the
//! gradients of `hidden` and `weight` with two matmuls.

use crate::loss::{checked_labels, checked_logits};
use crate::op::{self, NodeBackward, OpConfig, StatsNode};
use crate::{ChunkedCrossEntropy, Reduction};
use candle::{bail, DType, Result, Tensor};

/// Cross-entropy of the logits `hidden @ weight^T`, never holding them whole:
/// a chunk of rows of logits exists at a time, in forward and in backward
/// (which recomputes them), and the gradients go straight to `hidden` and
/// `weight` (a weight shared with the token embedding gets the sum of both
/// gradients, as candle sums gradients of one variable). Peak extra memory is
/// one `[chunk, V]` logits chunk plus f32 accumulators the size of `weight`,
/// instead of several `[N, V]` buffers.
///
/// Same configuration and semantics as [`ChunkedCrossEntropy`]
/// (`ignore_index`, mask, [`Reduction`], `num_label_tokens`, the exact zeros
/// when nothing is valid, the errors), except that `chunk_len` defaults to
/// automatic: about `N * H / V` rows, so that a chunk of logits is about the
/// size of the hidden states, but at least 512 rows. Labels are checked on the
/// host before any chunk runs.
///
/// ```
/// use candle::{DType, Device, Tensor, Var};
/// use candle_chunked_ce::LinearCrossEntropy;
/// # fn main() -> candle::Result<()> {
/// let hidden = Var::randn(0f32, 1.0, (2, 5, 16), &Device::Cpu)?; // [B, S, H]
/// let weight = Var::randn(0f32, 0.1, (100, 16), &Device::Cpu)?;  // [V, H]
/// let labels = Tensor::zeros((2, 5), DType::U32, &Device::Cpu)?;
/// let loss = LinearCrossEntropy::default().forward(&hidden, &weight, &labels, None)?;
/// let grads = loss.backward()?;
/// assert!(grads.get(&hidden).is_some() && grads.get(&weight).is_some());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LinearCrossEntropy {
    config: ChunkedCrossEntropy,
    chunk_len: Option<usize>,
}

impl LinearCrossEntropy {
    /// Rows of logits per chunk; `None` (the default) picks about `N * H / V`,
    /// at least 512.
    pub fn chunk_len(mut self, chunk_len: Option<usize>) -> Self {
        self.chunk_len = chunk_len;
        self
    }

    /// Fused kernels on each chunk (`true`, the default) or candle's primitive ops.
    pub fn compile(mut self, compile: bool) -> Self {
        self.config = self.config.compile(compile);
        self
    }

    /// The label value that marks a token to ignore (default -100).
    pub fn ignore_index(mut self, ignore_index: i64) -> Self {
        self.config = self.config.ignore_index(ignore_index);
        self
    }

    /// How per-token losses are combined (default [`Reduction::Mean`]).
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.config = self.config.reduction(reduction);
        self
    }

    /// The loss of `hidden @ weight^T` against `labels`.
    ///
    /// - `hidden`: `[N, H]` or `[B, S, H]`, f32, f64, bf16 or f16.
    /// - `weight`: `[V, H]` (an `lm_head`, or the tied token embedding), same
    ///   dtype and device.
    /// - `labels`, `mask` and the result: as in [`ChunkedCrossEntropy::forward`].
    ///
    /// # Errors
    /// Those of [`ChunkedCrossEntropy::forward`], and `weight` not `[V, H]`
    /// with `hidden`'s `H`, dtype and device.
    pub fn forward(&self, hidden: &Tensor, weight: &Tensor, labels: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with_num_label_tokens(hidden, weight, labels, mask, None)
    }

    /// [`forward`](Self::forward) with the global valid-token count, as in
    /// [`ChunkedCrossEntropy::forward_with_num_label_tokens`].
    ///
    /// # Errors
    /// Those of [`forward`](Self::forward), and `num_label_tokens` given with a
    /// reduction other than [`Reduction::Mean`].
    pub fn forward_with_num_label_tokens(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        labels: &Tensor,
        mask: Option<&Tensor>,
        num_label_tokens: Option<usize>,
    ) -> Result<Tensor> {
        let ignore_index = self.config.ignore_index;
        let labels_shape = labels.shape().clone();
        self.config.check_num_label_tokens(num_label_tokens)?;
        let hidden = checked_logits(hidden)?;
        let labels = checked_labels(&hidden, labels, mask, ignore_index)?;
        let width = hidden.dim(candle::D::Minus1)?;
        let vocab = match weight.dims() {
            [v, h] if *h == width => *v,
            _ => bail!(
                "linear cross-entropy: weight {:?} must be [V, {width}] for hidden {:?}",
                weight.shape(),
                hidden.shape()
            ),
        };
        if weight.dtype() != hidden.dtype() || !weight.device().same_device(hidden.device()) {
            bail!(
                "linear cross-entropy: weight ({:?}) and hidden ({:?}) must share dtype and device",
                weight.dtype(),
                hidden.dtype()
            )
        }
        let rows = hidden.reshape(((), width))?;
        let n = rows.dim(0)?;
        if n > 0 && vocab == 0 {
            bail!("linear cross-entropy: weight {:?} has an empty vocabulary dim", weight.shape())
        }
        op::row_labels(&labels.to_vec1::<i64>()?, vocab, ignore_index)?;
        let chunk_len = match self.chunk_len {
            Some(0) => bail!("linear cross-entropy: chunk_len must be at least 1, got 0"),
            Some(c) => c,
            None => (n * width / vocab.max(1)).max(MIN_AUTO_CHUNK).min(n.max(1)),
        };
        // Each chunk's logits are a temporary: its gradient always overwrites it.
        let cfg = OpConfig { chunk_len, inplace_grad: true, ..self.config.op_config()? };
        let stats = row_stats(&rows, weight, &labels, cfg)?;
        let node = rows.apply_op3(weight, &stats, StatsNode(LinearBackward { cfg, labels: labels.clone() }))?;
        self.config.reduce(&node, &labels, labels_shape, num_label_tokens)
    }
}

/// Per-row `(loss, lse)` `[N, 2]` of `rows @ weight^T` (`rows` `[N, H]`,
/// `weight` `[V, H]`), one chunk of rows at a time, nothing recorded.
fn row_stats(rows: &Tensor, weight: &Tensor, labels: &Tensor, cfg: OpConfig) -> Result<Tensor> {
    let (rows, weight) = (rows.detach(), weight.detach());
    let mut stats = Vec::new();
    for (start, len) in chunks(rows.dim(0)?, cfg.chunk_len) {
        let logits = rows.narrow(0, start, len)?.matmul(&weight.t()?)?;
        stats.push(op::row_stats(&logits, &labels.narrow(0, start, len)?, cfg)?);
    }
    if stats.is_empty() {
        let dtype = if rows.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        return Tensor::zeros((0, 2), dtype, rows.device());
    }
    Tensor::cat(&stats, 0)
}

/// The automatic chunk never has fewer rows than this: each chunk allocates a
/// `[V, H]` weight-gradient product, and thinner chunks make those
/// allocations and the thin matmuls dominate (measured: 31-row chunks at
/// N = 2048, H = 768, V = 50257 took 4x longer than 1024-row ones).
const MIN_AUTO_CHUNK: usize = 512;

/// `(start, len)` of each chunk of `chunk_len` rows.
fn chunks(rows: usize, chunk_len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).step_by(chunk_len).map(move |start| (start, chunk_len.min(rows - start)))
}

/// The backward of the linear loss: the gradients of `rows` and `weight`. The
/// labels are not differentiable and travel inside it.
struct LinearBackward {
    cfg: OpConfig,
    labels: Tensor,
}

impl NodeBackward for LinearBackward {
    const NAME: &'static str = "chunked-linear-cross-entropy";

    fn backward(&self, rows: &Tensor, weight: &Tensor, factors: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, weight) = (rows.detach(), weight.detach());
        // The weight's gradient sums over every chunk: accumulate it in f32 (f64 for f64).
        let acc = if weight.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let mut weight_grad: Option<Tensor> = None;
        let mut rows_grad = Vec::new();
        for (start, len) in chunks(rows.dim(0)?, self.cfg.chunk_len) {
            let chunk = rows.narrow(0, start, len)?;
            let logits = chunk.matmul(&weight.t()?)?;
            let labels = self.labels.narrow(0, start, len)?;
            let logits_grad = op::logits_grad(&logits, &labels, &factors.narrow(0, start, len)?, self.cfg)?;
            rows_grad.push(logits_grad.matmul(&weight)?);
            let product = logits_grad.t()?.matmul(&chunk)?.to_dtype(acc)?;
            weight_grad = Some(match weight_grad {
                None => product,
                Some(sum) => (sum + product)?,
            });
        }
        let rows_grad = if rows_grad.is_empty() { rows.zeros_like()? } else { Tensor::cat(&rows_grad, 0)? };
        let weight_grad = match weight_grad {
            Some(sum) => sum.to_dtype(weight.dtype())?,
            None => weight.zeros_like()?,
        };
        Ok((Some(rows_grad), Some(weight_grad)))
    }
}
