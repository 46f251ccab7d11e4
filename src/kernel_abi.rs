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

pub use crate::config::UnitFactors;
use candle::{bail, DType, Layout, Result, Tensor};

/// Blocks per launch at most; the kernels loop over further rows.
pub const MAX_BLOCKS: u32 = 1 << 16;

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

/// A block shape: `threads` per block (a multiple of 32), shared by one row
/// (`rows_per_block == 1`) or one row per warp (`rows_per_block == threads / 32`),
/// and at most `max_blocks` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchShape {
    /// Threads per block.
    pub threads: u32,
    /// Rows a block works on at a time: 1, or one per warp.
    pub rows_per_block: u32,
    /// Blocks per launch at most.
    pub max_blocks: u32,
}

impl LaunchShape {
    /// The shape the launcher uses for rows of `vocab` elements of `dtype`:
    /// a warp per row while each lane has at most 8 sixteen-byte packs, else a
    /// block per row with at least 8 packs per thread (two of the kernels'
    /// batches of loads), 64 to [`MAX_ROW_BLOCK`] threads.
    pub fn for_vocab(dtype: DType, vocab: usize) -> Self {
        let packs = vocab.div_ceil(16 / dtype.size_in_bytes().max(1));
        if packs <= 32 * 8 {
            return Self { threads: 256, rows_per_block: 8, max_blocks: MAX_BLOCKS };
        }
        let largest = MAX_ROW_BLOCK.min(max_threads(dtype)) as usize;
        let threads = (packs / 8).next_power_of_two().clamp(64, largest) as u32;
        #[cfg(feature = "testing")]
        let threads = match ROW_BLOCK_THREADS.load(std::sync::atomic::Ordering::Relaxed) {
            0 => threads,
            chosen => chosen.min(max_threads(dtype)),
        };
        Self { threads, rows_per_block: 1, max_blocks: MAX_BLOCKS }
    }

    fn check(&self, dtype: DType) -> Result<()> {
        let max = max_threads(dtype);
        if self.threads == 0 || !self.threads.is_multiple_of(32) || self.threads > max {
            bail!(
                "chunked cross-entropy (cuda): {} threads per block; {dtype:?} takes multiples of 32 up to {max}",
                self.threads
            )
        }
        if self.rows_per_block != 1 && self.rows_per_block != self.threads / 32 {
            bail!("chunked cross-entropy (cuda): rows_per_block must be 1 or threads / 32, got {}", self.rows_per_block)
        }
        if self.max_blocks == 0 {
            bail!("chunked cross-entropy (cuda): max_blocks must be positive")
        }
        Ok(())
    }
}

/// The largest block that shares one row. At 64 registers a thread (the
/// entries' `__launch_bounds__`) an SM holds 1024 threads: two such blocks,
/// so that one streams its row while the other merges its partials and
/// starts the next (one block of 1024 leaves the SM's loads idle through
/// every merge).
pub const MAX_ROW_BLOCK: u32 = 512;

