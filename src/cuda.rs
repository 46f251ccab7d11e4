//! Launchers for the fused kernels in `cuda/cross_entropy.cu` (feature
//! `cuda`). The PTX is compiled by `build.rs`, embedded here, and loaded once
//! per device by candle's module cache (the stand-in for `torch.compile`).
//! What the kernels compute is written in `op/mod.rs`; how they are launched
//! (entry, grid, block, arguments) in `kernel_abi/`, which this file only
//! binds to device memory: each operand is bound through [`bind`], the one
//! place that looks at a buffer's dtype, as read or as written, so that the
//! launch waits for the buffer's pending work and is recorded against it.
//! An empty problem has no launch (`kernel_abi` returns none): its outputs
//! are allocated and zeroed, and no kernel runs.

use crate::config::{compute_dtype, OpConfig, UnitFactors, STATS};
use crate::kernel_abi::{
    self, KernelArg, KernelLaunch, KernelOptions, LabelGeometry, LaunchShape, MaskElements, Operand, RowGeometry,
};
use candle::backend::{BackendDevice, BackendStorage};
use candle::cuda_backend::cudarc::driver::{
    sys::CUdeviceptr, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle::cuda_backend::{CudaStorageSlice, WrapErr};
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, StorageRef};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));
/// candle caches modules by name per device: two versions of this crate in one
/// binary must not share one.
const MODULE: &str = concat!("candle_chunked_ce-", env!("CARGO_PKG_VERSION"));

/// Per-row statistics `[N, 4] = (ce, lse, logit_sum, correct)` (see `op/mod.rs`),
/// f32 (f64 for f64 logits). Fails, naming the first bad row and its value, if
/// a label is outside `[0, V)` and not `ignore_index` (the kernel flags the
/// row; reading the flag is the one host sync, skipped when `cfg.labels_checked`).
pub(crate) fn forward(
    logits: &CudaStorage,
    logits_layout: &Layout,
    labels: &CudaStorage,
    labels_layout: &Layout,
    cfg: &OpConfig,
) -> Result<(CudaStorage, Shape)> {
    let rows = RowGeometry::new(logits_layout)?;
    let dtype = logits.dtype();
    let launch = kernel_abi::forward(&rows, dtype, &options(cfg), LaunchShape::for_vocab(dtype, rows.vocab))?;
    let dev = logits.device().clone();
    row_stats(&dev, Access::Read(logits, 0), None, dtype, &rows, launch, labels, labels_layout, cfg)
}

/// As [`forward`], and the kernel also rewrites the logits with the gradient
/// of a scalar loss whose value receives 1, from `unit` (two passes over the
/// logits; see `op::row_stats_and_unit_grad`). Without class weights.
pub(crate) fn forward_with_grad(
    logits: &mut CudaStorage,
    logits_layout: &Layout,
    labels: &CudaStorage,
    labels_layout: &Layout,
    cfg: &OpConfig,
    unit: &UnitFactors,
) -> Result<(CudaStorage, Shape)> {
    let rows = RowGeometry::new(logits_layout)?;
    let dtype = logits.dtype();
    let shape = LaunchShape::for_vocab(dtype, rows.vocab);
    let launch = kernel_abi::forward_with_grad(&rows, dtype, &options(cfg), unit, true, shape)?;
    let dev = logits.device().clone();
    row_stats(&dev, Access::Write(logits, 0), None, dtype, &rows, launch, labels, labels_layout, cfg)
}

