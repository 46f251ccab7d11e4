//! GPT-2's token embedding, the rows `table[ids]`, as one candle op whose
//! backward sums each id's rows of the gradient itself. candle's
//! `index_select` backward adds them with `index_add`, whose CUDA kernel
//! (candle-kernels 0.11) runs one thread per column, each adding every
//! position's row in turn: for GPT-2 124M at 8 x 512 tokens, 768 threads in
//! one block, 4096 dependent steps each. Here (`embedding.cu` on CUDA, feature
//! `cuda`, which the crate's build.rs compiles) the positions run in parallel
//! and each id's row is summed by one block. Each id's rows are summed from 0
//! in position order and the sum added to the row: into zeros that is
//! candle's `index_add`, bit for bit, on every device (a sum started from +0
//! is never -0, so adding it to 0 leaves it as it is); into another gradient
//! it is what candle's backward adds when the table has one already (GPT-2's
//! `lm_head` tied to it), in place.
//!
//! An id of `u32::MAX` is no row, as in candle's `index_select` (a zero row)
//! and `index_add` (skipped). Any other id of `V` or more is an error on the
//! CPU; CUDA's kernel skips it without reading the ids back (candle's
//! `index_select` forward has stopped at a device assertion by then), so the
//! example checks its tokens against the vocabulary first.

use crate::storage::{cpu_slice, cpu_slice_mut};
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, DType, InplaceOp2, Layout, Result, Shape, Tensor, D};

/// The rows `table[ids]`, `[N, C]`, of a `[V, C]` f32 table and `[N]` u32
/// ids, differentiable with respect to the table ([`embedding_grad`]).
///
/// # Errors
/// Another dtype or rank, or (on the CPU) an id of `V` or more but `u32::MAX`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (_, width) = table.dims2()?;
    let n = ids.dims1()?;
    if table.dtype() != DType::F32 || ids.dtype() != DType::U32 {
        candle::bail!("{OP}: an f32 table [V, {width}] and u32 ids [{n}], got {:?} {:?}", table.dtype(), ids.dtype())
    }
    table.contiguous()?.apply_op2(&ids.contiguous()?, Embedding)
}

/// The gradient of [`embedding`]'s table, `[vocab, C]` f32: row `v` the sum
/// of the rows of `grad` (`[N, C]` f32) at the positions whose id (`[N]`
/// u32) is `v`, added into 0 in position order (0 where no id is `v`).
///
/// # Errors
/// As [`add_embedding_grad`].
pub fn embedding_grad(ids: &Tensor, grad: &Tensor, vocab: usize) -> Result<Tensor> {
    let sums = Tensor::zeros((vocab, grad.dim(D::Minus1)?), DType::F32, grad.device())?;
    add_embedding_grad(&sums, ids, grad)?;
    Ok(sums)
}

/// Adds [`embedding_grad`]'s rows into `sums` (`[vocab, C]` f32, contiguous,
/// on `grad`'s device), in place: row `v` becomes `sums[v] + s`, with `s`
/// the rows of `grad` at the positions whose id is `v` summed from 0 in
/// position order; only the ids' rows are touched.
///
/// # Errors
/// Another dtype or rank, lengths or widths that differ, `sums` not
/// contiguous, ids on another device, or, on the CPU, an id of `vocab` or
/// more but `u32::MAX` (see the module docs).
pub fn add_embedding_grad(sums: &Tensor, ids: &Tensor, grad: &Tensor) -> Result<()> {
    let (n, width) = grad.dims2()?;
    let (vocab, sums_width) = sums.dims2()?;
    let dtypes = (sums.dtype(), grad.dtype(), ids.dtype());
    if dtypes != (DType::F32, DType::F32, DType::U32) || ids.dims1()? != n || sums_width != width {
        candle::bail!(
            "{OP}: sums [V, {width}] f32, grad [{n}, {width}] f32 and ids [{n}] u32, got {:?} {:?} {:?} {dtypes:?}",
            sums.shape(),
            grad.shape(),
            ids.shape(),
        )
    }
    if !sums.is_contiguous() {
        candle::bail!("{OP}: the sums must be contiguous")
    }
    if !ids.device().same_device(grad.device()) {
        candle::bail!("{OP}: ids on {:?}, the gradient on {:?}", ids.device().location(), grad.device().location())
    }
    sums.inplace_op2(&grad.contiguous()?, &AddRows { ids: ids.contiguous()?, vocab })
}

/// The errors' name.
const OP: &str = "embedding";

