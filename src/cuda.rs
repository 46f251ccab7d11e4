//! Launchers for the fused kernels in `cuda/cross_entropy.cu` (feature
//! `cuda`). The PTX is compiled by `build.rs`, embedded here, and loaded once
//! per device by candle's module cache (the stand-in for `torch.compile`).
//! What the kernels compute is written in `op.rs`.

use crate::cpu::STATS;
use crate::op::OpConfig;
use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));
const MODULE: &str = "candle_chunked_ce";
/// Threads per block: one block per row; rows of 32k-256k classes give every
/// thread 60-500 elements.
const THREADS: u32 = 512;
/// Blocks per launch at most; the kernels loop over further rows.
const MAX_BLOCKS: usize = 1 << 16;

/// Where the rows of `[.., V]` logits live: row `r` starts at
/// `start + (r / inner) * stride_outer + (r % inner) * stride_inner`.
struct CudaRows {
    rows: i64,
    vocab: i64,
    start: i64,
    inner: i64,
    stride_outer: i64,
    stride_inner: i64,
}

impl CudaRows {
    fn new(layout: &Layout) -> Result<Self> {
        let (dims, strides) = (layout.dims(), layout.stride());
        let vocab = *dims.last().unwrap_or(&0);
        if vocab > 1 && strides.last() != Some(&1) {
            bail!("chunked cross-entropy (cuda): the vocabulary dim must be unit-stride, strides {strides:?}")
        }
        let (rows, inner, stride_outer, stride_inner) = match (dims, strides) {
            ([n, _], [s, _]) => (*n, (*n).max(1), 0, *s),
            ([b, s, _], [sb, ss, _]) => (b * s, (*s).max(1), *sb, *ss),
            _ => bail!("chunked cross-entropy (cuda): logits must be rank 2 or 3, got {:?}", layout.shape()),
        };
        let i = |v: usize| v as i64;
        Ok(Self {
            rows: i(rows),
            vocab: i(vocab),
            start: i(layout.start_offset()),
            inner: i(inner),
            stride_outer: i(stride_outer),
            stride_inner: i(stride_inner),
        })
    }

    fn launch_config(&self) -> LaunchConfig {
        let blocks = (self.rows as usize).clamp(1, MAX_BLOCKS) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }
}

/// Per-row statistics `[N, 4] = (ce, lse, logit_sum, correct)` (see `op.rs`),
/// f32 (f64 for f64 logits). Fails, naming
/// the first bad row and its value, if a label is outside `[0, V)` and not
/// `ignore_index` (the kernel flags the row; reading the flag is the one host
/// sync).
pub(crate) fn forward(
    logits: &CudaStorage,
    logits_layout: &Layout,
    labels: &CudaStorage,
    labels_layout: &Layout,
    cfg: &OpConfig,
) -> Result<(CudaStorage, Shape)> {
    let ignore_index = cfg.ignore_index;
    let rows = CudaRows::new(logits_layout)?;
    let dev = logits.device();
    let labels = contiguous::<i64>(labels, labels_layout)?;
    let first_bad_row = dev.clone_htod(&[u64::MAX])?;
    let args = ForwardArgs { dev, rows: &rows, labels: &labels, first_bad_row: &first_bad_row, cfg };
    let cap = kernel_cap(cfg);
    let stats = match logits.dtype() {
        DType::F32 => args.launch::<f32, f32>("ce_fwd_f32", logits, cap as f32)?,
        DType::BF16 => args.launch::<bf16, f32>("ce_fwd_bf16", logits, cap as f32)?,
        DType::F16 => args.launch::<f16, f32>("ce_fwd_f16", logits, cap as f32)?,
        DType::F64 => args.launch::<f64, f64>("ce_fwd_f64", logits, cap)?,
        other => bail!("chunked cross-entropy (cuda): logits must be a float dtype, got {other:?}"),
    };
    let row = dev.clone_dtoh(&first_bad_row)?[0];
    if row != u64::MAX {
        let row = row as usize;
        let label = dev.clone_dtoh(&labels.slice(row..row + 1))?[0];
        return Err(crate::op::bad_label(row, label, rows.vocab as usize, ignore_index));
    }
    Ok((stats, Shape::from((rows.rows as usize, STATS))))
}