/// Threads of a block that shares one row, when not 0 (see
/// [`set_row_block_threads`]).
#[cfg(feature = "testing")]
static ROW_BLOCK_THREADS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Makes every block that shares one row `threads` threads (capped at the
/// dtype's [`max_threads`]), or (`None`) restores [`LaunchShape::for_vocab`]'s
/// choice, for the whole process: a test hook (feature `testing`), with which
/// the GPU table times other block sizes than [`MAX_ROW_BLOCK`] in one call.
///
/// # Errors
/// A count that is not a multiple of 32 between 32 and 1024.
#[cfg(feature = "testing")]
pub fn set_row_block_threads(threads: Option<u32>) -> Result<()> {
    let threads = threads.unwrap_or(0);
    if threads != 0 && (!threads.is_multiple_of(32) || threads > 1024) {
        bail!("chunked cross-entropy: a row's block takes a multiple of 32 threads up to 1024, got {threads}")
    }
    ROW_BLOCK_THREADS.store(threads, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The largest block each dtype's entries are compiled for (`__launch_bounds__`
/// in the `.cu`): f64's double-precision maths would spill at 1024 threads.
pub fn max_threads(dtype: DType) -> u32 {
    if dtype == DType::F64 {
        512
    } else {
        1024
    }
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
/// elements. The rows of `[.., V]` logits, the labels and the mask are all
/// found this way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Strided {
    start: i64,
    inner: i64,
    stride_outer: i64,
    stride_inner: i64,
}

impl Strided {
    /// The elements of leading `dims` (one or two) with their `strides`,
    /// from `start`; `None` for another rank.
    fn new(dims: &[usize], strides: &[usize], start: usize) -> Option<(usize, Self)> {
        let i = |v: usize| v as i64;
        let (count, inner, stride_outer, stride_inner) = match (dims, strides) {
            ([n], [s]) => (*n, (*n).max(1), 0, *s),
            ([b, s], [sb, ss]) => (b * s, (*s).max(1), *sb, *ss),
            _ => return None,
        };
        Some((
            count,
            Self { start: i(start), inner: i(inner), stride_outer: i(stride_outer), stride_inner: i(stride_inner) },
        ))
    }

    fn args(&self) -> [KernelArg; 4] {
        [
            KernelArg::I64(self.start),
            KernelArg::I64(self.inner),
            KernelArg::I64(self.stride_outer),
            KernelArg::I64(self.stride_inner),
        ]
    }
}

/// Where the rows of `[.., V]` logits live (see `Strided`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowGeometry {
    /// Rows (`N`).
    pub rows: usize,
    /// Row length (`V`).
    pub vocab: usize,
    strided: Strided,
}

impl RowGeometry {
    /// The rows of a rank 2 or 3 layout whose last dim is unit-stride, with
    /// `V < 2^31` (the kernels index within a row in 32 bits).
    pub fn new(layout: &Layout) -> Result<Self> {
        let (dims, strides) = (layout.dims(), layout.stride());
        let vocab = *dims.last().unwrap_or(&0);
        if vocab > 1 && strides.last() != Some(&1) {
            bail!("chunked cross-entropy (cuda): the vocabulary dim must be unit-stride, strides {strides:?}")
        }
        if vocab > i32::MAX as usize {
            bail!("chunked cross-entropy (cuda): a vocabulary of {vocab} is over the kernels' 2^31 - 1")
        }
        let leading = dims.len().saturating_sub(1);
        let (rows, strided) = match Strided::new(&dims[..leading], &strides[..leading], layout.start_offset()) {
            Some(rows) if matches!(dims.len(), 2 | 3) => rows,
            _ => bail!("chunked cross-entropy (cuda): logits must be rank 2 or 3, got {:?}", layout.shape()),
        };
        Ok(Self { rows, vocab, strided })
    }

    /// Whether a launch over these rows has nothing to do.
    fn is_empty(&self) -> bool {
        self.rows == 0 || self.vocab == 0
    }
}

/// How a mask's elements are read (see [`labels`]): `bytes` per element, and
/// whether it is a float (its sign bit then does not count, so `-0.0` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskElements {
    bytes: i32,
    float: bool,
}

impl MaskElements {
    /// The elements of a mask of `dtype`: every integer and float dtype of up
    /// to 8 bytes whose zero is all bits clear (but for a float's sign).
    pub fn of(dtype: DType) -> Result<Self> {
        let float = match dtype {
            DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64 => false,
            DType::BF16 | DType::F16 | DType::F32 | DType::F64 | DType::F8E4M3 => true,
            other => bail!(
                "chunked cross-entropy: a mask of {other:?} is not supported (an integer or a float dtype of 8 to 64 bits)"
            ),
        };
        Ok(Self { bytes: dtype.size_in_bytes() as i32, float })
    }
}

/// The caller's labels (and mask) as the `ce_labels_*` entries read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelGeometry {
    /// Labels (`N`).
    pub rows: usize,
    labels: Strided,
    mask: Option<(Strided, MaskElements)>,
}

impl LabelGeometry {
    /// `labels`' layout (rank 1 or 2), and the mask's layout and elements
    /// when there is one (the same dims).
    pub fn new(labels: &Layout, mask: Option<(&Layout, MaskElements)>) -> Result<Self> {
        let strided =
            |layout: &Layout, what: &str| match Strided::new(layout.dims(), layout.stride(), layout.start_offset()) {
                Some(found) => Ok(found),
                None => bail!("chunked cross-entropy: {what} must be rank 1 or 2, got {:?}", layout.shape()),
            };
        let (rows, labels_strided) = strided(labels, "labels")?;
        let mask = match mask {
            None => None,
            Some((layout, elements)) => {
                if layout.dims() != labels.dims() {
                    bail!(
                        "chunked cross-entropy: mask {:?} must have the labels' shape {:?}",
                        layout.shape(),
                        labels.shape()
                    )
                }
                Some((strided(layout, "the mask")?.1, elements))
            }
        };
        Ok(Self { rows, labels: labels_strided, mask })
    }
}

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
    row_launch(entry, rows, dtype, shape, args)
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
    row_launch(entry, rows, dtype, shape, args)
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
    row_launch(entry, rows, dtype, shape, args)
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

