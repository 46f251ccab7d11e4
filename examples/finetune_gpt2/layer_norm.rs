//! Layer norm over the last dimension as one candle op with its own backward,
//! for f32 `[.., C]` inputs and `[C]` gain and bias: candle-nn's
//! `layer_norm_slow` (the differentiable one) is about eleven candle
//! operations forward and some twenty-five backward, each a launch with its
//! own output on a GPU, where GPT-2's 25 layer norms are small enough for
//! those launches to cost more than the arithmetic. Here:
//!
//! - forward: `c = x - mean(x)`, `r = 1 / sqrt(mean(c²) + eps)`, `y = c r γ + β`
//!   (the two-pass mean and variance, as `layer_norm_slow`);
//! - backward: `n = c r`, `h = dy γ`, `dx = r (h - mean(h) - n mean(h n))`,
//!   `dγ = Σ_rows dy n`, `dβ = Σ_rows dy`.
//!
//! On the CPU in Rust (rows on rayon's threads); on CUDA (feature `cuda`) by
//! `layer_norm.cu`'s kernels, which the crate's build.rs compiles. Sums in f32.

use crate::column_sums::column_sums;
use crate::storage::cpu_slice;
#[cfg(feature = "cuda")]
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Layer norm of `x` (`[.., C]` f32) with gain `gamma` and bias `beta` (`[C]`
/// f32), differentiable with respect to all three.
///
/// # Errors
/// Another dtype, a gain or bias that is not `[C]`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let width = x.dim(D::Minus1)?;
    for (name, t) in [("x", x), ("gain", gamma), ("bias", beta)] {
        if t.dtype() != DType::F32 {
            candle::bail!("layer norm: {name} must be f32, got {:?}", t.dtype())
        }
    }
    if gamma.dims() != [width] || beta.dims() != [width] {
        candle::bail!("layer norm: gain {:?} and bias {:?} must be [{width}]", gamma.shape(), beta.shape())
    }
    x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, LayerNorm { eps: eps as f32 })
}

/// The errors' name.
const OP: &str = "layer norm";

/// `(rows, C)` of a `[.., C]` layout.
fn rows_of(layout: &Layout) -> Result<(usize, usize)> {
    let width = *layout.shape().dims().last().unwrap_or(&1);
    Ok((layout.shape().elem_count() / width.max(1), width))
}

/// A row's mean and `1 / sqrt(variance + eps)`.
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let width = x.len() as f32;
    let mean = x.iter().sum::<f32>() / width;
    let variance = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / width;
    (mean, 1.0 / (variance + eps).sqrt())
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        gamma: &CpuStorage,
        gamma_layout: &Layout,
        beta: &CpuStorage,
        beta_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, width) = rows_of(x_layout)?;
        let (x, gamma, beta) =
            (cpu_slice(x, x_layout, OP)?, cpu_slice(gamma, gamma_layout, OP)?, cpu_slice(beta, beta_layout, OP)?);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(width.max(1)).zip(x.par_chunks(width.max(1))).for_each(|(y, x)| {
            let (mean, r) = moments(x, self.eps);
            for (j, y) in y.iter_mut().enumerate() {
                *y = (x[j] - mean) * r * gamma[j] + beta[j];
            }
        });
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle::CudaStorage,
        x_layout: &Layout,
        gamma: &candle::CudaStorage,
        gamma_layout: &Layout,
        beta: &candle::CudaStorage,
        beta_layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let shape = x_layout.shape().clone();
        launch("layer_norm_fwd", [(x, x_layout), (gamma, gamma_layout), (beta, beta_layout)], shape, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dgamma, dbeta) = layer_norm_backward(x, gamma, dy, f64::from(self.eps))?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// The gradients `(dx, dγ, dβ)` of [`layer_norm`] from its input `x`
