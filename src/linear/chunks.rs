//! The linear loss's pass over its rows, a chunk of logits at a time: the
//! statistics alone, or with the gradients of a scalar loss formed in the
//! forward pass; and the backward, which scales those or recomputes.

use super::products::{input_gradients, GradientSums, LogitsBuffer, Projection};
use super::rows::RowSelection;
use super::Wanted;
use crate::config::{compute_dtype, OpConfig, UnitFactors, STATS, UPSTREAM};
use crate::op::{self, NodeBackward, RowWeights};
use crate::precomputed::{boost_of, upstream_scale};
use candle::{DType, Result, Tensor};
use std::sync::Mutex;

/// The automatic chunk never has fewer rows than this: thinner chunks make
/// the thin matmuls dominate (31-row chunks at N = 2048, H = 768, V = 50257
/// took 4x longer than 1024-row ones, when each chunk also allocated a `[V,
/// H]` product), and the gemm crate's `G · W` (inner dimension V) still runs
/// at 243-259 GFLOP/s on 512 rows against 282-300 on 1024 (`cargo bench
/// --bench gemm_routes`, BENCHMARKS.md).
const MIN_AUTO_CHUNK: usize = 1024;

/// On CUDA the automatic chunk has at least this many rows: each chunk's
/// weight-gradient product reads and writes the whole `[V, H]` f32
/// accumulator, and at 8192 x 4096 x 128256 bf16 on an H200 2048-row chunks
/// took 54.4 ms where the automatic 1024-row ones took 57.7 (46.8 and 49.1 with
/// freed memory retained; the same call, 2026-12-04, BENCHMARKS.md), at the
/// same 3.00 GiB peak.
const MIN_AUTO_CHUNK_CUDA: usize = 2048;

/// A `low_memory` loss's automatic chunks are a multiple of this many rows
/// (and at least that): whole tiles for the products.
const LEAN_CHUNK_ROWS: usize = 64;

/// The automatic chunk length for `valid` rows of width `width` against `vocab`
/// classes: about `valid * width / vocab` rows (a chunk of logits about the size
/// of the hidden states), at least [`MIN_AUTO_CHUNK`] ([`MIN_AUTO_CHUNK_CUDA`]
/// on CUDA); for a `low_memory` loss that size rounded down to a multiple of
/// [`LEAN_CHUNK_ROWS`], at least that; never more than `valid` (nor less than 1).
pub(super) fn auto_chunk_len(valid: usize, width: usize, vocab: usize, cuda: bool, low_memory: bool) -> usize {
    let hidden_sized = valid * width / vocab.max(1);
    let rows = if low_memory {
        (hidden_sized / LEAN_CHUNK_ROWS * LEAN_CHUNK_ROWS).max(LEAN_CHUNK_ROWS)
    } else {
        hidden_sized.max(if cuda { MIN_AUTO_CHUNK_CUDA } else { MIN_AUTO_CHUNK })
    };
    rows.min(valid.max(1))
}

/// `(start, len)` of each chunk of `chunk_len` rows.
pub(super) fn chunks(rows: usize, chunk_len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).step_by(chunk_len).map(move |start| (start, chunk_len.min(rows - start)))
}

/// Per-row statistics `[N, 4]` (see `op/mod.rs`) of the logits of `rows` (`[N,
/// H]`, detached), one chunk of rows at a time, nothing recorded.
pub(super) fn row_stats(rows: &Tensor, projection: &Projection, labels: &Tensor, cfg: &OpConfig) -> Result<Tensor> {
    let (mut stats, mut buffer) = (Vec::new(), LogitsBuffer::default());
    for (start, len) in chunks(rows.dim(0)?, cfg.chunk_len) {
        let logits = projection.chunk_logits(&rows.narrow(0, start, len)?, &mut buffer)?;
        stats.push(op::row_stats(&logits, &labels.narrow(0, start, len)?, cfg)?);
    }
    if stats.is_empty() {
        let dtype = compute_dtype(rows.dtype());
        return Tensor::zeros((0, STATS), dtype, rows.device());
    }
    Tensor::cat(&stats, 0)
}

/// Gradients computed in the forward pass for an upstream gradient of 1 (see
/// [`GradientSums::finish`]), and the per-row factors `[N, 3] = (g_ce, g_lse,
/// g_sum)` they were computed with.
pub(super) struct Precomputed {
    pub(super) unit_factors: Tensor,
    pub(super) gradients: Vec<Option<Tensor>>,
    /// What `gradients` are multiplied by: a power of two that brings the
    /// factors they were formed with to order 1 (see `precomputed::boost_of`).
    pub(super) boost: f64,
}

/// One pass over the chunks of the linear loss's forward: its detached `[N,
/// H]` rows, the output layer, the checked `[N]` labels and the settings.
pub(super) struct ChunkPass<'a> {
    pub(super) rows: &'a Tensor,
    pub(super) projection: &'a Projection,
    pub(super) labels: &'a Tensor,
    pub(super) cfg: &'a OpConfig,
}

