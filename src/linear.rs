//! Fused linear cross-entropy: the loss of `hidden @ weight^T` with `chunk_len`
//! rows of logits alive at a time. Any `[N, V]` logits tensor, even computed
//! chunk by chunk, would cost candle's backprop two more full-size buffers (it
//! adds every gradient into fresh zeros); here the gradient never leaves the
//! node as logits: its backward recomputes each chunk's logits, turns them into
//! their gradient in place (the maths of `op.rs`), and folds that into the
//! gradients of `hidden` and `weight` with two matmuls.

use crate::op::{self, OpConfig};
use candle::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Per-row `(loss, lse)` `[N, 2]` of `rows @ weight^T` (`rows` `[N, H]`,
/// `weight` `[V, H]`), one chunk of rows at a time, nothing recorded.
pub(crate) fn row_stats(rows: &Tensor, weight: &Tensor, labels: &Tensor, cfg: OpConfig) -> Result<Tensor> {
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

/// `(start, len)` of each chunk of `chunk_len` rows.
fn chunks(rows: usize, chunk_len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).step_by(chunk_len).map(move |start| (start, chunk_len.min(rows - start)))
}

/// The graph node over `(rows, weight, stats)`: forward passes `stats`
/// through, backward gives the gradients of `rows` and `weight`. The labels
/// are not differentiable and travel inside the node.
pub(crate) struct LinearNode {
    pub cfg: OpConfig,
    pub labels: Tensor,
}

impl CustomOp3 for LinearNode {
    fn name(&self) -> &'static str {
        "chunked-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        stats: &CpuStorage,
        stats_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle::backend::BackendStorage;
        Ok((stats.try_clone(stats_layout)?, stats_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
        stats: &candle::CudaStorage,
        stats_layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use candle::backend::BackendStorage;
        Ok((stats.try_clone(stats_layout)?, stats_layout.shape().clone()))
    }

    fn bwd(
        &self,
        rows: &Tensor,
        weight: &Tensor,
        stats: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, weight) = (rows.detach(), weight.detach());
        // `factors` as op.rs's backward expects them: (scale, lse, loss) per row.
        let factors = Tensor::cat(&[&grad.narrow(1, 0, 1)?, &stats.narrow(1, 1, 1)?, &stats.narrow(1, 0, 1)?], 1)?;
        // The weight's gradient sums over every chunk: accumulate it in f32 (f64 for f64).
        let acc = if weight.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let mut weight_grad = Tensor::zeros(weight.shape(), acc, weight.device())?;
        let mut rows_grad = Vec::new();
        for (start, len) in chunks(rows.dim(0)?, self.cfg.chunk_len) {
            let chunk = rows.narrow(0, start, len)?;
            let logits = chunk.matmul(&weight.t()?)?;
            let labels = self.labels.narrow(0, start, len)?;
            let logits_grad = op::logits_grad(&logits, &labels, &factors.narrow(0, start, len)?, self.cfg)?;
            rows_grad.push(logits_grad.matmul(&weight)?);
            weight_grad = (weight_grad + logits_grad.t()?.matmul(&chunk)?.to_dtype(acc)?)?;
        }
        let rows_grad = if rows_grad.is_empty() { rows.zeros_like()? } else { Tensor::cat(&rows_grad, 0)? };
        Ok((Some(rows_grad), Some(weight_grad.to_dtype(weight.dtype())?), None))
    }
}