/// (contiguous), gain `gamma` and output gradient `dy` (`x`'s shape; see the
/// module docs), without a graph: the op's backward, for a block's backward by
/// hand (`block.rs`).
///
/// # Errors
/// As [`layer_norm`]'s, and a `dy` of another shape.
pub fn layer_norm_backward(x: &Tensor, gamma: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    if dy.shape() != x.shape() {
        candle::bail!("{OP} backward: gradient {:?} for input {:?}", dy.shape(), x.shape())
    }
    let dy = dy.contiguous()?;
    // [2, .., C]: dx, then dy n.
    let both = x.apply_op3_no_bwd(gamma, &dy, &LayerNormBackward { eps: eps as f32 })?;
    let (dx, dy_n) = (both.get(0)?, both.get(1)?);
    Ok((dx, column_sums(&dy_n)?, column_sums(&dy)?))
}

/// `[2, .., C]`: the input's gradient, then `dy n` (see the module docs).
struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        gamma: &CpuStorage,
        gamma_layout: &Layout,
        dy: &CpuStorage,
        dy_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, width) = rows_of(x_layout)?;
        let (x, gamma, dy) =
            (cpu_slice(x, x_layout, OP)?, cpu_slice(gamma, gamma_layout, OP)?, cpu_slice(dy, dy_layout, OP)?);
        let mut out = vec![0f32; 2 * x.len()];
        let (dx, dy_n) = out.split_at_mut(x.len());
        let w = width.max(1);
        dx.par_chunks_mut(w).zip(dy_n.par_chunks_mut(w)).zip(x.par_chunks(w).zip(dy.par_chunks(w))).for_each(
            |((dx, dy_n), (x, dy))| {
                let (mean, r) = moments(x, self.eps);
                let normed = |j: usize| (x[j] - mean) * r;
                let width = x.len() as f32;
                let h_mean = (0..x.len()).map(|j| dy[j] * gamma[j]).sum::<f32>() / width;
                let hn_mean = (0..x.len()).map(|j| dy[j] * gamma[j] * normed(j)).sum::<f32>() / width;
                for j in 0..x.len() {
                    dx[j] = r * (dy[j] * gamma[j] - h_mean - normed(j) * hn_mean);
                    dy_n[j] = dy[j] * normed(j);
                }
            },
        );
        Ok((CpuStorage::F32(out), both(x_layout)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle::CudaStorage,
        x_layout: &Layout,
        gamma: &candle::CudaStorage,
        gamma_layout: &Layout,
        dy: &candle::CudaStorage,
        dy_layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        launch("layer_norm_bwd", [(x, x_layout), (gamma, gamma_layout), (dy, dy_layout)], both(x_layout), self.eps)
    }
}

/// `[2, ..]` of the input's shape: the backward's dx, then dy n.
fn both(layout: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(layout.shape().dims());
    Shape::from(dims)
}

/// `entry(x, gamma, third, out, rows, C, eps)` of `layer_norm.cu` (compiled by
/// the crate's build.rs) into a fresh `out` of `shape`: the forward's (third:
/// beta; out: y) or the backward's (third: dy; out: dx, then dy n).
#[cfg(feature = "cuda")]
fn launch(
    entry: &str,
    operands: [(&candle::CudaStorage, &Layout); 3],
    shape: Shape,
    eps: f32,
) -> Result<(candle::CudaStorage, Shape)> {
    use crate::storage::cuda::{launch_rows, view};
    const KERNELS: (&str, &str) =
        ("finetune_gpt2-layer-norm", include_str!(concat!(env!("OUT_DIR"), "/finetune_layer_norm.ptx")));
    let (rows, width) = rows_of(operands[0].1)?;
    let dev = operands[0].0.device().clone();
    let [x, gamma, third] = operands.map(|(storage, layout)| view(storage, layout, OP));
    let (x, gamma, third) = (x?, gamma?, third?);
    // SAFETY: the kernels write every element of `out`.
    let mut out = unsafe { dev.alloc::<f32>(shape.elem_count())? };
    // SAFETY: both entries take (const float* x, const float* gamma, const float*
    // third, float* out, int64_t rows, int width, float eps); x and the third hold
    // rows * width f32, gamma width (checked by `layer_norm`), out its shape's.
    unsafe { launch_rows(&dev, KERNELS, entry, &[&x, &gamma, &third], &mut out, rows, width, eps)? };
    Ok((candle::CudaStorage::wrap_cuda_slice(out, dev), shape))
}