/// What a forward launch needs besides the logits.
struct ForwardArgs<'a> {
    dev: &'a CudaDevice,
    rows: &'a CudaRows,
    labels: &'a CudaView<'a, i64>,
    first_bad_row: &'a CudaSlice<u64>,
    cfg: &'a OpConfig,
}

impl ForwardArgs<'_> {
    /// `cap` is the soft-cap in the accumulator type, 0 for none.
    fn launch<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        name: &str,
        logits: &CudaStorage,
        cap: A,
    ) -> Result<CudaStorage> {
        let (dev, rows) = (self.dev, self.rows);
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let stats = dev.alloc_zeros::<A>(STATS * rows.rows as usize)?;
        if rows.rows > 0 {
            let want_sum = i32::from(self.cfg.terms.logit_sum);
            let mut builder = func.builder();
            builder.arg(logits.as_cuda_slice::<T>()?).arg(self.labels).arg(&stats).arg(self.first_bad_row);
            builder.arg(&rows.rows).arg(&rows.vocab).arg(&self.cfg.ignore_index).arg(&cap).arg(&want_sum);
            builder.arg(&rows.start).arg(&rows.inner).arg(&rows.stride_outer).arg(&rows.stride_inner);
            // SAFETY: the argument list matches `ce_fwd_*` in cuda/cross_entropy.cu; every
            // row offset lies inside `logits` (from its layout), `labels` holds `rows`
            // values and `stats` 4 * `rows`.
            unsafe { builder.launch(rows.launch_config()) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(stats, dev.clone()))
    }
}

/// The gradient into a fresh contiguous buffer shaped like the logits.
/// `factors` is `[N, 5] = (g_ce, g_lse, g_sum, lse, ce)`, contiguous.
pub(crate) fn backward(
    logits: &CudaStorage,
    logits_layout: &Layout,
    labels: &CudaStorage,
    labels_layout: &Layout,
    factors: &CudaStorage,
    factors_layout: &Layout,
    cfg: &OpConfig,
) -> Result<(CudaStorage, Shape)> {
    let rows = CudaRows::new(logits_layout)?;
    let dev = logits.device();
    let labels = contiguous::<i64>(labels, labels_layout)?;
    let args = BackwardArgs { dev, rows: &rows, labels, cfg };
    let cap = kernel_cap(cfg);
    let grad = match logits.dtype() {
        DType::F32 => args.launch::<f32, f32>("ce_bwd_f32", logits, factors, factors_layout, cap as f32)?,
        DType::BF16 => args.launch::<bf16, f32>("ce_bwd_bf16", logits, factors, factors_layout, cap as f32)?,
        DType::F16 => args.launch::<f16, f32>("ce_bwd_f16", logits, factors, factors_layout, cap as f32)?,
        DType::F64 => args.launch::<f64, f64>("ce_bwd_f64", logits, factors, factors_layout, cap)?,
        other => bail!("chunked cross-entropy (cuda): logits must be a float dtype, got {other:?}"),
    };
    Ok((grad, logits_layout.shape().clone()))
}