/// As [`forward_with_grad`], with the gradient written into a fresh contiguous
/// buffer shaped like the logits, which are only read. Returns the statistics
/// and the gradient.
pub(crate) fn forward_with_grad_out(
    logits: &CudaStorage,
    logits_layout: &Layout,
    labels: &CudaStorage,
    labels_layout: &Layout,
    cfg: &OpConfig,
    unit: &UnitFactors,
) -> Result<(CudaStorage, CudaStorage)> {
    let rows = RowGeometry::new(logits_layout)?;
    let dtype = logits.dtype();
    let grad_shape = logits_layout.shape();
    let dev = logits.device().clone();
    let launch = kernel_abi::forward_with_grad(
        &rows,
        dtype,
        &options(cfg),
        unit,
        false,
        LaunchShape::for_vocab(dtype, rows.vocab),
    )?;
    let mut grad = match launch {
        // SAFETY: the kernel writes every element of every row (zeros on ignored rows).
        Some(_) => unsafe { dev.alloc_uninit(grad_shape, dtype)? },
        None => dev.zeros_impl(grad_shape, dtype)?,
    };
    let grad_access = Some(Access::Write(&mut grad, 0));
    let (stats, _) =
        row_stats(&dev, Access::Read(logits, 0), grad_access, dtype, &rows, launch, labels, labels_layout, cfg)?;
    Ok((stats, grad))
}

/// Runs a forward `launch` over `logits` (read, or rewritten by the forward
/// with gradient in place), writing `grad` when the launch has one, and
/// returns the statistics; zeros without a launch.
#[allow(clippy::too_many_arguments)]
fn row_stats(
    dev: &CudaDevice,
    logits: Access<'_>,
    grad: Option<Access<'_>>,
    dtype: DType,
    rows: &RowGeometry,
    launch: Option<KernelLaunch>,
    labels: &CudaStorage,
    labels_layout: &Layout,
    cfg: &OpConfig,
) -> Result<(CudaStorage, Shape)> {
    let stats_shape = Shape::from((rows.rows, STATS));
    let acc = compute_dtype(dtype);
    let Some(launch) = launch else {
        return Ok((dev.zeros_impl(&stats_shape, acc)?, stats_shape));
    };
    // SAFETY: the forward writes all four statistics of every row.
    let mut stats = unsafe { dev.alloc_uninit(&stats_shape, acc)? };
    // The flag the kernel lowers to the first bad row; not read back (no sync)
    // when the caller checked the labels on the host already.
    let mut first_bad_row = if cfg.labels_checked { dev.alloc_zeros::<u64>(1)? } else { dev.clone_htod(&[u64::MAX])? };
    let weights = SumWeights::lock(cfg);
    let labels_offset = internal_offset(labels, labels_layout, rows.rows, "labels")?;
    let bindings = Bindings {
        logits: Some(logits),
        labels: Some(Access::Read(labels, labels_offset)),
        sum_weights: weights.on(dev, rows.vocab)?,
        stats: Some(Access::Write(&mut stats, 0)),
        first_bad_row: Some(Access::Flag(&mut first_bad_row)),
        grad,
        ..Bindings::default()
    };
    run(dev, &launch, bindings)?;
    if cfg.labels_checked {
        return Ok((stats, stats_shape));
    }
    let row = dev.clone_dtoh(&first_bad_row)?[0];
    if row != u64::MAX {
        let row = row as usize;
        let label =
            dev.clone_dtoh(&labels.as_cuda_slice::<i64>()?.slice(labels_offset + row..labels_offset + row + 1))?[0];
        return Err(crate::config::bad_label(row, label, rows.vocab, cfg.ignore_index));
    }
    Ok((stats, stats_shape))
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
    let rows = RowGeometry::new(logits_layout)?;
    let dtype = logits.dtype();
    let shape = logits_layout.shape().clone();
    let dev = logits.device();
    let launch = kernel_abi::backward(&rows, dtype, &options(cfg), false, LaunchShape::for_vocab(dtype, rows.vocab))?;
    let Some(launch) = launch else { return Ok((dev.zeros_impl(&shape, dtype)?, shape)) };
    // SAFETY: the backward writes every element of every row (zeros on ignored rows).
    let mut grad = unsafe { dev.alloc_uninit(&shape, dtype)? };
    let weights = SumWeights::lock(cfg);
    let bindings = Bindings {
        logits: Some(Access::Read(logits, 0)),
        labels: Some(Access::Read(labels, internal_offset(labels, labels_layout, rows.rows, "labels")?)),
        sum_weights: weights.on(dev, rows.vocab)?,
        factors: Some(Access::Read(factors, internal_offset(factors, factors_layout, 5 * rows.rows, "factors")?)),
        grad: Some(Access::Write(&mut grad, 0)),
        ..Bindings::default()
    };
    run(dev, &launch, bindings)?;
    Ok((grad, shape))
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
    let rows = RowGeometry::new(logits_layout)?;
    let dtype = logits.dtype();
    let launch = kernel_abi::backward(&rows, dtype, &options(cfg), true, LaunchShape::for_vocab(dtype, rows.vocab))?;
    let Some(launch) = launch else { return Ok(()) };
    let dev = logits.device().clone();
    let weights = SumWeights::lock(cfg);
    let bindings = Bindings {
        labels: Some(Access::Read(labels, internal_offset(labels, labels_layout, rows.rows, "labels")?)),
        sum_weights: weights.on(&dev, rows.vocab)?,
        factors: Some(Access::Read(factors, internal_offset(factors, factors_layout, 5 * rows.rows, "factors")?)),
        logits: Some(Access::Write(logits, 0)),
        ..Bindings::default()
    };
    run(&dev, &launch, bindings)
}

