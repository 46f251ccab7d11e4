//! The sum of the squares of every element of a list of tensors, for the
//! gradient clipping's global norm: one pass over each f32 gradient that
//! writes a few f64 partial sums, then one sum of those. candle's operations
//! (`sqr`, `sum_all`, `to_dtype`, `add`) take four launches a gradient on
//! CUDA, the first writing a squared copy of it (on the CPU too). On the CPU
//! in Rust, on rayon's threads; on CUDA (feature `cuda`) by `sum_squares.cu`,
//! which the crate's build.rs compiles. Each square is exact in f64 and summed
//! there, in an order fixed by the tensors' lengths alone: the same result
//! on every run and any number of threads.

use crate::storage::cpu_slice;
use candle::{CpuStorage, DType, Device, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// `Σ x²` over every element of `tensors` (any float dtypes, any layouts, one
/// device): an f64 scalar on that device, 0 for no tensors. Contiguous f32
/// tensors on the CPU or CUDA take one pass each (others of f32 a
/// contiguous copy first); other dtypes candle's `sqr` and `sum_all` in
/// their own.
///
/// # Errors
/// Tensors on different devices, or not of a float dtype.
pub fn sum_of_squares(tensors: &[&Tensor], device: &Device) -> Result<Tensor> {
    for t in tensors {
        if !t.device().same_device(device) {
            candle::bail!("sum_of_squares: a tensor on {:?}, expected {:?}", t.device().location(), device.location())
        }
        if !t.dtype().is_float() {
            candle::bail!("sum_of_squares: float tensors only, got {:?}", t.dtype())
        }
    }
    let one_pass = |t: &&&Tensor| {
        t.dtype() == DType::F32 && (t.device().is_cpu() || cfg!(feature = "cuda") && t.device().is_cuda())
    };
    let (f32s, others): (Vec<&Tensor>, Vec<&Tensor>) = tensors.iter().partition(one_pass);
    let mut total = if f32s.is_empty() {
        Tensor::zeros((), DType::F64, device)?
    } else {
        // One row of partial sums per tensor: each CUDA block writes its own (the
        // rest stay 0); the CPU writes the first.
        let slots = if device.is_cuda() { SLOTS } else { 1 };
        let partials = Tensor::zeros((f32s.len(), slots), DType::F64, device)?;
        for (row, t) in f32s.iter().enumerate() {
            partials.narrow(0, row, 1)?.inplace_op2(&t.contiguous()?, &SumSquaresInto)?;
        }
        partials.sum_all()?
    };
    for t in others {
        total = (total + t.sqr()?.sum_all()?.to_dtype(DType::F64)?)?;
    }
    Ok(total)
}

/// Partial sums per tensor on CUDA: the most blocks one pass launches. At 256
/// threads a block, GPT-2's 38.6 M-element token embedding is some 150
/// elements a thread.
const SLOTS: usize = 1024;

/// The errors' name.
const OP: &str = "sum_of_squares";

/// Elements per rayon task on the CPU (64 KiB of f32).
const TASK: usize = 1 << 14;

/// `Σ x²` of one task in f64, over [`LANES`] running sums (one sum's chain of
/// dependent additions would bound the loop by the adder's latency).
fn task_sum(x: &[f32]) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut groups = x.chunks_exact(LANES);
    for group in &mut groups {
        for (lane, &v) in lanes.iter_mut().zip(group) {
            *lane += f64::from(v) * f64::from(v);
        }
    }
    let rest: f64 = groups.remainder().iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    lanes.iter().sum::<f64>() + rest
}

/// Running sums of [`task_sum`]: two AVX2 registers of f64.
const LANES: usize = 8;

/// Writes the f64 partial sums of the squares of `x` (contiguous f32) into
/// `partials`, a contiguous row of f64 zeros.
struct SumSquaresInto;

impl InplaceOp2 for SumSquaresInto {
    fn name(&self) -> &'static str {
        "sum-squares-into"
    }

    fn cpu_fwd(&self, partials: &mut CpuStorage, p_layout: &Layout, x: &CpuStorage, x_layout: &Layout) -> Result<()> {
        let x = cpu_slice(x, x_layout, OP)?;
        let slot = match (partials, p_layout.contiguous_offsets()) {
            (CpuStorage::F64(data), Some((start, end))) if end > start => &mut data[start],
            _ => candle::bail!("{OP}: the partial sums must be a contiguous f64 row"),
        };
        // Each task's sum, then the tasks' in order: fixed by the length alone.
        let tasks: Vec<f64> = x.par_chunks(TASK).map(task_sum).collect();
        *slot = tasks.iter().sum();
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        partials: &mut candle::CudaStorage,
        p_layout: &Layout,
        x: &candle::CudaStorage,
        x_layout: &Layout,
    ) -> Result<()> {
        use crate::storage::cuda::{grid_stride, view};
        use candle::backend::BackendStorage;
        use candle::cuda_backend::cudarc::driver::PushKernelArg;
        use candle::cuda_backend::WrapErr;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/finetune_sum_squares.ptx"));
        let dev = partials.device().clone();
        let mut row = match p_layout.contiguous_offsets() {
            Some((start, end)) if end - start == SLOTS => partials.as_cuda_slice_mut::<f64>()?.slice_mut(start..end),
            _ => candle::bail!("{OP}: the partial sums must be a contiguous f64 row of {SLOTS}"),
        };
        let x = view(x, x_layout, OP)?;
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let func = dev.get_or_load_custom_func("sum_squares", "finetune_gpt2-sum_squares", PTX)?;
        let len = n as i64;
        let mut builder = func.builder();
        builder.arg(&x).arg(&len).arg(&mut row);
        // SAFETY: `sum_squares` takes (const float* x, int64_t n, double*
        // partials) and block b writes partials[b] only: x holds n f32, the row
        // SLOTS f64, at least the grid's blocks (checked above); the two are
        // different buffers (f32 and f64), as `__restrict__` assumes; the views'
        // guards order the launch on the stream and outlive it.
        unsafe { builder.launch(grid_stride(n, SLOTS)) }.w()?;
        Ok(())
    }
}