struct Embedding;

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        table: &CpuStorage,
        table_layout: &Layout,
        ids: &CpuStorage,
        ids_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let rows = table.index_select(ids, table_layout, ids_layout, 0)?;
        Ok((rows, (ids_layout.shape().elem_count(), table_layout.dims()[1]).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        table: &candle::CudaStorage,
        table_layout: &Layout,
        ids: &candle::CudaStorage,
        ids_layout: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let rows = table.index_select(ids, table_layout, ids_layout, 0)?;
        Ok((rows, (ids_layout.shape().elem_count(), table_layout.dims()[1]).into()))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _rows: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(embedding_grad(ids, grad, table.dim(0)?)?), None))
    }
}

/// Adds the rows of a gradient `[N, C]` into `[vocab, C]` sums at their ids.
struct AddRows {
    ids: Tensor,
    vocab: usize,
}

impl InplaceOp2 for AddRows {
    fn name(&self) -> &'static str {
        "add-embedding-grad"
    }

    fn cpu_fwd(&self, sums: &mut CpuStorage, s_layout: &Layout, grad: &CpuStorage, g_layout: &Layout) -> Result<()> {
        let (sums, grad) = (cpu_slice_mut(sums, s_layout, OP)?, cpu_slice(grad, g_layout, OP)?);
        let ids = self.ids.to_vec1::<u32>()?;
        if let Some(id) = ids.iter().find(|&&id| id != NO_ROW && id as usize >= self.vocab) {
            candle::bail!("{OP}: id {id} is outside the vocabulary of {}", self.vocab)
        }
        let width = sums.len() / self.vocab.max(1);
        // The positions grouped by id, each group in position order (a stable sort).
        let mut positions: Vec<usize> = (0..ids.len()).filter(|&p| ids[p] != NO_ROW).collect();
        positions.sort_by_key(|&p| ids[p]);
        let mut sum = vec![0f32; width];
        for group in positions.chunk_by(|&a, &b| ids[a] == ids[b]) {
            sum.fill(0.0);
            for &p in group {
                sum.iter_mut().zip(&grad[p * width..(p + 1) * width]).for_each(|(s, &g)| *s += g);
            }
            let start = ids[group[0]] as usize * width;
            sums[start..start + width].iter_mut().zip(&sum).for_each(|(s, &v)| *s += v);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sums: &mut candle::CudaStorage,
        s_layout: &Layout,
        grad: &candle::CudaStorage,
        g_layout: &Layout,
    ) -> Result<()> {
        use crate::storage::cuda::{view, view_mut};
        use candle::backend::BackendDevice;
        use candle::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle::cuda_backend::WrapErr;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/finetune_embedding.ptx"));
        let dev = sums.device().clone();
        let n = self.ids.elem_count();
        let width = g_layout.shape().elem_count() / n.max(1);
        if n == 0 || width == 0 {
            return Ok(());
        }
        let (ids_storage, ids_layout) = self.ids.storage_and_layout();
        let ids = match (&*ids_storage, ids_layout.contiguous_offsets()) {
            (candle::Storage::Cuda(s), Some((start, end))) if s.device().same_device(&dev) => {
                s.as_cuda_slice::<u32>()?.slice(start..end)
            }
            _ => candle::bail!("{OP}: the ids must be contiguous u32 on the gradient's device"),
        };
        let grad = view(grad, g_layout, OP)?;
        let mut sums = view_mut(sums, s_layout, OP)?;
        let width_arg =
            i32::try_from(width).map_err(|_| candle::Error::Msg(format!("{OP}: {width} columns exceed int")))?;
        let func = dev.get_or_load_custom_func("embedding_bwd", "finetune_gpt2-embedding", PTX)?;
        let (len, vocab) = (n as i64, self.vocab as i64);
        let mut builder = func.builder();
        builder.arg(&grad).arg(&ids).arg(&mut sums).arg(&len).arg(&width_arg).arg(&vocab);
        // A block per position, the blocks looping over further positions past 65535.
        let blocks = n.clamp(1, 65535) as u32;
        let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `embedding_bwd` takes (const float* grad, const unsigned* ids,
        // float* sums, int64_t n, int width, int64_t vocab), with blocks of at
        // most 1024 threads (its shared arrays' length): grad holds n rows of
        // width f32, ids n u32, sums vocab rows of width f32 (checked by
        // `add_embedding_grad`); an id of vocab or more is skipped by the kernel;
        // the three are different buffers, as `__restrict__` assumes; the views'
        // guards order the launch on the stream and outlive it.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}

/// The id that is no row (see the module docs).
const NO_ROW: u32 = u32::MAX;
