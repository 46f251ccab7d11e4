//! The sums over the rows of a matrix, for the gradients of the Conv1D biases
//! (`bias.rs`) and of the layer norm's gain and shift (`layer_norm.rs`).
//! candle's CPU `sum(0)` visits the elements one by one on one thread, with two
//! integer divisions each for its place in the output: 12 ms for 4096 x 768
//! f32 on the 2-vCPU VM, where this op's bands of columns take 1.0 ms. Each
//! column is summed from 0 row by row, as candle's loop adds them, so the sums
//! are candle's bit for bit. On CUDA, candle's `sum(0)`.

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
    if t.device().is_cpu() {
        rows.contiguous()?.apply_op1_no_bwd(&ColumnSums)
    } else {
        rows.sum(0)
    }
}

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
}
