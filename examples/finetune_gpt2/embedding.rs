//! GPT-2's token embedding, the rows `table[ids]`, as one candle op whose
//! backward sums each id's rows of the gradient itself. candle's
//! `index_select` backward adds them with `index_add`, whose CUDA kernel
//! (candle-kernels 0.11) runs one thread per column, each adding every
//! position's row in turn: for GPT-2 124M at 8 x 512 tokens, 768 threads in
//! one block, 4096 dependent steps each. Here (`embedding.cu` on CUDA, feature
//! `cuda`, which the crate's build.rs compiles) the positions run in parallel
//! and each id's row is summed by one block. The sums are candle's bit for
//! bit: each id's rows added into 0 in position order, on every device.

use crate::storage::{cpu_slice, cpu_slice_mut};
use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp2, DType, InplaceOp2, Layout, Result, Shape, Tensor};

/// The rows `table[ids]`, `[N, C]`, of a `[V, C]` f32 table and `[N]` u32
/// ids, differentiable with respect to the table ([`embedding_grad`]).
///
/// # Errors
/// Another dtype or rank, or an id of `V` or more (on the CPU: candle's
/// `index_select` checks; the callers check ids against the vocabulary first,
/// since on CUDA candle's kernel stops at a device assertion).
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
/// Another dtype or rank, lengths that differ, or, on the CPU, an id of
/// `vocab` or more (CUDA's kernel skips one without reading the ids back;
/// [`embedding`]'s forward stops at candle's device assertion first).
pub fn embedding_grad(ids: &Tensor, grad: &Tensor, vocab: usize) -> Result<Tensor> {
    let (n, width) = grad.dims2()?;
    if grad.dtype() != DType::F32 || ids.dtype() != DType::U32 || ids.dims1()? != n {
        candle::bail!(
            "{OP}: grad [{n}, {width}] f32 and ids [{n}] u32, got {:?} {:?} {:?}",
            ids.shape(),
            ids.dtype(),
            grad.dtype()
        )
    }
    let sums = Tensor::zeros((vocab, width), DType::F32, grad.device())?;
    let rows = Rows { ids: ids.contiguous()?, vocab };
    sums.inplace_op2(&grad.contiguous()?, &rows)?;
    Ok(sums)
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

/// Adds the rows of a gradient `[N, C]` into zeros `[vocab, C]` at their ids.
struct Rows {
    ids: Tensor,
    vocab: usize,
}

impl Rows {
    /// The ids as a host slice (the CPU's) after checking them against the vocabulary.
    fn checked<'a>(&self, ids: &'a [u32]) -> Result<&'a [u32]> {
        match ids.iter().find(|&&id| id as usize >= self.vocab) {
            Some(id) => candle::bail!("{OP}: id {id} is outside the vocabulary of {}", self.vocab),
            None => Ok(ids),
        }
    }
}

impl InplaceOp2 for Rows {
    fn name(&self) -> &'static str {
        "embedding-grad"
    }

    fn cpu_fwd(&self, sums: &mut CpuStorage, s_layout: &Layout, grad: &CpuStorage, g_layout: &Layout) -> Result<()> {
        let (sums, grad) = (cpu_slice_mut(sums, s_layout, OP)?, cpu_slice(grad, g_layout, OP)?);
        let ids = self.ids.to_vec1::<u32>()?;
        let ids = self.checked(&ids)?;
        let width = sums.len() / self.vocab.max(1);
        // Position by position, as candle's `index_add` adds them.
        for (&id, row) in ids.iter().zip(grad.chunks_exact(width.max(1))) {
            let start = id as usize * width;
            sums[start..start + width].iter_mut().zip(row).for_each(|(s, &g)| *s += g);
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
            (candle::Storage::Cuda(s), Some((start, end))) => s.as_cuda_slice::<u32>()?.slice(start..end),
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
        let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `embedding_bwd` takes (const float* grad, const unsigned* ids,
        // float* sums, int64_t n, int width, int64_t vocab), with blocks of
        // BLOCK threads (its shared arrays' length): grad holds n rows of width
        // f32, ids n u32, sums vocab rows of width f32 (zeros, from
        // `embedding_grad`); an id of vocab or more is skipped by the kernel; the
        // views' guards order the launch on the stream and outlive it.
        unsafe { builder.launch(config) }.w()?;
        Ok(())
    }
}

/// Threads per block of `embedding_bwd`: `embedding.cu`'s `BLOCK`.
#[cfg(feature = "cuda")]
const BLOCK: u32 = 256;
