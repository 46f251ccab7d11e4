//! Block shapes: how many threads share a row, and how many blocks a launch
//! has at most.

use candle::{bail, DType, Result};

/// Blocks per launch at most; the kernels loop over further rows.
pub const MAX_BLOCKS: u32 = 1 << 16;

/// A block shape: `threads` per block (a multiple of 32), shared by one row
/// (`rows_per_block == 1`) or one row per warp (`rows_per_block == threads / 32`),
/// and at most `max_blocks` blocks; in the backward, `row_splits` blocks
/// may share one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchShape {
    /// Threads per block.
    pub threads: u32,
    /// Rows a block works on at a time: 1, or one per warp.
    pub rows_per_block: u32,
    /// Blocks per launch at most.
    pub max_blocks: u32,
    /// Blocks that share one row in the backward, 1 to [`MAX_ROW_SPLITS`]
    /// (more than 1 only with `rows_per_block == 1`): block `s` of a row's
    /// takes its stretches `s, s + row_splits, ...` of `threads` packs, so
    /// that the resident blocks span fewer rows at a time. The forward's
    /// reduction stays within one block and ignores it.
    pub row_splits: u32,
}

/// The most blocks that share one row in the backward.
pub const MAX_ROW_SPLITS: u32 = 64;

impl LaunchShape {
    /// The shape the launcher uses for rows of `vocab` elements of `dtype`:
    /// a warp per row while each lane has at most 8 sixteen-byte packs, else a
    /// block per row with at least 8 packs per thread (two of the kernels'
    /// batches of loads), 64 to [`MAX_ROW_BLOCK`] threads; one block a row in
    /// the backward too (`row_splits` 1: split rows are unmeasured on a GPU).
    pub fn for_vocab(dtype: DType, vocab: usize) -> Self {
        let packs = vocab.div_ceil(16 / dtype.size_in_bytes().max(1));
        if packs <= 32 * 8 {
            return Self { threads: 256, rows_per_block: 8, max_blocks: MAX_BLOCKS, row_splits: 1 };
        }
        let largest = MAX_ROW_BLOCK.min(max_threads(dtype)) as usize;
        let threads = (packs / 8).next_power_of_two().clamp(64, largest) as u32;
        #[cfg(feature = "testing")]
        let threads = match ROW_BLOCK_THREADS.load(std::sync::atomic::Ordering::Relaxed) {
            0 => threads,
            chosen => chosen.min(max_threads(dtype)),
        };
        #[cfg(feature = "testing")]
        let row_splits = ROW_SPLITS.load(std::sync::atomic::Ordering::Relaxed).max(1);
        #[cfg(not(feature = "testing"))]
        let row_splits = 1;
        Self { threads, rows_per_block: 1, max_blocks: MAX_BLOCKS, row_splits }
    }

    pub(super) fn check(&self, dtype: DType) -> Result<()> {
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
        if self.row_splits == 0 || self.row_splits > MAX_ROW_SPLITS {
            bail!("chunked cross-entropy (cuda): row_splits must be 1 to {MAX_ROW_SPLITS}, got {}", self.row_splits)
        }
        if self.row_splits > 1 && self.rows_per_block != 1 {
            bail!(
                "chunked cross-entropy (cuda): {} blocks cannot share a row that a warp works on (rows_per_block {})",
                self.row_splits,
                self.rows_per_block
            )
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

/// Blocks that share one row in the backward, when not 0 (see
/// [`set_row_splits`]).
#[cfg(feature = "testing")]
static ROW_SPLITS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Makes `splits` blocks share each row in the backward wherever a block
/// shares one row (vocabularies past a warp's), or (`None`) restores
/// [`LaunchShape::for_vocab`]'s one block a row, for the whole process: a test
/// hook (feature `testing`), with which the GPU table times split rows
/// against whole ones in one call.
///
/// # Errors
/// A count outside 1 to [`MAX_ROW_SPLITS`].
#[cfg(feature = "testing")]
pub fn set_row_splits(splits: Option<u32>) -> Result<()> {
    if let Some(splits) = splits.filter(|s| !(1..=MAX_ROW_SPLITS).contains(s)) {
        bail!("chunked cross-entropy: a row is shared by 1 to {MAX_ROW_SPLITS} blocks, got {splits}")
    }
    ROW_SPLITS.store(splits.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
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