/// The caller's labels (any label dtype, any strides, `[N]` or `[B, S]`) as
/// `[N]` contiguous i64, with the tokens whose `mask` element is 0 set to
/// `ignore_index`: one `ce_labels_*` launch, since candle's CUDA kernels
/// cannot cast i16 or i32.
pub(crate) fn labels(
    labels: &CudaStorage,
    labels_layout: &Layout,
    mask: Option<(&CudaStorage, &Layout)>,
    ignore_index: i64,
) -> Result<(CudaStorage, Shape)> {
    let dev = labels.device();
    let mask_geometry = mask.map(|(m, layout)| Ok::<_, candle::Error>((layout, MaskElements::of(m.dtype())?)));
    let geometry = LabelGeometry::new(labels_layout, mask_geometry.transpose()?)?;
    let shape = Shape::from(geometry.rows);
    let Some(launch) = kernel_abi::labels(&geometry, labels.dtype(), ignore_index)? else {
        return Ok((dev.zeros_impl(&shape, DType::I64)?, shape));
    };
    // SAFETY: the conversion writes every one of the N labels.
    let mut out = unsafe { dev.alloc_uninit(&shape, DType::I64)? };
    let bindings = Bindings {
        caller_labels: Some(Access::Read(labels, 0)),
        mask: mask.map(|(m, _)| Access::Read(m, 0)),
        labels: Some(Access::Write(&mut out, 0)),
        ..Bindings::default()
    };
    run(dev, &launch, bindings)?;
    Ok((out, shape))
}

/// The class weights of [`OpConfig::sum_weights`], read-locked for a launch
/// (the weights are a tensor of their own: candle hands a custom op only its
/// inputs' storage).
struct SumWeights<'a>(Option<(StorageRef<'a>, &'a Layout)>);

impl<'a> SumWeights<'a> {
    fn lock(cfg: &'a OpConfig) -> Self {
        Self(cfg.sum_weights.as_ref().map(|w| w.storage_and_layout()))
    }

    /// Their binding for a launch over rows of `vocab` logits on `dev`
    /// (`kernel_abi` checks their shape and dtype when it picks the entry).
    fn on(&self, dev: &CudaDevice, vocab: usize) -> Result<Option<Access<'_>>> {
        let Some((storage, layout)) = &self.0 else { return Ok(None) };
        match &**storage {
            Storage::Cuda(storage) if storage.device().same_device(dev) => {
                Ok(Some(Access::Read(storage, internal_offset(storage, layout, vocab, "class weights")?)))
            }
            _ => bail!("chunked cross-entropy (cuda): the class weights must be on the logits' device"),
        }
    }
}