/// The gradient written over the logits' own storage (`inplace_grad`).
pub(crate) fn backward_in_place(
    logits: &mut CudaStorage,
    logits_layout: &Layout,
    labels: &CudaStorage,
    labels_layout: &Layout,
    factors: &CudaStorage,
    factors_layout: &Layout,
    cfg: &OpConfig,
) -> Result<()> {
    let rows = CudaRows::new(logits_layout)?;
    let dev = logits.device().clone();
    let labels = contiguous::<i64>(labels, labels_layout)?;
    let args = BackwardArgs { dev: &dev, rows: &rows, labels, cfg };
    let cap = kernel_cap(cfg);
    match logits.dtype() {
        DType::F32 => {
            args.launch_in_place::<f32, f32>("ce_bwd_inplace_f32", logits, factors, factors_layout, cap as f32)
        }
        DType::BF16 => {
            args.launch_in_place::<bf16, f32>("ce_bwd_inplace_bf16", logits, factors, factors_layout, cap as f32)
        }
        DType::F16 => {
            args.launch_in_place::<f16, f32>("ce_bwd_inplace_f16", logits, factors, factors_layout, cap as f32)
        }
        DType::F64 => args.launch_in_place::<f64, f64>("ce_bwd_inplace_f64", logits, factors, factors_layout, cap),
        other => bail!("chunked cross-entropy (cuda): logits must be a float dtype, got {other:?}"),
    }
}

/// What both backward launches share.
struct BackwardArgs<'a> {
    dev: &'a CudaDevice,
    rows: &'a CudaRows,
    labels: CudaView<'a, i64>,
    cfg: &'a OpConfig,
}

impl BackwardArgs<'_> {
    fn launch<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(
        &self,
        name: &str,
        logits: &CudaStorage,
        factors: &CudaStorage,
        factors_layout: &Layout,
        cap: A,
    ) -> Result<CudaStorage> {
        let rows = self.rows;
        let func = self.dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let len = (rows.rows * rows.vocab) as usize;
        // SAFETY: `ce_bwd_*` writes every element of every row (zeros on ignored rows).
        let grad = unsafe { self.dev.alloc::<T>(len)? };
        if len > 0 {
            let factors = contiguous::<A>(factors, factors_layout)?;
            let mut builder = func.builder();
            builder.arg(logits.as_cuda_slice::<T>()?).arg(&self.labels).arg(&factors).arg(&grad);
            builder.arg(&rows.rows).arg(&rows.vocab).arg(&self.cfg.ignore_index).arg(&cap);
            builder.arg(&rows.start).arg(&rows.inner).arg(&rows.stride_outer).arg(&rows.stride_inner);
            // SAFETY: the argument list matches `ce_bwd_*`; `grad` holds rows * vocab
            // elements, `factors` 5 * rows, and every logits row lies inside its storage.
            unsafe { builder.launch(rows.launch_config()) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(grad, self.dev.clone()))
    }

    fn launch_in_place<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(
        &self,
        name: &str,
        logits: &mut CudaStorage,
        factors: &CudaStorage,
        factors_layout: &Layout,
        cap: A,
    ) -> Result<()> {
        let rows = self.rows;
        if rows.rows * rows.vocab == 0 {
            return Ok(());
        }
        let func = self.dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let factors = contiguous::<A>(factors, factors_layout)?;
        let logits = logits.as_cuda_slice_mut::<T>()?;
        let mut builder = func.builder();
        builder.arg(logits).arg(&self.labels).arg(&factors);
        builder.arg(&rows.rows).arg(&rows.vocab).arg(&self.cfg.ignore_index).arg(&cap);
        builder.arg(&rows.start).arg(&rows.inner).arg(&rows.stride_outer).arg(&rows.stride_inner);
        // SAFETY: the argument list matches `ce_bwd_inplace_*`; candle refused layouts
        // with internal overlap, so the rows the kernel rewrites are disjoint, and each
        // thread reads an element before it writes it.
        unsafe { builder.launch(rows.launch_config()) }.w()?;
        Ok(())
    }
}

/// The soft-cap as the kernels take it: 0 for none.
fn kernel_cap(cfg: &OpConfig) -> f64 {
    cfg.terms.softcap.unwrap_or(0.0)
}

/// The contiguous elements of an internal operand (labels, factors).
fn contiguous<'a, T: CudaDType>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("chunked cross-entropy (cuda): internal operands must be contiguous")
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}
