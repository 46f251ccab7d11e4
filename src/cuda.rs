//! Launchers for the fused kernels in `cuda/cross_entropy.cu` (feature
//! `cuda`). The PTX is compiled by `build.rs`, embedded here, and loaded once
//! per device by candle's module cache (the stand-in for `torch.compile`).
//! What the kernels compute is written in `op.rs`; how they are launched
//! (entry, grid, block, arguments) in `kernel_abi.rs`, which this file only
//! binds to device memory.

use crate::config::{OpConfig, UnitFactors, STATS};
use crate::kernel_abi::{self, KernelArg, KernelLaunch, KernelOptions, LaunchShape, Operand, RowGeometry};
use candle::backend::{BackendDevice, BackendStorage};
use candle::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, StorageRef};
use half::{bf16, f16};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));
/// candle caches modules by name per device: two versions of this crate in one
/// binary must not share one.
const MODULE: &str = concat!("candle_chunked_ce-", env!("CARGO_PKG_VERSION"));
/// The value of a null device pointer argument ([`KernelArg::Null`]); a static,
/// since the launch reads each argument through its address.
static NULL_POINTER: u64 = 0;

/// An internal operand as candle hands it over: its storage and layout.
type Stored<'a> = (&'a CudaStorage, &'a Layout);

/// Per-row statistics `[N, 4] = (ce, lse, logit_sum, correct)` (see `op.rs`),
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
    row_stats(logits, logits_layout, labels, labels_layout, cfg, None)
}

/// As [`forward`], and the kernel also rewrites the logits with the gradient
/// of a scalar loss whose value receives 1, from `unit` (two passes over the
/// logits; see `op::row_stats_and_unit_grad`).
pub(crate) fn forward_with_grad(
    logits: &CudaStorage,
    logits_layout: &Layout,
    labels: &CudaStorage,
    labels_layout: &Layout,
    cfg: &OpConfig,
    unit: &UnitFactors,
) -> Result<(CudaStorage, Shape)> {
    row_stats(logits, logits_layout, labels, labels_layout, cfg, Some(unit))
}

fn row_stats(
    logits: &CudaStorage,
    logits_layout: &Layout,
    labels: &CudaStorage,
    labels_layout: &Layout,
    cfg: &OpConfig,
    unit: Option<&UnitFactors>,
) -> Result<(CudaStorage, Shape)> {
    let rows = RowGeometry::new(logits_layout)?;
    let dtype = logits.dtype();
    let shape = LaunchShape::for_vocab(dtype, rows.vocab);
    let launch = match unit {
        None => kernel_abi::forward(&rows, dtype, &options(cfg), shape)?,
        Some(unit) => kernel_abi::forward_with_grad(&rows, dtype, &options(cfg), unit, shape)?,
    };
    let dev = logits.device();
    let labels = contiguous::<i64>(labels, labels_layout)?;
    let weights = SumWeights::lock(cfg);
    let sum_weights = weights.on(dev)?;
    // The flag the kernel lowers to the first bad row; not read back (no sync)
    // when the caller checked the labels on the host already.
    let first_bad_row = if cfg.labels_checked { dev.alloc_zeros::<u64>(1)? } else { dev.clone_htod(&[u64::MAX])? };
    let n = rows.rows;
    let stats = match dtype {
        DType::F32 => forward_typed::<f32, f32>(dev, &launch, logits, &labels, sum_weights, &first_bad_row, n)?,
        DType::BF16 => forward_typed::<bf16, f32>(dev, &launch, logits, &labels, sum_weights, &first_bad_row, n)?,
        DType::F16 => forward_typed::<f16, f32>(dev, &launch, logits, &labels, sum_weights, &first_bad_row, n)?,
        DType::F64 => forward_typed::<f64, f64>(dev, &launch, logits, &labels, sum_weights, &first_bad_row, n)?,
        other => bail!("chunked cross-entropy (cuda): logits must be a float dtype, got {other:?}"),
    };
    if cfg.labels_checked {
        return Ok((stats, Shape::from((rows.rows, STATS))));
    }
    let row = dev.clone_dtoh(&first_bad_row)?[0];
    if row != u64::MAX {
        let row = row as usize;
        let label = dev.clone_dtoh(&labels.slice(row..row + 1))?[0];
        return Err(crate::config::bad_label(row, label, rows.vocab, cfg.ignore_index));
    }
    Ok((stats, Shape::from((rows.rows, STATS))))
}

