//! GPT-2's GELU (the tanh approximation, `gelu_new`) as one candle op with
//! its own backward, for f32: candle's `gelu` has a fused forward, but its
//! backward is some seventeen operations over the `[B * T, 4C]` activations,
//! each a launch with its own output on a GPU. Here one elementwise pass
//! each way:
//!
//! - `u = sqrt(2/π) (x + 0.044715 x³)`, `y = x (1 + tanh u) / 2`;
//! - `dy/dx = (1 + tanh u) / 2 + x (1 - tanh² u) sqrt(2/π) (1 + 3 · 0.044715 x²) / 2`
//!   (candle's backward is the same formula with its constants rounded to six
//!   digits).
//!
//! On the CPU in Rust (on rayon's threads); on CUDA (feature `cuda`) by
//! `gelu.cu`'s kernels, which the crate's build.rs compiles.

#[cfg(feature = "cuda")]
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044715;

/// `tanh u` of the module docs.
fn tanh_u(x: f32) -> f32 {
    (SQRT_2_OVER_PI * (x + CUBIC * x * x * x)).tanh()
}

/// GELU (tanh) of `x` (f32, any shape), differentiable.
///
/// # Errors
/// Another dtype.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 {
        candle::bail!("gelu: f32 only, got {:?}", x.dtype())
    }
    x.contiguous()?.apply_op1(Gelu)
}

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle::bail!("gelu: contiguous f32 operands only"),
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let y = x.par_iter().map(|&v| 0.5 * v * (1.0 + tanh_u(v))).collect();
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle::CudaStorage, layout: &Layout) -> Result<(candle::CudaStorage, Shape)> {
        let dev = storage.device().clone();
        let x = cuda::view(storage, layout)?;
        // SAFETY: the kernel writes every element.
        let mut y = unsafe { dev.alloc::<f32>(x.len())? };
        cuda::launch(&dev, "gelu_fwd", &[&x], &mut y)?;
        Ok((candle::CudaStorage::wrap_cuda_slice(y, dev), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluBackward)?))
    }
}

/// `dx = dy · dy/dx` from `x` and `dy`.
struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-tanh-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        dy: &CpuStorage,
        dy_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (contiguous(x, x_layout)?, contiguous(dy, dy_layout)?);
        if x.len() != dy.len() {
            candle::bail!("gelu backward: {} gradients for {} inputs", dy.len(), x.len())
        }
        let dx = x
            .par_iter()
            .zip(dy.par_iter())
            .map(|(&v, &g)| {
                let t = tanh_u(v);
                g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * v * v))
            })
            .collect();
        Ok((CpuStorage::F32(dx), x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle::CudaStorage,
        x_layout: &Layout,
        dy: &candle::CudaStorage,
        dy_layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (xv, dyv) = (cuda::view(x, x_layout)?, cuda::view(dy, dy_layout)?);
        if xv.len() != dyv.len() {
            candle::bail!("gelu backward: {} gradients for {} inputs", dyv.len(), xv.len())
        }
        // SAFETY: the kernel writes every element.
        let mut dx = unsafe { dev.alloc::<f32>(xv.len())? };
        cuda::launch(&dev, "gelu_bwd", &[&xv, &dyv], &mut dx)?;
        Ok((candle::CudaStorage::wrap_cuda_slice(dx, dev), x_layout.shape().clone()))
    }
}

/// The launcher of `gelu.cu`'s two kernels.
#[cfg(feature = "cuda")]
mod cuda {
    use candle::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
    use candle::cuda_backend::WrapErr;
    use candle::{CudaDevice, CudaStorage, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/finetune_gelu.ptx"));
    /// candle caches modules by name per device.
    const MODULE: &str = "finetune_gpt2-gelu";
    const THREADS: u32 = 256;

    /// The f32 elements of a contiguous layout.
    pub(super) fn view<'a>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, f32>> {
        match layout.contiguous_offsets() {
            Some((start, end)) => Ok(storage.as_cuda_slice::<f32>()?.slice(start..end)),
            None => candle::bail!("gelu: contiguous f32 operands only"),
        }
    }

    /// `entry(inputs.., out, n)` over `out.len()` elements, grid-stride.
    pub(super) fn launch(
        dev: &CudaDevice,
        entry: &str,
        inputs: &[&CudaView<'_, f32>],
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = out.len();
        if n == 0 {
            return Ok(());
        }
        let func = dev.get_or_load_custom_func(entry, MODULE, PTX)?;
        let len = n as i64;
        let blocks = n.div_ceil(THREADS as usize).clamp(1, 4096) as u32;
        let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut builder = func.builder();
        for input in inputs {
            builder.arg(*input);
        }
        builder.arg(out).arg(&len);
        // SAFETY: `gelu_fwd` takes (const float* x, float* y, int64_t n) and
        // `gelu_bwd` (const float* x, const float* dy, float* dx, int64_t n); every
        // buffer holds n f32 on this device (the callers checked the lengths), and
        // the guards order the launch on the stream and outlive it.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}