/// Appends `rows_per_block` and the row geometry, and sizes the grid: the
/// launch of a row kernel, or `None` when the rows are empty (the arguments
/// are still checked, so that an empty call fails where a full one would).
fn row_launch(
    entry: &'static str,
    rows: &RowGeometry,
    dtype: DType,
    shape: LaunchShape,
    mut args: Vec<KernelArg>,
) -> Result<Option<KernelLaunch>> {
    shape.check(dtype)?;
    if rows.is_empty() {
        return Ok(None);
    }
    args.push(KernelArg::I32(shape.rows_per_block as i32));
    args.extend(rows.strided.args());
    let blocks = rows.rows.div_ceil(shape.rows_per_block as usize).min(shape.max_blocks as usize) as u32;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LABEL_DTYPES;

    fn options() -> KernelOptions {
        KernelOptions { ignore_index: -100, softcap: None, logit_sum: false, sum_weights: None }
    }

    /// Bad block sizes are refused and change nothing (a good one would
    /// change every test's launches: the GPU table sets it, no test does).
    #[cfg(feature = "testing")]
    #[test]
    fn bad_row_block_sizes_are_refused() {
        for bad in [100, 2048, 16] {
            let err = set_row_block_threads(Some(bad)).expect_err("a bad block size").to_string();
            assert!(err.contains("multiple of 32 threads up to 1024"), "{err}");
        }
        assert_eq!(LaunchShape::for_vocab(DType::BF16, 128_256).threads, MAX_ROW_BLOCK);
    }

    #[test]
    fn shapes_follow_the_vocabulary() {
        let small = LaunchShape::for_vocab(DType::BF16, 2048);
        assert_eq!((small.threads, small.rows_per_block), (256, 8));
        let large = LaunchShape::for_vocab(DType::BF16, 128_256);
        assert_eq!((large.threads, large.rows_per_block), (512, 1));
        assert_eq!(LaunchShape::for_vocab(DType::F64, 128_256).threads, 512);
        assert_eq!(LaunchShape::for_vocab(DType::F32, 257 * 4).threads, 64);
    }

    #[test]
    fn every_dtype_has_its_entries() -> Result<()> {
        let layout = Layout::contiguous((3, 7));
        let rows = RowGeometry::new(&layout)?;
        let options = options();
        let launched = |launch: Result<Option<KernelLaunch>>| launch.map(|l| l.expect("3 x 7 has a launch").entry);
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let shape = LaunchShape::for_vocab(dtype, 7);
            assert!(launched(forward(&rows, dtype, &options, shape))?.starts_with("ce_fwd_"));
            assert!(launched(backward(&rows, dtype, &options, true, shape))?.starts_with("ce_bwd_inplace_"));
            let unit = UnitFactors { ce: 1.0, lse: 0.0, lse_squared: 0.0, logit_sum: 0.0 };
            let in_place = launched(forward_with_grad(&rows, dtype, &options, &unit, true, shape))?;
            assert!(in_place.starts_with("ce_fwd_grad_") && !in_place.contains("out"), "{in_place}");
            let out = forward_with_grad(&rows, dtype, &options, &unit, false, shape)?.expect("3 x 7 has a launch");
            assert!(out.entry.starts_with("ce_fwd_grad_out_"), "{}", out.entry);
            assert_eq!(out.args[2], KernelArg::Operand(Operand::Grad));
        }
        assert!(forward(&rows, DType::U8, &options, LaunchShape::for_vocab(DType::U8, 7)).is_err());
        let bad = LaunchShape { threads: 100, rows_per_block: 1, max_blocks: 1 };
        assert!(forward(&rows, DType::F32, &options, bad).is_err());
        for dtype in LABEL_DTYPES {
            let geometry = LabelGeometry::new(&Layout::contiguous(3), None)?;
            assert!(launched(labels(&geometry, dtype, -100))?.starts_with("ce_labels_"));
        }
        Ok(())
    }

    /// No launch is built for an empty problem (the driver refuses an empty
    /// grid), from any entry point, in any dtype, with any block shape; and
    /// every launch that is built has a grid and a block.
    #[test]
    fn no_empty_launch_can_be_built() -> Result<()> {
        let unit = UnitFactors { ce: 1.0, lse: 0.0, lse_squared: 0.0, logit_sum: 0.0 };
        for dims in [[0, 7], [5, 0], [0, 0], [3, 7]] {
            let rows = RowGeometry::new(&Layout::contiguous((dims[0], dims[1])))?;
            for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
                for shape in [
                    LaunchShape::for_vocab(dtype, dims[1]),
                    LaunchShape { threads: 32, rows_per_block: 1, max_blocks: 1 },
                ] {
                    let options = options();
                    let launches = [
                        forward(&rows, dtype, &options, shape)?,
                        forward_with_grad(&rows, dtype, &options, &unit, true, shape)?,
                        forward_with_grad(&rows, dtype, &options, &unit, false, shape)?,
                        backward(&rows, dtype, &options, false, shape)?,
                        backward(&rows, dtype, &options, true, shape)?,
                    ];
                    for launch in launches {
                        match &launch {
                            None => assert!(dims[0] * dims[1] == 0, "{dims:?} {dtype:?}: no launch"),
                            Some(l) => {
                                assert!(dims[0] * dims[1] > 0, "{dims:?} {dtype:?}: launched {}", l.entry);
                                assert!(l.blocks >= 1 && l.threads >= 32, "{dims:?}: {l:?}");
                            }
                        }
                    }
                }
            }
        }
        for n in [0, 1, 300] {
            let geometry = LabelGeometry::new(&Layout::contiguous(n), None)?;
            for dtype in LABEL_DTYPES {
                let launch = labels(&geometry, dtype, -100)?;
                assert_eq!(launch.is_some(), n > 0, "{n} labels of {dtype:?}");
                assert!(
                    launch.is_none_or(|l| l.blocks as usize * l.threads as usize >= n),
                    "{n} labels: a thread each"
                );
            }
        }
        Ok(())
    }

    /// The labels' entry takes the mask as raw bytes, with its own strides;
    /// packed formats with no zero are refused.
    #[test]
    fn labels_take_any_mask() -> Result<()> {
        let labels_layout = Layout::contiguous((2, 3));
        let mask_layout = Layout::contiguous((2, 5)).narrow(1, 1, 3)?;
        for (dtype, bytes, float) in [(DType::U8, 1, 0), (DType::BF16, 2, 1), (DType::I32, 4, 0), (DType::F64, 8, 1)] {
            let geometry = LabelGeometry::new(&labels_layout, Some((&mask_layout, MaskElements::of(dtype)?)))?;
            let launch = labels(&geometry, DType::I32, 7)?.expect("6 labels");
            assert_eq!(launch.entry, "ce_labels_i32");
            assert_eq!(launch.args[1], KernelArg::Operand(Operand::Mask));
            assert_eq!(&launch.args[5..7], &[KernelArg::I32(bytes), KernelArg::I32(float)]);
            // The mask's start, inner length and strides: [2, 5] narrowed to columns 1..4.
            let mask_strides = [KernelArg::I64(1), KernelArg::I64(3), KernelArg::I64(5), KernelArg::I64(1)];
            assert_eq!(&launch.args[11..15], &mask_strides);
        }
        for dtype in [DType::F4, DType::F6E2M3, DType::F8E8M0] {
            assert!(MaskElements::of(dtype).is_err(), "{dtype:?}");
        }
        let other_shape = Layout::contiguous((3, 2));
        let mask = MaskElements::of(DType::U8)?;
        assert!(LabelGeometry::new(&labels_layout, Some((&other_shape, mask))).is_err());
        assert!(labels(&LabelGeometry::new(&labels_layout, None)?, DType::F32, -100).is_err());
        Ok(())
    }

    /// Class weights pick the `_weighted_` entries and bind their operand,
    /// except in a forward without the logit sum, which does not read them;
    /// weights that do not fit the rows are refused, and so is the forward
    /// with gradient, which has no weighted entry.
    #[test]
    fn class_weights_pick_the_weighted_entries() -> Result<()> {
        let rows = RowGeometry::new(&Layout::contiguous((3, 7)))?;
        let weights = Tensor::ones(7, DType::F32, &candle::Device::Cpu)?;
        let options = KernelOptions { logit_sum: true, sum_weights: Some(weights.clone()), ..self::options() };
        let shape = LaunchShape::for_vocab(DType::BF16, 7);
        let bound = KernelArg::Operand(Operand::SumWeights);
        for (launch, entry) in [
            (forward(&rows, DType::BF16, &options, shape)?, "ce_fwd_weighted_bf16"),
            (backward(&rows, DType::BF16, &options, false, shape)?, "ce_bwd_weighted_bf16"),
            (backward(&rows, DType::BF16, &options, true, shape)?, "ce_bwd_inplace_weighted_bf16"),
        ] {
            let launch = launch.expect("3 x 7 has a launch");
            assert_eq!((launch.entry, launch.args[2]), (entry, bound));
        }
        let unit = UnitFactors { ce: 1.0, lse: 0.0, lse_squared: 0.0, logit_sum: 0.0 };
        for in_place in [true, false] {
            assert!(forward_with_grad(&rows, DType::BF16, &options, &unit, in_place, shape).is_err());
        }
        let unsummed = KernelOptions { logit_sum: false, ..options.clone() };
        let launch = forward(&rows, DType::BF16, &unsummed, shape)?.expect("3 x 7 has a launch");
        assert_eq!((launch.entry, launch.args[2]), ("ce_fwd_bf16", KernelArg::Null));
        for bad in [Tensor::ones(6, DType::F32, &candle::Device::Cpu)?, weights.to_dtype(DType::F64)?] {
            let options = KernelOptions { sum_weights: Some(bad), ..options.clone() };
            assert!(backward(&rows, DType::BF16, &options, false, shape).is_err());
        }
        Ok(())
    }
}
