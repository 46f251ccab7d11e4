//! The loss as one node of candle's graph, and its hand-written backward.
//!
//! # The maths (the one place it is written)
//!
//! For a row of logits `x` (length `V`) with target `y`, in f32 (f64 for f64
//! logits):
//!
//! ```text
//! lse    = max(x) + ln Σ_j exp(x_j - max(x))
//! loss   = lse - x_y                                 (0 on ignored rows)
//! grad_j = (exp(x_j - lse) - [j == y]) * scale       (0 on ignored rows)
//! ```
//!
//! where `scale` is the gradient reaching this row's loss: the upstream
//! gradient divided by the valid-token count for `Mean` (that division is an
//! ordinary candle op on `[N]` values, so candle's autograd folds it into the
//! per-row `scale` we receive), the upstream gradient itself for `Sum` and
//! `None`.
//!
//! Both are evaluated so that they do not cancel when the target holds most
//! of the probability (`p_y -> 1`, common late in training): with `rest =
//! Σ_{j≠y} exp(x_j - max)`, `loss = ln(1 + rest / exp(x_y - max))` when
//! `rest <= exp(x_y - max)`, and the target term `p_y - 1` is `expm1(-loss)`
//! (the fused kernels) or `-Σ_{j≠y} p_j` (the primitive engine), formed in
//! f32 before the gradient is rounded to the logits' dtype. PyTorch forms
//! `exp(log_softmax) - 1` and keeps only about 3 significant digits of a 3e-5
//! gradient in f32. The CPU kernels (`src/cpu/`), the CUDA kernels
//! (`cuda/cross_entropy.cu`) and the primitive engine (`src/reference.rs`)
//! all compute exactly this.
//!
//! # The graph
//!
//! A forward engine computes per-row statistics `[N, 2] = (loss, lse)` without
//! recording anything; a [`StatsNode`] then attaches them to the graph as a
//! single node over `(logits, labels, stats)` (or `(hidden, weight, stats)`
//! for the linear loss). Chunking happens inside the
//! engines, never as `narrow` nodes in the graph (candle's `narrow` backward
//! pads every chunk to full size, which would make the loss quadratic). The
//! node's backward keeps `lse` from the forward, so backward is one pass that
//! never re-reduces a row.

use crate::cpu::{self, RowLabel, RowLayout};
use crate::reference;
use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, CustomOp2, CustomOp3, InplaceOp3, Layout, Result, Shape, Tensor};

/// Which kernels compute the loss: the fused ones (`compile = true`) or
/// candle's primitive ops, a chunk of rows at a time (`compile = false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    Fused,
    Primitive,
}

/// Validated settings shared by the forward and backward of one loss call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpConfig {
    pub engine: Engine,
    pub ignore_index: i64,
    pub chunk_len: usize,
    pub inplace_grad: bool,
}

/// Computes the per-row statistics `[N, 2] = (loss, lse)` of `logits`
/// (`[.., V]`, last dim unit-stride) against `labels` (`[N]`, i64,
/// contiguous), with nothing recorded for backward.
pub(crate) fn row_stats(logits: &Tensor, labels: &Tensor, cfg: OpConfig) -> Result<Tensor> {
    match cfg.engine {
        Engine::Fused => logits.apply_op2_no_bwd(labels, &FusedForward(cfg)),
        Engine::Primitive => reference::row_stats_chunked(&logits.detach(), labels, cfg.ignore_index, cfg.chunk_len),
    }
}

/// What a loss node computes in backward from its two inputs and `factors`,
/// `[N, 3] = (scale, lse, loss)` per row, where `scale` is the gradient that
/// reached the row's loss.
pub(crate) trait NodeBackward: Send + Sync + 'static {
    /// The node's name in candle's graph.
    const NAME: &'static str;
    /// The gradients of the node's first two inputs.
    fn backward(&self, first: &Tensor, second: &Tensor, factors: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)>;
}

