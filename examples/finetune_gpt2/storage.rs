//! Where the example's own ops (`adamw.rs`, `softmax.rs`, `layer_norm.rs`,
//! `gelu.rs`, `bias.rs`, `sum_squares.rs`, `embedding.rs`, `column_sums.rs`) meet candle's storage, written
//! once: contiguous f32 slices on the CPU; on CUDA (feature `cuda`) f32
//! views, the two launch shapes their kernels use (a grid-stride loop over
//! elements, a warp per row), and the one launcher of the row kernels. Each
//! takes the op's name for its errors.

use candle::{CpuStorage, Layout, Result};

/// The f32 elements of a contiguous layout of `storage`.
pub fn cpu_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle::bail!("{op}: contiguous f32 operands only"),
    }
}

/// [`cpu_slice`], writable.
pub fn cpu_slice_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout, op: &str) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => candle::bail!("{op}: contiguous f32 operands only"),
    }
}

#[cfg(feature = "cuda")]
pub mod cuda {
    use candle::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
    use candle::cuda_backend::WrapErr;
    use candle::{CudaDevice, CudaStorage, Layout, Result};

    /// Threads per block of both shapes.
    const THREADS: u32 = 256;

    /// The f32 elements of a contiguous layout of `storage`.
    pub fn view<'a>(storage: &'a CudaStorage, layout: &Layout, op: &str) -> Result<CudaView<'a, f32>> {
        match layout.contiguous_offsets() {
            Some((start, end)) => Ok(storage.as_cuda_slice::<f32>()?.slice(start..end)),
            None => candle::bail!("{op}: contiguous f32 operands only"),
        }
    }

    /// [`view`], writable.
    pub fn view_mut<'a>(storage: &'a mut CudaStorage, layout: &Layout, op: &str) -> Result<CudaViewMut<'a, f32>> {
        match layout.contiguous_offsets() {
            Some((start, end)) => Ok(storage.as_cuda_slice_mut::<f32>()?.slice_mut(start..end)),
            None => candle::bail!("{op}: contiguous f32 operands only"),
        }
    }

    /// A grid-stride loop over `n` elements: whole blocks, at most 4096.
    pub fn elementwise(n: usize) -> LaunchConfig {
        grid_stride(n, 4096)
    }

    /// A grid-stride loop over `n` elements: whole blocks, at least one and
    /// at most `max_blocks`.
    pub fn grid_stride(n: usize, max_blocks: usize) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as usize).clamp(1, max_blocks) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// A warp per row over `rows` rows (8 a block), the blocks looping over
    /// further rows past 65536 of them.
    pub fn warp_per_row(rows: usize) -> LaunchConfig {
        let blocks = rows.div_ceil((THREADS / 32) as usize).clamp(1, 1 << 16) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// A row kernel, `entry(inputs.., out, int64_t rows, int width, float
    /// scalar)` of `(module, ptx)`, launched a warp per row (the causal softmax's
    /// and the layer norm's). Nothing to launch for no rows or no columns.
    ///
    /// # Safety
    /// `entry` must take exactly those parameters, the inputs as `const
    /// float*`; every input and `out` must hold what the entry reads and writes
    /// for `rows` rows of `width`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn launch_rows(
        dev: &CudaDevice,
        (module, ptx): (&str, &str),
        entry: &str,
        inputs: &[&CudaView<'_, f32>],
        out: &mut CudaSlice<f32>,
        rows: usize,
        width: usize,
        scalar: f32,
    ) -> Result<()> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let func = dev.get_or_load_custom_func(entry, module, ptx)?;
        let width_arg =
            i32::try_from(width).map_err(|_| candle::Error::Msg(format!("{entry}: {width} columns exceed int")))?;
        let rows_arg = rows as i64;
        let mut builder = func.builder();
        for input in inputs {
            builder.arg(*input);
        }
        builder.arg(out).arg(&rows_arg).arg(&width_arg).arg(&scalar);
        // SAFETY: the caller's contract: the parameters in this order and types,
        // every buffer as large as the entry reads and writes; the views' and the
        // slice's guards order the launch on the stream and outlive it.
        unsafe { builder.launch(warp_per_row(rows)) }.w()?;
        Ok(())
    }
}
