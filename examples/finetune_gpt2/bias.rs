//! `x + b` over the rows of `x` (`[.., C]` f32, `b` `[C]` f32) as one candle
//! op, for GPT-2's Conv1D biases: candle's `broadcast_add` backward adds the
//! bias's gradient into fresh zeros the size of `x` (the broadcast bias's
//! shape) before summing the rows; this op's backward hands `x` the gradient
//! and the bias its row sums. On the CPU in Rust; on CUDA (feature `cuda`) by
//! `bias.cu`, which the crate's build.rs compiles.

use crate::column_sums::column_sums;
use crate::storage::cpu_slice;
#[cfg(feature = "cuda")]
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `x + bias` row by row, differentiable with respect to both.
///
/// # Errors
/// Another dtype than f32, or a bias that is not `[C]`.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let width = x.dim(D::Minus1)?;
    if x.dtype() != DType::F32 || bias.dtype() != DType::F32 || bias.dims() != [width] {
        candle::bail!("add_bias: x [.., {width}] and bias [{width}] in f32, got {:?} {:?}", bias.shape(), bias.dtype())
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)
}

/// The errors' name.
const OP: &str = "add_bias";

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (cpu_slice(x, x_layout, OP)?, cpu_slice(b, b_layout, OP)?);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(b.len().max(1)).zip(x.par_chunks(b.len().max(1))).for_each(|(y, x)| {
            y.iter_mut().zip(x).zip(b).for_each(|((y, &x), &b)| *y = x + b);
        });
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle::CudaStorage,
        x_layout: &Layout,
        b: &candle::CudaStorage,
        b_layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        use crate::storage::cuda::{elementwise, view};
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        use candle::cuda_backend::WrapErr;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/finetune_bias.ptx"));
        let dev = x.device().clone();
        let (xv, bv) = (view(x, x_layout, OP)?, view(b, b_layout, OP)?);
        let (n, width) = (xv.len(), bv.len());
        // SAFETY: the kernel writes every element.
        let mut y = unsafe { dev.alloc::<f32>(n)? };
        if n > 0 {
            let func = dev.get_or_load_custom_func("add_bias", "finetune_gpt2-bias", PTX)?;
            let (len, width_arg) = (n as i64, width as i32);
            let mut builder = func.builder();
            builder.arg(&xv).arg(&bv).arg(&mut y).arg(&len).arg(&width_arg);
            // SAFETY: `add_bias` takes (const float* x, const float* bias, float* y,
            // int64_t n, int width); x and y hold n f32, bias width = C (checked by
            // `add_bias`, and n is a multiple of it); the guards outlive the launch.
            unsafe { builder.launch(elementwise(n)) }.w()?;
        }
        Ok((candle::CudaStorage::wrap_cuda_slice(y, dev), x_layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _bias: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(column_sums(grad)?)))
    }
}