fn forward_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    launch: &KernelLaunch,
    logits: &CudaStorage,
    labels: &CudaView<'_, i64>,
    sum_weights: Option<Stored<'_>>,
    first_bad_row: &CudaSlice<u64>,
    rows: usize,
) -> Result<CudaStorage> {
    // SAFETY: the forward writes all four statistics of every row.
    let stats = unsafe { dev.alloc::<A>(STATS * rows)? };
    if rows > 0 {
        let sum_weights = sum_weights.map(contiguous_operand::<A>).transpose()?;
        let logits = LogitsArg::Read(logits.as_cuda_slice::<T>()?);
        let operands = Operands::new(logits, labels, sum_weights.as_ref());
        run(dev, launch, Operands { stats: Some(&stats), first_bad_row: Some(first_bad_row), ..operands })?;
    }
    Ok(CudaStorage::wrap_cuda_slice(stats, dev.clone()))
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
    let shape = LaunchShape::for_vocab(dtype, rows.vocab);
    let launch = kernel_abi::backward(&rows, dtype, &options(cfg), false, shape)?;
    let dev = logits.device();
    let labels = contiguous::<i64>(labels, labels_layout)?;
    let weights = SumWeights::lock(cfg);
    let sum_weights = weights.on(dev)?;
    let (factors, len) = ((factors, factors_layout), rows.rows * rows.vocab);
    let grad = match dtype {
        DType::F32 => backward_typed::<f32, f32>(dev, &launch, logits, &labels, sum_weights, factors, len)?,
        DType::BF16 => backward_typed::<bf16, f32>(dev, &launch, logits, &labels, sum_weights, factors, len)?,
        DType::F16 => backward_typed::<f16, f32>(dev, &launch, logits, &labels, sum_weights, factors, len)?,
        DType::F64 => backward_typed::<f64, f64>(dev, &launch, logits, &labels, sum_weights, factors, len)?,
        other => bail!("chunked cross-entropy (cuda): logits must be a float dtype, got {other:?}"),
    };
    Ok((grad, logits_layout.shape().clone()))
}

fn backward_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    launch: &KernelLaunch,
    logits: &CudaStorage,
    labels: &CudaView<'_, i64>,
    sum_weights: Option<Stored<'_>>,
    factors: Stored<'_>,
    len: usize,
) -> Result<CudaStorage> {
    // SAFETY: the backward writes every element of every row (zeros on ignored rows).
    let grad = unsafe { dev.alloc::<T>(len)? };
    if len > 0 {
        let factors = contiguous_operand::<A>(factors)?;
        let sum_weights = sum_weights.map(contiguous_operand::<A>).transpose()?;
        let logits = LogitsArg::Read(logits.as_cuda_slice::<T>()?);
        let operands = Operands::new(logits, labels, sum_weights.as_ref());
        run(dev, launch, Operands { factors: Some(&factors), grad: Some(&grad), ..operands })?;
    }
    Ok(CudaStorage::wrap_cuda_slice(grad, dev.clone()))
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
    if rows.rows * rows.vocab == 0 {
        return Ok(());
    }
    let dtype = logits.dtype();
    let shape = LaunchShape::for_vocab(dtype, rows.vocab);
    let launch = kernel_abi::backward(&rows, dtype, &options(cfg), true, shape)?;
    let dev = logits.device().clone();
    let labels = contiguous::<i64>(labels, labels_layout)?;
    let weights = SumWeights::lock(cfg);
    let sum_weights = weights.on(&dev)?;
    let factors = (factors, factors_layout);
    match dtype {
        DType::F32 => in_place_typed::<f32, f32>(&dev, &launch, logits, &labels, sum_weights, factors),
        DType::BF16 => in_place_typed::<bf16, f32>(&dev, &launch, logits, &labels, sum_weights, factors),
        DType::F16 => in_place_typed::<f16, f32>(&dev, &launch, logits, &labels, sum_weights, factors),
        DType::F64 => in_place_typed::<f64, f64>(&dev, &launch, logits, &labels, sum_weights, factors),
        other => bail!("chunked cross-entropy (cuda): logits must be a float dtype, got {other:?}"),
    }
}

fn in_place_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    launch: &KernelLaunch,
    logits: &mut CudaStorage,
    labels: &CudaView<'_, i64>,
    sum_weights: Option<Stored<'_>>,
    factors: Stored<'_>,
) -> Result<()> {
    let factors = contiguous_operand::<A>(factors)?;
    let sum_weights = sum_weights.map(contiguous_operand::<A>).transpose()?;
    let logits = LogitsArg::Write(logits.as_cuda_slice_mut::<T>()?);
    run(dev, launch, Operands { factors: Some(&factors), ..Operands::new(logits, labels, sum_weights.as_ref()) })
}

/// The class weights of [`OpConfig::sum_weights`], read-locked for a launch
/// (the weights are a tensor of their own: candle hands a custom op only its
/// inputs' storage).
struct SumWeights<'a>(Option<(StorageRef<'a>, &'a Layout)>);

impl<'a> SumWeights<'a> {
    fn lock(cfg: &'a OpConfig) -> Self {
        Self(cfg.sum_weights.as_ref().map(|w| w.storage_and_layout()))
    }

