//! The attention's causal softmax as one candle op with its own backward:
//! `softmax(scores * scale + mask)` over the last dimension of `[B, H, T, T]`
//! f32 scores, query `i` (a row's index modulo `T`) seeing keys `0..=i`.
//! Built from candle's primitives (scale, add the mask, max, subtract, exp,
//! sum, divide) it costs about a dozen passes over the scores each way, and
//! candle's backward adds each operand's gradient into fresh zeros; here the
//! forward reads the scores once and writes the probabilities, the backward
//! reads them and the upstream gradient and writes the scores' gradient:
//!
//! - forward: `x_j = s_j scale`, `p_j = exp(x_j - max_k x_k) / Σ_k exp(x_k - max)`
//!   over `j <= i`, `p_j = 0` above;
//! - backward: `ds_j = scale p_j (dp_j - Σ_k p_k dp_k)` over `j <= i`, 0 above.
//!
//! On the CPU in Rust (rows on rayon's threads); on CUDA (feature `cuda`) by
//! `softmax.cu`'s kernels, which the crate's build.rs compiles (an example has
//! no build script of its own). Sums in f32, as candle's.

use crate::storage::cpu_slice;
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The causal softmax of `scores` (`[.., T, T]` f32) scaled by `scale`,
/// differentiable with respect to `scores`.
///
/// # Errors
/// Scores that are not f32 or whose last two dimensions differ.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    square_rows(scores.dtype(), scores.shape())?;
    scores.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 })
}

/// `(rows, T)` of `[.., T, T]` f32 scores.
fn square_rows(dtype: DType, shape: &Shape) -> Result<(usize, usize)> {
    match shape.dims() {
        [.., a, b] if a == b && dtype == DType::F32 => Ok((shape.elem_count() / (*b).max(1), *b)),
        _ => candle::bail!("causal softmax: scores must be [.., T, T] f32, got {shape:?} {dtype:?}"),
    }
}

/// The errors' name.
const OP: &str = "causal softmax";

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, t) = square_rows(storage.dtype(), layout.shape())?;
        let scores = cpu_slice(storage, layout, OP)?;
        let mut probs = vec![0f32; scores.len()];
        probs.par_chunks_mut(t.max(1)).zip(scores.par_chunks(t.max(1))).enumerate().for_each(|(row, (p, s))| {
            let seen = row % t + 1;
            let x = |j: usize| s[j] * self.scale;
            let max = (0..seen).map(x).fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = (0..seen).map(|j| (x(j) - max).exp()).sum();
            for (j, p) in p.iter_mut().enumerate().take(seen) {
                *p = (x(j) - max).exp() / sum;
            }
        });
        Ok((CpuStorage::F32(probs), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle::CudaStorage, layout: &Layout) -> Result<(candle::CudaStorage, Shape)> {
        use crate::storage::cuda::{launch_rows, view};
        let (rows, t) = square_rows(storage.dtype(), layout.shape())?;
        let dev = storage.device().clone();
        let scores = view(storage, layout, OP)?;
        // SAFETY: the kernel writes every element of every row.
        let mut probs = unsafe { dev.alloc::<f32>(scores.len())? };
        // SAFETY: `causal_softmax_fwd(scores, probs, rows, t, scale)`, both rows * t f32.
        unsafe { launch_rows(&dev, KERNELS, "causal_softmax_fwd", &[&scores], &mut probs, rows, t, self.scale)? };
        Ok((candle::CudaStorage::wrap_cuda_slice(probs, dev), layout.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(causal_softmax_backward(probs, grad, f64::from(self.scale))?))
    }
}

/// The scores' gradient of [`causal_softmax`] from its output `probs`
/// (contiguous) and their gradient `grad` (`probs`' shape), without a graph:
/// the op's backward, for a block's backward by hand (`block.rs`).
///
/// # Errors
/// Probabilities that are not `[.., T, T]` f32, or a `grad` of another shape.
pub fn causal_softmax_backward(probs: &Tensor, grad: &Tensor, scale: f64) -> Result<Tensor> {
    square_rows(probs.dtype(), probs.shape())?;
    if grad.shape() != probs.shape() {
        candle::bail!("{OP} backward: gradient {:?} for probabilities {:?}", grad.shape(), probs.shape())
    }
    probs.apply_op2_no_bwd(&grad.contiguous()?, &CausalSoftmaxBackward { scale: scale as f32 })
}

/// The scores' gradient from the probabilities and their gradient (of one
/// shape: checked by the forward op's `bwd`).
struct CausalSoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        p_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, t) = square_rows(p.dtype(), p_layout.shape())?;
        let (p, g) = (cpu_slice(p, p_layout, OP)?, cpu_slice(g, g_layout, OP)?);
        let mut out = vec![0f32; p.len()];
        out.par_chunks_mut(t.max(1)).zip(p.par_chunks(t.max(1)).zip(g.par_chunks(t.max(1)))).enumerate().for_each(
            |(row, (d, (p, g)))| {
                let seen = row % t + 1;
                let dot: f32 = (0..seen).map(|j| p[j] * g[j]).sum();
                for (j, d) in d.iter_mut().enumerate().take(seen) {
                    *d = self.scale * (p[j] * (g[j] - dot));
                }
            },
        );
        Ok((CpuStorage::F32(out), p_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle::CudaStorage,
        p_layout: &Layout,
        g: &candle::CudaStorage,
        g_layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use crate::storage::cuda::{launch_rows, view};
        let (rows, t) = square_rows(p.dtype(), p_layout.shape())?;
        let dev = p.device().clone();
        let (probs, grad) = (view(p, p_layout, OP)?, view(g, g_layout, OP)?);
        // SAFETY: the kernel writes every element of every row.
        let mut out = unsafe { dev.alloc::<f32>(probs.len())? };
        // SAFETY: `causal_softmax_bwd(probs, grad, out, rows, t, scale)`, all rows * t f32.
        unsafe { launch_rows(&dev, KERNELS, "causal_softmax_bwd", &[&probs, &grad], &mut out, rows, t, self.scale)? };
        Ok((candle::CudaStorage::wrap_cuda_slice(out, dev), p_layout.shape().clone()))
    }
}

/// `softmax.cu`'s module (compiled by the crate's build.rs); candle caches
/// modules by name per device.
#[cfg(feature = "cuda")]
const KERNELS: (&str, &str) =
    ("finetune_gpt2-softmax", include_str!(concat!(env!("OUT_DIR"), "/finetune_softmax.ptx")));