/// The first element of an internal operand (labels, factors, class weights):
/// contiguous, with `len` elements.
fn internal_offset(storage: &CudaStorage, layout: &Layout, len: usize, what: &str) -> Result<usize> {
    match layout.contiguous_offsets() {
        Some((start, end)) if end - start == len && end <= storage_len(storage)? => Ok(start),
        _ => bail!("chunked cross-entropy (cuda): internal {what} must be {len} contiguous elements, got {layout:?}"),
    }
}

/// A buffer bound to an operand of one launch, from some element on.
enum Access<'a> {
    /// Read by the launch.
    Read(&'a CudaStorage, usize),
    /// Written (and maybe read) by the launch.
    Write(&'a mut CudaStorage, usize),
    /// The bad-row flag (one u64, lowered atomically).
    Flag(&'a mut CudaSlice<u64>),
}

/// A device pointer for one launch, with the guard that ordered the launch
/// after the buffer's pending work and records the launch against the buffer
/// when it is dropped, after the launch.
struct Bound<'a> {
    pointer: CUdeviceptr,
    _guard: SyncOnDrop<'a>,
}

/// Each storage dtype's typed slice, for the one place that binds buffers.
macro_rules! each_slice {
    ($slice:expr, $s:ident => $bind:expr) => {
        match $slice {
            CudaStorageSlice::U8($s) => $bind,
            CudaStorageSlice::U32($s) => $bind,
            CudaStorageSlice::I16($s) => $bind,
            CudaStorageSlice::I32($s) => $bind,
            CudaStorageSlice::I64($s) => $bind,
            CudaStorageSlice::BF16($s) => $bind,
            CudaStorageSlice::F16($s) => $bind,
            CudaStorageSlice::F32($s) => $bind,
            CudaStorageSlice::F64($s) => $bind,
            CudaStorageSlice::F8E4M3($s) => $bind,
            _ => bail!("chunked cross-entropy (cuda): no kernel takes packed F6, F4 or F8E8M0 storage"),
        }
    };
}

/// The pointer to element `offset` of a buffer, read or written.
fn bind<'a>(access: Access<'a>, stream: &'a CudaStream) -> Result<Bound<'a>> {
    fn read<'a, T>(slice: &'a CudaSlice<T>, offset: usize, stream: &'a CudaStream) -> Bound<'a> {
        let (pointer, guard) = slice.device_ptr(stream);
        Bound { pointer: pointer + (offset * std::mem::size_of::<T>()) as CUdeviceptr, _guard: guard }
    }
    fn write<'a, T>(slice: &'a mut CudaSlice<T>, offset: usize, stream: &'a CudaStream) -> Bound<'a> {
        let (pointer, guard) = slice.device_ptr_mut(stream);
        Bound { pointer: pointer + (offset * std::mem::size_of::<T>()) as CUdeviceptr, _guard: guard }
    }
    Ok(match access {
        Access::Read(storage, offset) => each_slice!(&storage.slice, s => read(s, offset, stream)),
        Access::Write(storage, offset) => each_slice!(&mut storage.slice, s => write(s, offset, stream)),
        Access::Flag(flag) => write(flag, 0, stream),
    })
}

/// Elements in a storage.
fn storage_len(storage: &CudaStorage) -> Result<usize> {
    Ok(each_slice!(&storage.slice, s => s.len()))
}

/// The device buffers a launch binds to its [`Operand`]s.
#[derive(Default)]
struct Bindings<'a> {
    logits: Option<Access<'a>>,
    labels: Option<Access<'a>>,
    caller_labels: Option<Access<'a>>,
    mask: Option<Access<'a>>,
    sum_weights: Option<Access<'a>>,
    stats: Option<Access<'a>>,
    first_bad_row: Option<Access<'a>>,
    factors: Option<Access<'a>>,
    grad: Option<Access<'a>>,
}