    /// Their storage and layout, which must be on `dev` (`kernel_abi` checks
    /// their shape and dtype).
    fn on(&self, dev: &CudaDevice) -> Result<Option<Stored<'_>>> {
        let Some((storage, layout)) = &self.0 else { return Ok(None) };
        match &**storage {
            Storage::Cuda(storage) if storage.device().same_device(dev) => Ok(Some((storage, *layout))),
            _ => bail!("chunked cross-entropy (cuda): the class weights must be on the logits' device"),
        }
    }
}

/// The logits as the kernel sees them: read, or rewritten in place. The
/// forward with gradient (`ce_fwd_grad_*`) also rewrites them through a shared
/// borrow: candle hands a custom op its inputs shared, and that op is only run
/// on a private temporary (see `op::row_stats_and_unit_grad`).
enum LogitsArg<'a, T> {
    Read(&'a CudaSlice<T>),
    Write(&'a mut CudaSlice<T>),
}

/// The device buffers a launch binds to its [`Operand`]s.
struct Operands<'a, T, A> {
    logits: LogitsArg<'a, T>,
    labels: &'a CudaView<'a, i64>,
    sum_weights: Option<&'a CudaView<'a, A>>,
    stats: Option<&'a CudaSlice<A>>,
    first_bad_row: Option<&'a CudaSlice<u64>>,
    factors: Option<&'a CudaView<'a, A>>,
    grad: Option<&'a CudaSlice<T>>,
}

impl<'a, T, A> Operands<'a, T, A> {
    /// The inputs every entry takes: logits, labels, and the class weights
    /// where the loss has them; the other operands are bound by the caller.
    fn new(logits: LogitsArg<'a, T>, labels: &'a CudaView<'a, i64>, sum_weights: Option<&'a CudaView<'a, A>>) -> Self {
        Self { logits, labels, sum_weights, stats: None, first_bad_row: None, factors: None, grad: None }
    }
}

/// Pushes the arguments of `launch` in order, binding each operand, and launches.
fn run<T, A: DeviceRepr>(dev: &CudaDevice, launch: &KernelLaunch, operands: Operands<'_, T, A>) -> Result<()> {
    let func = dev.get_or_load_custom_func(launch.entry, MODULE, PTX)?;
    let mut builder = func.builder();
    let Operands { logits, labels, sum_weights, stats, first_bad_row, factors, grad } = operands;
    // Bound once: the in-place logits are a unique borrow.
    let mut logits = Some(logits);
    let missing = |op: Operand| candle::Error::Msg(format!("chunked cross-entropy (cuda): {op:?} is not bound"));
    for arg in &launch.args {
        match arg {
            KernelArg::Operand(op @ Operand::Logits) => match logits.take().ok_or_else(|| missing(*op))? {
                LogitsArg::Read(slice) => builder.arg(slice),
                LogitsArg::Write(slice) => builder.arg(slice),
            },
            KernelArg::Operand(Operand::Labels) => builder.arg(labels),
            KernelArg::Operand(op @ Operand::SumWeights) => builder.arg(sum_weights.ok_or_else(|| missing(*op))?),
            KernelArg::Operand(op @ Operand::Stats) => builder.arg(stats.ok_or_else(|| missing(*op))?),
            KernelArg::Operand(op @ Operand::FirstBadRow) => builder.arg(first_bad_row.ok_or_else(|| missing(*op))?),
            KernelArg::Operand(op @ Operand::Factors) => builder.arg(factors.ok_or_else(|| missing(*op))?),
            KernelArg::Operand(op @ Operand::Grad) => builder.arg(grad.ok_or_else(|| missing(*op))?),
            KernelArg::I64(v) => builder.arg(v),
            KernelArg::I32(v) => builder.arg(v),
            KernelArg::F32(v) => builder.arg(v),
            KernelArg::F64(v) => builder.arg(v),
            KernelArg::Null => builder.arg(&NULL_POINTER),
        };
    }
    let config =
        LaunchConfig { grid_dim: (launch.blocks, 1, 1), block_dim: (launch.threads, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: `kernel_abi` lists the arguments in the entry's parameter order with
    // its parameter types (tests/kernels_on_cpu.rs checks both against the .cu);
    // every row offset lies inside the logits' storage (from its layout), the
    // labels hold N values, the class weights V (`kernel_abi` checked them),
    // stats 4 N, factors 5 N and grad N V; null is passed only for an operand
    // the entry does not read; candle refused layouts with internal overlap, so
    // in-place rows are disjoint.
    unsafe { builder.launch(config) }.w()?;
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

/// The contiguous elements of an internal operand (labels, factors, class weights).
fn contiguous<'a, T: CudaDType>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("chunked cross-entropy (cuda): internal operands must be contiguous")
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// [`contiguous`] of a [`Stored`] operand.
fn contiguous_operand<'a, T: CudaDType>((storage, layout): Stored<'a>) -> Result<CudaView<'a, T>> {
    contiguous(storage, layout)
}
