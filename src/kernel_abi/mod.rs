//! The CUDA kernels' launches, described once: which entry of
//! `cuda/cross_entropy.cu`, which grid and block, and every argument in the
//! kernel's parameter order. `src/cuda.rs` turns a [`KernelLaunch`] into a
//! cudarc launch; `tests/kernels_on_cpu.rs` turns the same description into a
//! launch of the same `.cu` source compiled for the CPU (HIP-CPU), so that the
//! argument marshalling is tested without a GPU.
//!
//! An empty problem (no rows, or no classes) has no launch: each function
//! returns `None` for it, and a [`KernelLaunch`] cannot be built elsewhere, so
//! no launch with an empty grid reaches the driver (which refuses it with
//! `CUDA_ERROR_INVALID_VALUE`).
//!
//! Not a stable API: it is public only for those tests.
//!
//! Here the entries, operands, arguments and launches; in `shape.rs` the
//! block shapes; in `geometry.rs` where rows, labels and mask elements live.

mod geometry;
mod shape;
#[cfg(test)]
mod tests;

pub use crate::config::UnitFactors;
use candle::{bail, DType, Result, Tensor};
pub use geometry::{LabelGeometry, MaskElements, RowGeometry};
pub use shape::{max_threads, LaunchShape, MAX_BLOCKS, MAX_ROW_BLOCK, MAX_ROW_SPLITS};
#[cfg(feature = "testing")]
pub use shape::{set_row_block_threads, set_row_splits};

/// Every kernel entry of `cuda/cross_entropy.cu`: `ce_{kind}_{dtype}`, and
/// `ce_{kind}_weighted_{dtype}` for a class-weighted logit sum (see
/// [`KernelOptions::sum_weights`]); `ce_labels_{dtype}` for each label dtype.
pub const ENTRIES: [&str; 37] = [
    "ce_fwd_f32",
    "ce_fwd_bf16",
    "ce_fwd_f16",
    "ce_fwd_f64",
    "ce_fwd_grad_f32",
    "ce_fwd_grad_bf16",
    "ce_fwd_grad_f16",
    "ce_fwd_grad_f64",
    "ce_fwd_grad_out_f32",
    "ce_fwd_grad_out_bf16",
    "ce_fwd_grad_out_f16",
    "ce_fwd_grad_out_f64",
    "ce_bwd_f32",
    "ce_bwd_bf16",
    "ce_bwd_f16",
    "ce_bwd_f64",
    "ce_bwd_inplace_f32",
    "ce_bwd_inplace_bf16",
    "ce_bwd_inplace_f16",
    "ce_bwd_inplace_f64",
    "ce_fwd_weighted_f32",
    "ce_fwd_weighted_bf16",
    "ce_fwd_weighted_f16",
    "ce_fwd_weighted_f64",
    "ce_bwd_weighted_f32",
    "ce_bwd_weighted_bf16",
    "ce_bwd_weighted_f16",
    "ce_bwd_weighted_f64",
    "ce_bwd_inplace_weighted_f32",
    "ce_bwd_inplace_weighted_bf16",
    "ce_bwd_inplace_weighted_f16",
    "ce_bwd_inplace_weighted_f64",
    "ce_labels_u8",
    "ce_labels_u32",
    "ce_labels_i16",
    "ce_labels_i32",
    "ce_labels_i64",
];