/// The single graph node of a loss call, over `(first, second, stats)`: its
/// forward passes the row statistics `[N, 2] = (loss, lse)` through, its
/// backward is `B`'s.
pub(crate) struct StatsNode<B>(pub B);

impl<B: NodeBackward> CustomOp3 for StatsNode<B> {
    fn name(&self) -> &'static str {
        B::NAME
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
        // `stats` is the fresh contiguous output of a forward engine: copy it whole.
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
        Ok((stats.try_clone(stats_layout)?, stats_layout.shape().clone()))
    }

    fn bwd(
        &self,
        first: &Tensor,
        second: &Tensor,
        stats: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Only the loss column carries gradient; `lse` is not part of the output users see.
        let scale = grad.narrow(1, 0, 1)?;
        let (loss, lse) = (stats.narrow(1, 0, 1)?, stats.narrow(1, 1, 1)?);
        let factors = Tensor::cat(&[&scale, &lse, &loss], 1)?;
        let (first_grad, second_grad) = self.0.backward(first, second, &factors)?;
        Ok((first_grad, second_grad, None))
    }
}

/// The backward of the loss over logits: the gradient of `(logits, labels)`.
pub(crate) struct LogitsBackward(pub OpConfig);

impl NodeBackward for LogitsBackward {
    const NAME: &'static str = "chunked-cross-entropy";

    fn backward(&self, logits: &Tensor, labels: &Tensor, factors: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(logits_grad(logits, labels, factors, self.0)?), None))
    }
}

/// The gradient of the loss with respect to `logits` (shaped like them, in
/// their dtype), from `factors = [N, 3] = (scale, lse, loss)`, with nothing
/// recorded for backward. With `inplace_grad` it is written over `logits`.
pub(crate) fn logits_grad(logits: &Tensor, labels: &Tensor, factors: &Tensor, cfg: OpConfig) -> Result<Tensor> {
    // `cat` along dim 1 of non-contiguous columns can return a strided tensor.
    let factors = &factors.contiguous()?;
    match (cfg.engine, cfg.inplace_grad) {
        (Engine::Fused, false) => logits.apply_op3_no_bwd(labels, factors, &FusedBackward(cfg)),
        (Engine::Fused, true) => {
            logits.inplace_op3(labels, factors, &FusedBackwardInPlace(cfg))?;
            Ok(logits.detach())
        }
        (Engine::Primitive, _) => {
            reference::grad_chunked(&logits.detach(), labels, factors, cfg.ignore_index, cfg.chunk_len)
        }
    }
}

/// Fused forward: one pass per row (max, then sum of exponentials while the
/// row is in cache), rayon over chunks of `chunk_len` rows.
struct FusedForward(OpConfig);