impl ChunkPass<'_> {
    /// The statistics `[N, 4]` and, from the same logits chunks, the gradients of
    /// a scalar loss whose upstream gradient is 1 (see the module docs), with the
    /// rows' `weights` for a weighted loss, multiplied by the returned boost (see
    /// `precomputed::boost_of`), added into `sums` (fresh, or a caller's accumulator).
    pub(super) fn forward_with_gradients(
        &self,
        unit: UnitFactors,
        weights: Option<&RowWeights>,
        mut sums: GradientSums,
    ) -> Result<(Tensor, GradientSums, f64)> {
        let Self { rows, projection, labels, cfg } = *self;
        let boost = boost_of(&unit, rows.dtype());
        let boosted = unit.scaled(boost);
        let (mut stats, mut buffer) = (Vec::new(), LogitsBuffer::default());
        for (start, len) in chunks(rows.dim(0)?, cfg.chunk_len) {
            let chunk = rows.narrow(0, start, len)?;
            let labels = labels.narrow(0, start, len)?;
            let logits = projection.chunk_logits(&chunk, &mut buffer)?;
            let weights = weights.map(|w| w.narrow(start, len)).transpose()?;
            let (chunk_stats, logits_grad) =
                op::row_stats_and_unit_grad(&logits, &labels, cfg, boosted, weights.as_ref())?;
            sums.add(start, &chunk, &logits_grad, projection)?;
            stats.push(chunk_stats);
        }
        let stats = match stats.is_empty() {
            true => Tensor::zeros((0, STATS), compute_dtype(rows.dtype()), rows.device())?,
            false => Tensor::cat(&stats, 0)?,
        };
        Ok((stats, sums, boost))
    }
}

/// The backward of the linear loss: the gradients of `rows`, `weight` and,
/// when it is an input, `bias`. The labels are not differentiable and travel
/// inside it, with the gradients the forward pass computed, if it did. Those
/// are handed over by the first backward pass (so that the graph does not keep
/// them alive afterwards); a later backward pass over the same graph recomputes.
pub(super) struct LinearBackward {
    pub(super) cfg: OpConfig,
    pub(super) wanted: Wanted,
    /// The dtype the weight's gradient is summed in.
    pub(super) weight_sum: DType,
    /// The rows the products run on, and their labels.
    pub(super) selection: RowSelection,
    pub(super) labels: Tensor,
    pub(super) precomputed: Mutex<Option<Precomputed>>,
}

impl NodeBackward for LinearBackward {
    const NAME: &'static str = "chunked-linear-cross-entropy";

    fn backward(&self, inputs: &[&Tensor], factors: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let precomputed = self.precomputed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(pre) = precomputed {
            if let Some(scale) = upstream_scale(&factors.narrow(1, 0, UPSTREAM)?, &pre.unit_factors)? {
                return input_gradients(pre.gradients, inputs, scale / pre.boost);
            }
            RECOMPUTED_BACKWARDS.with(|n| n.set(n.get() + 1));
        }
        self.recompute(inputs, factors)
    }
}

impl LinearBackward {
    /// Recomputes each chunk's logits and turns them into the gradients.
    pub(super) fn recompute(&self, inputs: &[&Tensor], factors: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let rows = self.selection.gather(&inputs[0].detach())?;
        let factors = self.selection.gather(factors)?;
        let projection = Projection { weight: inputs[1].detach(), bias: inputs.get(2).map(|b| b.detach()) };
        let (mut sums, mut buffer) =
            (GradientSums::new(&rows, &projection, self.wanted, self.weight_sum)?, LogitsBuffer::default());
        for (start, len) in chunks(rows.dim(0)?, self.cfg.chunk_len) {
            let chunk = rows.narrow(0, start, len)?;
            let logits = projection.chunk_logits(&chunk, &mut buffer)?;
            let labels = self.labels.narrow(0, start, len)?;
            let logits_grad = op::logits_grad(&logits, &labels, &factors.narrow(0, start, len)?, &self.cfg)?;
            sums.add(start, &chunk, &logits_grad, &projection)?;
        }
        let gradients = self.selection.scatter_hidden_grad(sums.finish(projection.bias.is_some())?)?;
        input_gradients(gradients, inputs, 1.0)
    }
}

thread_local! {
    /// Backward passes of this thread that could not use the gradients computed
    /// in forward (a test hook: see [`recomputed_backwards`]).
    static RECOMPUTED_BACKWARDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many linear-loss backward passes on this thread recomputed their
/// logits although the forward pass had computed the gradients. Not part of
/// the stable API: the tests use it to check that the fast path is taken.
#[cfg(feature = "testing")]
pub fn recomputed_backwards() -> usize {
    RECOMPUTED_BACKWARDS.with(std::cell::Cell::get)
}

#[cfg(test)]
mod tests {
    use super::auto_chunk_len;

    #[test]
    fn automatic_chunks() {
        // (valid, H, V, cuda, low_memory) -> rows
        let cases = [
            ((8192, 4096, 128_256, false, false), 1024),
            ((8192, 4096, 128_256, true, false), 2048),
            ((8192, 4096, 128_256, true, true), 256),
            ((1000, 64, 256, false, true), 192),
            ((1000, 64, 256, false, false), 1000),
            ((100_000, 4096, 32_000, true, false), 12_800),
            ((10, 16, 100, true, true), 10),
            ((0, 16, 100, false, false), 1),
        ];
        for ((valid, width, vocab, cuda, low_memory), rows) in cases {
            assert_eq!(auto_chunk_len(valid, width, vocab, cuda, low_memory), rows, "{valid} x {width} x {vocab}");
        }
    }
}
