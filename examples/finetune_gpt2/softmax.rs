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

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle::bail!("causal softmax: contiguous f32 operands only"),
    }
}

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, t) = square_rows(storage.dtype(), layout.shape())?;
        let scores = contiguous(storage, layout)?;
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
        let (rows, t) = square_rows(storage.dtype(), layout.shape())?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle::bail!("causal softmax: contiguous f32 operands only")
        };
        let dev = storage.device().clone();
        let scores = storage.as_cuda_slice::<f32>()?.slice(start..end);
        // SAFETY: the kernel writes every element of every row.
        let mut probs = unsafe { dev.alloc::<f32>(end - start)? };
        cuda::launch(&dev, "causal_softmax_fwd", (&scores, None), &mut probs, rows, t, self.scale)?;
        Ok((candle::CudaStorage::wrap_cuda_slice(probs, dev), layout.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let backward = CausalSoftmaxBackward { scale: self.scale };
        Ok(Some(probs.apply_op2_no_bwd(&grad.contiguous()?, &backward)?))
    }
}

/// The scores' gradient from the probabilities and their gradient.
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
        if p_layout.shape() != g_layout.shape() {
            candle::bail!(
                "causal softmax backward: gradient {:?} for probabilities {:?}",
                g_layout.shape(),
                p_layout.shape()
            )
        }
        let (p, g) = (contiguous(p, p_layout)?, contiguous(g, g_layout)?);
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
        let (rows, t) = square_rows(p.dtype(), p_layout.shape())?;
        let (Some((p_start, p_end)), Some((g_start, g_end))) =
            (p_layout.contiguous_offsets(), g_layout.contiguous_offsets())
        else {
            candle::bail!("causal softmax backward: contiguous f32 operands only")
        };
        if p_layout.shape() != g_layout.shape() {
            candle::bail!(
                "causal softmax backward: gradient {:?} for probabilities {:?}",
                g_layout.shape(),
                p_layout.shape()
            )
        }
        let dev = p.device().clone();
        let probs = p.as_cuda_slice::<f32>()?.slice(p_start..p_end);
        let grad = g.as_cuda_slice::<f32>()?.slice(g_start..g_end);
        // SAFETY: the kernel writes every element of every row.
        let mut out = unsafe { dev.alloc::<f32>(p_end - p_start)? };
        cuda::launch(&dev, "causal_softmax_bwd", (&probs, Some(&grad)), &mut out, rows, t, self.scale)?;
        Ok((candle::CudaStorage::wrap_cuda_slice(out, dev), p_layout.shape().clone()))
    }
}

/// The launcher of `softmax.cu`'s two kernels.
#[cfg(feature = "cuda")]
mod cuda {
    use candle::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
    use candle::cuda_backend::WrapErr;
    use candle::{CudaDevice, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/finetune_softmax.ptx"));
    /// candle caches modules by name per device.
    const MODULE: &str = "finetune_gpt2-softmax";
    /// Rows per block: a warp each.
    const ROWS_PER_BLOCK: usize = 8;

    /// `entry(input, [second input,] out, rows, t, scale)`: a warp per row.
    pub(super) fn launch(
        dev: &CudaDevice,
        entry: &str,
        (input, second): (&CudaView<'_, f32>, Option<&CudaView<'_, f32>>),
        out: &mut CudaSlice<f32>,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        if rows == 0 || t == 0 {
            return Ok(());
        }
        let func = dev.get_or_load_custom_func(entry, MODULE, PTX)?;
        let (rows_arg, t_arg) =
            (rows as i64, i32::try_from(t).map_err(|_| candle::Error::Msg(format!("T = {t} exceeds int")))?);
        let blocks = rows.div_ceil(ROWS_PER_BLOCK).min(1 << 16) as u32;
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(input);
        if let Some(second) = second {
            builder.arg(second);
        }
        builder.arg(out).arg(&rows_arg).arg(&t_arg).arg(&scale);
        // SAFETY: the entries take (const float* in, [const float* grad,] float* out,
        // int64_t rows, int t, float scale) in this order; every buffer holds rows * t
        // f32 on this device (the callers sliced or allocated them so), and the views'
        // and the slice's guards order the launch on the stream and outlive it.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}