/// A buffer a kernel reads or writes, bound to device memory by the launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// The logits' whole storage (`[..]` of the dtype; rows are found from the
    /// start offset and strides that follow in the arguments).
    Logits,
    /// `[N]` i64 labels, contiguous: read by the loss's entries, written by
    /// [`labels`]'s.
    Labels,
    /// The caller's labels' whole storage, of a label dtype (see [`labels`]).
    CallerLabels,
    /// The caller's mask's whole storage, read as raw bytes (see [`labels`]).
    Mask,
    /// `[V]` class weights of the logit sum, contiguous, in the accumulator
    /// type: [`KernelOptions::sum_weights`]. Only the `_weighted_` entries
    /// take it; the others get [`KernelArg::Null`] in its place.
    SumWeights,
    /// `[N, 4]` row statistics written by the forward, in the accumulator type
    /// (f32, or f64 for f64 logits).
    Stats,
    /// One u64 that the host sets to `u64::MAX`; the forward lowers it to the
    /// first row with a label outside `[0, V)` that is not `ignore_index`.
    FirstBadRow,
    /// `[N, 5]` backward factors `(g_ce, g_lse, g_sum, lse, ce)`, contiguous,
    /// in the accumulator type.
    Factors,
    /// `[N, V]` gradient, contiguous, in the logits' dtype.
    Grad,
}

/// One kernel argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    /// A device pointer.
    Operand(Operand),
    /// A null device pointer: an operand the entry does not read.
    Null,
    /// `int64_t`.
    I64(i64),
    /// `int`.
    I32(i32),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}
/// The loss settings the kernels take.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// Label value of rows without a target.
    pub ignore_index: i64,
    /// Logit soft-cap, `None` for none.
    pub softcap: Option<f64>,
    /// Whether the forward sums the row's logits (label smoothing needs it).
    pub logit_sum: bool,
    /// The class weights `c` of the logit sum, `Σ_j c_j x'_j`, which also
    /// weigh the gradients' `g_sum` terms (see `op/mod.rs`); `None` for `c_j = 1`.
    /// `[V]`, contiguous, in the accumulator type (f32; f64 for f64 logits),
    /// on the logits' device: the CUDA launcher binds it as
    /// [`Operand::SumWeights`], the CPU oracle ([`crate::cpu_row_stats`],
    /// [`crate::cpu_logits_grad`]) reads it. With them, the backward and the forward
    /// with gradient run a `_weighted_` entry, and so does the forward when it
    /// sums the logits (without, as on the CPU, the weights go unread).
    pub sum_weights: Option<Tensor>,
}

impl KernelOptions {
    /// Whether a launch over rows of `vocab` logits of `dtype` reads the class
    /// weights (`used`: the forward reads them only with the logit sum), once
    /// they are checked against those rows.
    pub(crate) fn weighted(&self, vocab: usize, dtype: DType, used: bool) -> Result<bool> {
        let Some(weights) = &self.sum_weights else { return Ok(false) };
        let acc = accumulator_dtype(dtype);
        if weights.dims() != [vocab] || weights.dtype() != acc || !weights.is_contiguous() {
            bail!(
                "chunked cross-entropy (cuda): class weights must be [{vocab}] {acc:?}, contiguous, got {:?} {:?}",
                weights.shape(),
                weights.dtype()
            )
        }
        Ok(used)
    }
}

/// Where element `r` of a `[N]` or `[B, S]` view lives in its storage:
/// `start + (r / inner) * stride_outer + (r % inner) * stride_inner`, in
/// One kernel launch: entry, grid, block and arguments in parameter order.
/// Only this module builds one (`non_exhaustive` keeps struct literals
/// elsewhere out), never for an empty problem: `blocks` and `threads` are at
/// least 1.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct KernelLaunch {
    /// The entry's name in `cuda/cross_entropy.cu`.
    pub entry: &'static str,
    /// Blocks (x only).
    pub blocks: u32,
    /// Threads per block (x only).
    pub threads: u32,
    /// Arguments in the kernel's parameter order.
    pub args: Vec<KernelArg>,
}

/// The forward: writes [`Operand::Stats`] and lowers [`Operand::FirstBadRow`].
/// `None` for an empty problem.
pub fn forward(
    rows: &RowGeometry,
    dtype: DType,
    options: &KernelOptions,
    shape: LaunchShape,
) -> Result<Option<KernelLaunch>> {
    use KernelArg::{Operand as Op, I32};
    let weighted = options.weighted(rows.vocab, dtype, options.logit_sum)?;
    let entry = entry("fwd", weighted, dtype)?;
    let mut args = vec![Op(Operand::Logits), Op(Operand::Labels), sum_weights(weighted)];
    args.extend([Op(Operand::Stats), Op(Operand::FirstBadRow)]);
    args.extend(row_args(rows, dtype, options));
    args.push(I32(i32::from(options.logit_sum)));
    row_launch(entry, rows, dtype, shape, args, RowSharing::WithinBlock)
}

