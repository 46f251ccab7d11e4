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
//! Both are evaluated through `e = e^(-2u)` and `d = 1 / (1 + e)`, with
//! `(1 + tanh u) / 2 = d` and `(1 - tanh² u) / 2 = 2 e d²`: one `exp` and no
//! `tanh`, and no cancellation where `tanh u` nears ±1. Against f64 over
//! x in [-12, 12], the slope is off by at most 2e-7 in f32 this way (the
//! tests hold it to 4e-7) and by 1.2e-6 through `tanh`. glibc's `tanhf`
//! (which calls `expm1f`) also took 9% of a GPT-2 124M step on the CPU,
//! 6.3-6.8x the time of this form per element (BENCHMARKS.md). From
//! `-2u = 88` on (x below about -10.5) `d` is taken as 0 and `e` is not
//! formed (it would overflow): there `d` is below 6.1e-39, and the output
//! and slope are 0. As through `tanh`, the slope is NaN only where `x²`
//! overflows f32 (|x| above 1.8e19), the output only at x = -inf.
//!
//! On the CPU in Rust (on rayon's threads); on CUDA (feature `cuda`) by
//! `gelu.cu`'s kernels, which the crate's build.rs compiles.

use crate::storage::cpu_slice;
#[cfg(feature = "cuda")]
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044715;

/// `(e, d)` of the module docs: `e^(-2u)` (its exponent capped at 88) and
/// `1 / (1 + e)`, 0 from that cap on.
fn exp_and_logistic(x: f32) -> (f32, f32) {
    let z = -2.0 * SQRT_2_OVER_PI * (x + CUBIC * x * x * x);
    let e = z.min(88.0).exp();
    (e, if z >= 88.0 { 0.0 } else { 1.0 / (1.0 + e) })
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

/// The errors' name.
const OP: &str = "gelu";

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(storage, layout, OP)?;
        let y = x.par_iter().map(|&v| v * exp_and_logistic(v).1).collect();
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle::CudaStorage, layout: &Layout) -> Result<(candle::CudaStorage, Shape)> {
        launch("gelu_fwd", &[(storage, layout)], layout.shape())
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gelu_backward(x, dy)?))
    }
}

/// The input's gradient of [`gelu`] from its input `x` (contiguous) and the
/// output's gradient `dy` (`x`'s shape), without a graph: the op's backward,
/// for a block's backward by hand (`block.rs`).
///
/// # Errors
/// Another dtype than f32, or a `dy` of another shape.
pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if dy.shape() != x.shape() {
        candle::bail!("{OP} backward: gradient {:?} for input {:?}", dy.shape(), x.shape())
    }
    x.apply_op2_no_bwd(&dy.contiguous()?, &GeluBackward)
}

/// `dx = dy · dy/dx` from `x` and `dy` (of one shape: checked by the forward
/// op's `bwd`).
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
        let (x, dy) = (cpu_slice(x, x_layout, OP)?, cpu_slice(dy, dy_layout, OP)?);
        let dx = x
            .par_iter()
            .zip(dy.par_iter())
            .map(|(&v, &g)| {
                let (e, d) = exp_and_logistic(v);
                // `e d` (at most 1) before its product with `d`: `e` alone can be 1.7e38.
                g * (d + 2.0 * v * d * (e * d) * SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * v * v))
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
        launch("gelu_bwd", &[(x, x_layout), (dy, dy_layout)], x_layout.shape())
    }
}

/// `entry(inputs.., out, int64_t n)` of `gelu.cu` (compiled by the crate's
/// build.rs) over the `n` elements of `shape`, into a fresh `out`: `gelu_fwd(x,
/// y, n)` or `gelu_bwd(x, dy, dx, n)`.
#[cfg(feature = "cuda")]
fn launch(
    entry: &str,
    inputs: &[(&candle::CudaStorage, &Layout)],
    shape: &Shape,
) -> Result<(candle::CudaStorage, Shape)> {
    use crate::storage::cuda::{elementwise, view};
    use candle::cuda_backend::cudarc::driver::PushKernelArg;
    use candle::cuda_backend::WrapErr;
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/finetune_gelu.ptx"));
    let dev = inputs[0].0.device().clone();
    let views = inputs.iter().map(|(storage, layout)| view(storage, layout, OP)).collect::<Result<Vec<_>>>()?;
    let n = shape.elem_count();
    // SAFETY: the kernels write every element.
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    if n > 0 {
        let func = dev.get_or_load_custom_func(entry, "finetune_gpt2-gelu", PTX)?;
        let len = n as i64;
        let mut builder = func.builder();
        for input in &views {
            builder.arg(input);
        }
        builder.arg(&mut out).arg(&len);
        // SAFETY: the entries take their inputs as `const float*`, then `float*
        // out` and `int64_t n`; every input holds n f32 (the callers' tensors have
        // `shape`), and the guards order the launch on the stream and outlive it.
        unsafe { builder.launch(elementwise(n)) }.w()?;
    }
    Ok((candle::CudaStorage::wrap_cuda_slice(out, dev), shape.clone()))
}
