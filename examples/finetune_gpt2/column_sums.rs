//! The sums over the rows of a matrix, for the gradients of the Conv1D biases
//! (`bias.rs`) and of the layer norm's gain and shift (`layer_norm.rs`).
//! candle's CPU `sum(0)` visits the elements one by one on one thread, with two
//! integer divisions each for its place in the output: 12 ms for 4096 x 768
//! f32 on the 2-vCPU VM, where this op's bands of columns take 1.0 ms. Each
//! column is summed from 0 row by row, as candle's loop adds them, so the sums
//! are candle's bit for bit. On CUDA (feature `cuda`) by `column_sums.cu`,
//! which the crate's build.rs compiles: candle's `sum(0)` there reads each
//! column down the rows, a sector a load; the kernels read rows 128 bytes a
//! warp, sum segments of rows in parallel and then the segments' sums, in an
//! order fixed by the shape ([`cuda_plan`]): not candle's order, so not its
//! bits.

use crate::storage::cpu_slice;
use candle::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `Σ_rows t`: `[C]` f32, the sum over every dimension but the last of `t`
/// (`[.., C]` f32).
///
/// # Errors
/// Another dtype than f32, or a scalar.
pub fn column_sums(t: &Tensor) -> Result<Tensor> {
    let width = t.dim(D::Minus1)?;
    if t.dtype() != DType::F32 {
        candle::bail!("{OP}: f32 only, got {:?}", t.dtype())
    }
    let rows = t.reshape(((), width))?;
    if t.device().is_cpu() || cfg!(feature = "cuda") && t.device().is_cuda() {
        rows.contiguous()?.apply_op1_no_bwd(&ColumnSums)
    } else {
        rows.sum(0)
    }
}

/// How the CUDA kernels split `rows` x `width`: `(segment, parts)`, the rows
/// a block sums (at least [`MIN_SEGMENT`]) and the segments of them, for about
/// [`TARGET_BLOCKS`] blocks of 32 columns in all.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn cuda_plan(rows: usize, width: usize) -> (usize, usize) {
    let column_blocks = width.div_ceil(32).max(1);
    let wanted = (TARGET_BLOCKS / column_blocks).max(1);
    let segment = rows.div_ceil(wanted).max(MIN_SEGMENT);
    (segment, rows.div_ceil(segment))
}

/// Blocks the partial sums aim for: a few per multiprocessor of a large GPU.
const TARGET_BLOCKS: usize = 1024;
/// The fewest rows a block sums: 8 per warp of a 256-thread block.
const MIN_SEGMENT: usize = 64;
/// Threads a block of both kernels.
#[cfg(feature = "cuda")]
const THREADS: u32 = 256;

/// The errors' name.
const OP: &str = "column_sums";

struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(storage, layout, OP)?;
        let width = layout.dims()[1];
        let mut sums = vec![0f32; width];
        if width > 0 {
            // A band of columns a thread, each summed over every row in order.
            let band = width.div_ceil(rayon::current_num_threads()).next_multiple_of(16);
            sums.par_chunks_mut(band).enumerate().for_each(|(i, sums)| {
                let (start, len) = (i * band, sums.len());
                for row in x.chunks_exact(width) {
                    sums.iter_mut().zip(&row[start..start + len]).for_each(|(s, &v)| *s += v);
                }
            });
        }
        Ok((CpuStorage::F32(sums), Shape::from(width)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle::CudaStorage, layout: &Layout) -> Result<(candle::CudaStorage, Shape)> {
        use crate::storage::cuda::{elementwise, view};
        use candle::backend::BackendStorage;
        use candle::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle::cuda_backend::WrapErr;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/finetune_column_sums.ptx"));
        let dev = storage.device().clone();
        let x = view(storage, layout, OP)?;
        let (rows, width) = (layout.dims()[0], layout.dims()[1]);
        if rows == 0 || width == 0 {
            let sums = dev.alloc_zeros::<f32>(width)?;
            return Ok((candle::CudaStorage::wrap_cuda_slice(sums, dev), Shape::from(width)));
        }
        let (segment, parts) = cuda_plan(rows, width);
        // SAFETY: `column_sums_partial` writes every one of them (each part, each column).
        let mut partials = unsafe { dev.alloc::<f32>(parts * width)? };
        // SAFETY: `column_sums_finish` writes every column.
        let mut sums = unsafe { dev.alloc::<f32>(width)? };
        let partial = dev.get_or_load_custom_func("column_sums_partial", "finetune_gpt2-column_sums", PTX)?;
        let finish = dev.get_or_load_custom_func("column_sums_finish", "finetune_gpt2-column_sums", PTX)?;
        let (rows_arg, width_arg, segment_arg, parts_arg) = (rows as i64, width as i32, segment as i64, parts as i32);
        let blocks = (width.div_ceil(32) * parts) as u32;
        let mut builder = partial.builder();
        builder.arg(&x).arg(&rows_arg).arg(&width_arg).arg(&segment_arg).arg(&mut partials);
        let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `column_sums_partial(const float* x, int64_t rows, int width, int64_t
        // segment, float* partials)`: x holds rows * width f32 (a contiguous view),
        // partials parts * width, one per block's part and column (the grid is
        // ceil(width / 32) * parts blocks); THREADS is a multiple of 32, at most
        // 1024; width < 2^31 (a candle dim of f32 on one GPU); the guards outlive
        // the launch, which the stream orders.
        unsafe { builder.launch(config) }.w()?;
        let mut builder = finish.builder();
        builder.arg(&partials).arg(&parts_arg).arg(&width_arg).arg(&mut sums);
        // SAFETY: `column_sums_finish(const float* partials, int parts, int width,
        // float* sums)`: partials holds parts * width f32, sums width; a
        // grid-stride loop over the columns; both outlive the launch.
        unsafe { builder.launch(elementwise(width)) }.w()?;
        Ok((candle::CudaStorage::wrap_cuda_slice(sums, dev), Shape::from(width)))
    }
}