/// The forward that also writes the gradient of a scalar loss whose value
/// receives 1, over [`Operand::Logits`] (`in_place`) or into [`Operand::Grad`]:
/// `unit` gives every valid row's factors (see [`UnitFactors`]). Two passes
/// over the logits instead of the three of [`forward`] and [`backward`].
/// Without class weights only: a weighted loss runs [`forward`], then
/// [`backward`]. `None` for an empty problem.
pub fn forward_with_grad(
    rows: &RowGeometry,
    dtype: DType,
    options: &KernelOptions,
    unit: &UnitFactors,
    in_place: bool,
    shape: LaunchShape,
) -> Result<Option<KernelLaunch>> {
    use KernelArg::{Operand as Op, I32};
    if options.sum_weights.is_some() {
        bail!("chunked cross-entropy (cuda): the forward with gradient takes no class weights")
    }
    let mut args = vec![Op(Operand::Logits), Op(Operand::Labels)];
    let entry = if in_place {
        entry("fwd_grad", false, dtype)?
    } else {
        args.push(Op(Operand::Grad));
        entry("fwd_grad_out", false, dtype)?
    };
    args.extend([Op(Operand::Stats), Op(Operand::FirstBadRow)]);
    args.extend(row_args(rows, dtype, options));
    args.push(I32(i32::from(options.logit_sum)));
    args.extend([unit.ce, unit.lse, unit.lse_squared, unit.logit_sum].map(|v| accumulator(dtype, v)));
    row_launch(entry, rows, dtype, shape, args, RowSharing::WithinBlock)
}

/// The backward into [`Operand::Grad`] (`in_place == false`), or over
/// [`Operand::Logits`]. `None` for an empty problem.
pub fn backward(
    rows: &RowGeometry,
    dtype: DType,
    options: &KernelOptions,
    in_place: bool,
    shape: LaunchShape,
) -> Result<Option<KernelLaunch>> {
    use KernelArg::Operand as Op;
    let weighted = options.weighted(rows.vocab, dtype, true)?;
    let mut args = vec![Op(Operand::Logits), Op(Operand::Labels), sum_weights(weighted), Op(Operand::Factors)];
    let entry = if in_place {
        entry("bwd_inplace", weighted, dtype)?
    } else {
        args.push(Op(Operand::Grad));
        entry("bwd", weighted, dtype)?
    };
    args.extend(row_args(rows, dtype, options));
    row_launch(entry, rows, dtype, shape, args, RowSharing::AcrossBlocks)
}

/// Threads per block of the labels' conversion (one label per thread).
const LABEL_THREADS: u32 = 256;

/// The conversion of the caller's labels ([`Operand::CallerLabels`], of
/// `dtype`, a label dtype) into [`Operand::Labels`] (`[N]` i64,
/// contiguous), with the tokens whose [`Operand::Mask`] element is 0 set to
/// `ignore_index`. `None` when there are no labels.
pub fn labels(geometry: &LabelGeometry, dtype: DType, ignore_index: i64) -> Result<Option<KernelLaunch>> {
    use KernelArg::{Operand as Op, I32, I64};
    let suffix = match dtype {
        DType::U8 => "u8",
        DType::U32 => "u32",
        DType::I16 => "i16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        other => {
            bail!("chunked cross-entropy: labels must be an integer dtype (u8, u32, i16, i32, i64), got {other:?}")
        }
    };
    let entry = find_entry(&format!("ce_labels_{suffix}"))?;
    let (mask, mask_elements, mask_strided) = match geometry.mask {
        Some((strided, elements)) => (Op(Operand::Mask), elements, strided),
        None => (KernelArg::Null, MaskElements { bytes: 1, float: false }, geometry.labels),
    };
    let mut args = vec![Op(Operand::CallerLabels), mask, Op(Operand::Labels)];
    args.extend([I64(geometry.rows as i64), I64(ignore_index)]);
    args.extend([I32(mask_elements.bytes), I32(i32::from(mask_elements.float))]);
    args.extend(geometry.labels.args());
    args.extend(mask_strided.args());
    if geometry.rows == 0 {
        return Ok(None);
    }
    let blocks = geometry.rows.div_ceil(LABEL_THREADS as usize).min(MAX_BLOCKS as usize) as u32;
    Ok(Some(KernelLaunch { entry, blocks, threads: LABEL_THREADS, args }))
}

