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

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle::bail!("layer norm: contiguous f32 operands only"),
    }
}

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
            (contiguous(x, x_layout)?, contiguous(gamma, gamma_layout)?, contiguous(beta, beta_layout)?);
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
        let (rows, width) = rows_of(x_layout)?;
        let dev = x.device().clone();
        let (x, gamma, beta) =
            (cuda::view(x, x_layout)?, cuda::view(gamma, gamma_layout)?, cuda::view(beta, beta_layout)?);
        // SAFETY: the kernel writes every element of every row.
        let mut y = unsafe { dev.alloc::<f32>(rows * width)? };
        cuda::launch(&dev, "layer_norm_fwd", [&x, &gamma, &beta], &mut y, rows, width, self.eps)?;
        Ok((candle::CudaStorage::wrap_cuda_slice(y, dev), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let width = x.dim(D::Minus1)?;
        let dy = dy.contiguous()?;
        // [2, .., C]: dx, then dy n.
        let both = x.apply_op3_no_bwd(gamma, &dy, &LayerNormBackward { eps: self.eps })?;
        let (dx, dy_n) = (both.get(0)?, both.get(1)?);
        let rows = |t: &Tensor| t.reshape(((), width));
        Ok((Some(dx), Some(rows(&dy_n)?.sum(0)?), Some(rows(&dy)?.sum(0)?)))
    }
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
        let (x, gamma, dy) = (contiguous(x, x_layout)?, contiguous(gamma, gamma_layout)?, contiguous(dy, dy_layout)?);
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
        let mut dims = vec![2];
        dims.extend_from_slice(x_layout.shape().dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
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
        let (rows, width) = rows_of(x_layout)?;
        let dev = x.device().clone();
        let (x, gamma, dy) = (cuda::view(x, x_layout)?, cuda::view(gamma, gamma_layout)?, cuda::view(dy, dy_layout)?);
        // SAFETY: the kernel writes every element of both blocks of every row.
        let mut out = unsafe { dev.alloc::<f32>(2 * rows * width)? };
        cuda::launch(&dev, "layer_norm_bwd", [&x, &gamma, &dy], &mut out, rows, width, self.eps)?;
        let mut dims = vec![2];
        dims.extend_from_slice(x_layout.shape().dims());
        Ok((candle::CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
    }
}

/// The launcher of `layer_norm.cu`'s two kernels.
#[cfg(feature = "cuda")]
mod cuda {
    use candle::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
    use candle::cuda_backend::WrapErr;
    use candle::{CudaDevice, CudaStorage, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/finetune_layer_norm.ptx"));
    /// candle caches modules by name per device.
    const MODULE: &str = "finetune_gpt2-layer-norm";
    /// Rows per block: a warp each.
    const ROWS_PER_BLOCK: usize = 8;

    /// The f32 elements of a contiguous layout.
    pub(super) fn view<'a>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, f32>> {
        match layout.contiguous_offsets() {
            Some((start, end)) => Ok(storage.as_cuda_slice::<f32>()?.slice(start..end)),
            None => candle::bail!("layer norm: contiguous f32 operands only"),
        }
    }

    /// `entry(a, b, c, out, rows, width, eps)`: a warp per row.
    pub(super) fn launch(
        dev: &CudaDevice,
        entry: &str,
        inputs: [&CudaView<'_, f32>; 3],
        out: &mut CudaSlice<f32>,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<()> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let func = dev.get_or_load_custom_func(entry, MODULE, PTX)?;
        let width_arg = i32::try_from(width).map_err(|_| candle::Error::Msg(format!("C = {width} exceeds int")))?;
        let rows_arg = rows as i64;
        let blocks = rows.div_ceil(ROWS_PER_BLOCK).min(1 << 16) as u32;
        let block = 32 * ROWS_PER_BLOCK as u32;
        let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        let mut builder = func.builder();
        for input in inputs {
            builder.arg(input);
        }
        builder.arg(out).arg(&rows_arg).arg(&width_arg).arg(&eps);
        // SAFETY: both entries take (const float*, const float*, const float*, float*
        // out, int64_t rows, int width, float eps) in this order; the first input
        // and the per-row ones (dy) hold rows * width f32, the gain and bias width
        // (checked by `layer_norm`), `out` what the entry writes (allocated so by the
        // callers); the guards order the launch on the stream and outlive it.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}