impl CustomOp2 for FusedForward {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-fwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let layout = row_layout(l1)?;
        let labels = row_labels(i64_slice(s2, l2)?, layout.vocab, self.0.ignore_index)?;
        let chunk = self.0.chunk_len;
        let stats = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(cpu::forward(v, &layout, &labels, chunk)),
            CpuStorage::BF16(v) => CpuStorage::F32(cpu::forward(v, &layout, &labels, chunk)),
            CpuStorage::F16(v) => CpuStorage::F32(cpu::forward(v, &layout, &labels, chunk)),
            CpuStorage::F64(v) => CpuStorage::F64(cpu::forward_f64(v, &layout, &labels)),
            other => bail!("{}: logits must be a float dtype, got {:?}", self.name(), other.dtype()),
        };
        Ok((stats, Shape::from((labels.len(), 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        crate::cuda::forward(s1, l1, s2, l2, self.0.ignore_index)
    }
}

/// Fused backward into a fresh contiguous buffer shaped like the logits. Its
/// third input is `factors`, `[N, 3] = (scale, lse, loss)` per row.
struct FusedBackward(OpConfig);

impl CustomOp3 for FusedBackward {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let layout = row_layout(l1)?;
        let labels = row_labels(i64_slice(s2, l2)?, layout.vocab, self.0.ignore_index)?;
        let chunk = self.0.chunk_len;
        let grad = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(cpu::backward(v, &layout, &labels, f32_slice(s3, l3)?, chunk)),
            CpuStorage::BF16(v) => CpuStorage::BF16(cpu::backward(v, &layout, &labels, f32_slice(s3, l3)?, chunk)),
            CpuStorage::F16(v) => CpuStorage::F16(cpu::backward(v, &layout, &labels, f32_slice(s3, l3)?, chunk)),
            CpuStorage::F64(v) => CpuStorage::F64(cpu::backward_f64(v, &layout, &labels, f64_slice(s3, l3)?)),
            other => bail!("{}: logits must be a float dtype, got {:?}", self.name(), other.dtype()),
        };
        Ok((grad, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        crate::cuda::backward(s1, l1, s2, l2, s3, l3, self.0.ignore_index)
    }
}

/// Fused backward written over the logits' own storage (`inplace_grad`).
struct FusedBackwardInPlace(OpConfig);

impl InplaceOp3 for FusedBackwardInPlace {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-bwd-inplace"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let layout = row_layout(l1)?;
        let labels = row_labels(i64_slice(s2, l2)?, layout.vocab, self.0.ignore_index)?;
        let chunk = self.0.chunk_len;
        match s1 {
            CpuStorage::F32(v) => cpu::backward_in_place(v, &layout, &labels, f32_slice(s3, l3)?, chunk),
            CpuStorage::BF16(v) => cpu::backward_in_place(v, &layout, &labels, f32_slice(s3, l3)?, chunk),
            CpuStorage::F16(v) => cpu::backward_in_place(v, &layout, &labels, f32_slice(s3, l3)?, chunk),
            CpuStorage::F64(v) => cpu::backward_in_place_f64(v, &layout, &labels, f64_slice(s3, l3)?),
            other => bail!("{}: logits must be a float dtype, got {:?}", self.name(), other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda::backward_in_place(s1, l1, s2, l2, s3, l3, self.0.ignore_index)
    }
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

/// The error for a label outside `[0, vocab)` that is not `ignore_index`
/// (the CPU and CUDA paths both report it this way).
pub(crate) fn bad_label(row: usize, label: i64, vocab: usize, ignore_index: i64) -> candle::Error {
    candle::Error::Msg(format!(
        "chunked cross-entropy: label {label} at row {row} is outside [0, {vocab}) and is not ignore_index ({ignore_index})"
    ))
    .bt()
}

/// Row offsets of a `[.., V]` layout whose last dim is unit-stride; any
/// strides are allowed on the leading dims.
fn row_layout(layout: &Layout) -> Result<RowLayout> {
    let Some((&vocab, leading)) = layout.dims().split_last() else {
        bail!("chunked cross-entropy: logits must have at least one dim")
    };
    let strides = layout.stride();
    if vocab > 1 && strides[strides.len() - 1] != 1 {
        bail!("chunked cross-entropy: the vocabulary dim of the logits must be unit-stride, strides {strides:?}")
    }
    let mut row_offsets = vec![layout.start_offset()];
    for (&dim, &stride) in leading.iter().zip(strides) {
        row_offsets = row_offsets.iter().flat_map(|&o| (0..dim).map(move |i| o + i * stride)).collect();
    }
    Ok(RowLayout { row_offsets, vocab })
}

fn i64_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [i64]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::I64(v), Some((start, end))) => Ok(&v[start..end]),
        _ => bail!("chunked cross-entropy: internal labels must be contiguous i64"),
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => bail!("chunked cross-entropy: backward factors must be contiguous f32"),
    }
}

fn f64_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f64]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F64(v), Some((start, end))) => Ok(&v[start..end]),
        _ => bail!("chunked cross-entropy: backward factors must be contiguous f64"),
    }
}