/// `rows, vocab, ignore_index, cap` (0 for none, in the accumulator type).
fn row_args(rows: &RowGeometry, dtype: DType, options: &KernelOptions) -> [KernelArg; 4] {
    let cap = accumulator(dtype, options.softcap.unwrap_or(0.0));
    [KernelArg::I64(rows.rows as i64), KernelArg::I32(rows.vocab as i32), KernelArg::I64(options.ignore_index), cap]
}

/// The class weights' argument: [`Operand::SumWeights`] for a weighted
/// entry, else a null pointer.
fn sum_weights(weighted: bool) -> KernelArg {
    if weighted {
        KernelArg::Operand(Operand::SumWeights)
    } else {
        KernelArg::Null
    }
}

/// The accumulator type of `dtype`'s kernels: f64 for f64, else f32.
fn accumulator_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// A value in the accumulator type of `dtype`'s kernels.
fn accumulator(dtype: DType, value: f64) -> KernelArg {
    if dtype == DType::F64 {
        KernelArg::F64(value)
    } else {
        KernelArg::F32(value as f32)
    }
}

/// Whether an entry's rows may be shared by several blocks
/// ([`LaunchShape::row_splits`]): the backward's may, the forward's reduce
/// within one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowSharing {
    WithinBlock,
    AcrossBlocks,
}

/// Appends `rows_per_block` (and the backward's `row_splits`) and the row
/// geometry, and sizes the grid: the launch of a row kernel, or `None` when
/// the rows are empty (the arguments are still checked, so that an empty call
/// fails where a full one would).
fn row_launch(
    entry: &'static str,
    rows: &RowGeometry,
    dtype: DType,
    shape: LaunchShape,
    mut args: Vec<KernelArg>,
    sharing: RowSharing,
) -> Result<Option<KernelLaunch>> {
    shape.check(dtype)?;
    if rows.is_empty() {
        return Ok(None);
    }
    args.push(KernelArg::I32(shape.rows_per_block as i32));
    let splits = match sharing {
        RowSharing::WithinBlock => 1,
        RowSharing::AcrossBlocks => {
            args.push(KernelArg::I32(shape.row_splits as i32));
            shape.row_splits as usize
        }
    };
    args.extend(rows.strided.args());
    // Each block's work item is a row group (one split of a row with row_splits > 1).
    let items = rows.rows.saturating_mul(splits);
    let blocks = items.div_ceil(shape.rows_per_block as usize).min(shape.max_blocks as usize) as u32;
    Ok(Some(KernelLaunch { entry, blocks, threads: shape.threads, args }))
}

/// `ce_{kind}_{dtype}`, or `ce_{kind}_weighted_{dtype}`, from [`ENTRIES`].
fn entry(kind: &str, weighted: bool, dtype: DType) -> Result<&'static str> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        other => bail!("chunked cross-entropy (cuda): logits must be a float dtype, got {other:?}"),
    };
    find_entry(&format!("ce_{kind}_{}{suffix}", if weighted { "weighted_" } else { "" }))
}

/// `name` from [`ENTRIES`].
fn find_entry(name: &str) -> Result<&'static str> {
    match ENTRIES.iter().find(|e| **e == name) {
        Some(e) => Ok(e),
        None => bail!("chunked cross-entropy (cuda): no kernel entry {name}"),
    }
}