impl<'a> Bindings<'a> {
    /// The buffer bound to `operand`, once.
    fn take(&mut self, operand: Operand) -> Result<Access<'a>> {
        let slot = match operand {
            Operand::Logits => &mut self.logits,
            Operand::Labels => &mut self.labels,
            Operand::CallerLabels => &mut self.caller_labels,
            Operand::Mask => &mut self.mask,
            Operand::SumWeights => &mut self.sum_weights,
            Operand::Stats => &mut self.stats,
            Operand::FirstBadRow => &mut self.first_bad_row,
            Operand::Factors => &mut self.factors,
            Operand::Grad => &mut self.grad,
        };
        match slot.take() {
            Some(access) => Ok(access),
            None => bail!("chunked cross-entropy (cuda): {operand:?} is not bound"),
        }
    }
}

/// One kernel argument's value, kept alive until the launch reads it.
enum Value {
    Pointer(CUdeviceptr),
    I64(i64),
    I32(i32),
    F32(f32),
    F64(f64),
}

/// Binds every operand of `launch` and launches it on the device's stream.
fn run(dev: &CudaDevice, launch: &KernelLaunch, mut bindings: Bindings<'_>) -> Result<()> {
    let func = dev.get_or_load_custom_func(launch.entry, MODULE, PTX)?;
    let stream = dev.cuda_stream();
    let mut bound = Vec::new();
    let mut values = Vec::with_capacity(launch.args.len());
    for arg in &launch.args {
        values.push(match *arg {
            KernelArg::Operand(operand) => {
                let buffer = bind(bindings.take(operand)?, &stream)?;
                let pointer = buffer.pointer;
                bound.push(buffer);
                Value::Pointer(pointer)
            }
            KernelArg::Null => Value::Pointer(0),
            KernelArg::I64(v) => Value::I64(v),
            KernelArg::I32(v) => Value::I32(v),
            KernelArg::F32(v) => Value::F32(v),
            KernelArg::F64(v) => Value::F64(v),
        });
    }
    let mut builder = func.builder();
    for value in &values {
        match value {
            Value::Pointer(v) => builder.arg(v),
            Value::I64(v) => builder.arg(v),
            Value::I32(v) => builder.arg(v),
            Value::F32(v) => builder.arg(v),
            Value::F64(v) => builder.arg(v),
        };
    }
    let config =
        LaunchConfig { grid_dim: (launch.blocks, 1, 1), block_dim: (launch.threads, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: `kernel_abi` lists the arguments in the entry's parameter order with
    // its parameter types (tests/kernels_on_cpu.rs checks both against the .cu) and
    // builds no launch for an empty problem; every row offset lies inside the
    // logits' storage (from its layout), and every label and mask offset inside
    // theirs; the internal labels hold N values, the class weights V, factors 5 N
    // (`internal_offset` checked them), stats 4 N and grad N V (allocated so);
    // null is passed only for an operand the entry does not read; candle refused
    // layouts with internal overlap, so in-place rows are disjoint. Each pointer's
    // guard in `bound` outlives the launch.
    unsafe { builder.launch(config) }.w()?;
    drop(bound);
    Ok(())
}

fn options(cfg: &OpConfig) -> KernelOptions {
    KernelOptions {
        ignore_index: cfg.ignore_index,
        softcap: cfg.terms.softcap,
        logit_sum: cfg.terms.logit_sum,
        sum_weights: cfg.sum_weights.clone(),
    }
}

#[cfg(test)]
mod tests {
    use crate::kernel_abi::ENTRIES;
    use std::collections::BTreeSet;

    /// The launcher finds each kernel by its name in the PTX: a name mangled
    /// (an entry not `extern "C"`, see `CE_ENTRY` in the `.cu`) or missing
    /// would fail only at its first launch on a GPU. Runs without one.
    #[test]
    fn the_ptx_names_every_entry_and_no_other() {
        let in_ptx: BTreeSet<&str> = super::PTX
            .lines()
            .filter_map(|line| line.strip_prefix(".visible .entry "))
            .filter_map(|rest| rest.split(['(', ' ']).next())
            .collect();
        assert_eq!(in_ptx, ENTRIES.into_iter().collect::<BTreeSet<_>>());
    }
}
