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

/// Where a call's weight gradient goes, which settles its chunks and the
/// dtype it is summed in (see [`plan_chunks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WeightGrad {
    /// Not wanted (a frozen or LoRA head, evaluation): no `[V, H]` sum.
    Unwanted,
    /// Handed out (autograd, `loss_and_grads`): summed in a fresh buffer.
    Fresh,
    /// Added into the caller's f32 accumulator (`accumulate_grads`).
    Accumulated,
}

/// The device a call's chunks run on, as their plan sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChunkDevice {
    /// The CPU (or any device but CUDA).
    Cpu,
    /// CUDA, where a chunk's logits are its only `[chunk, V]` buffer: the
    /// fused kernels, no bias.
    CudaLean,
    /// CUDA with more `[chunk, V]` temporaries a chunk: candle's primitive ops
    /// (`compile(false)`), or a bias (its add, and its gradient's column sums
    /// formed in f32).
    Cuda,
}

/// A call's chunk length and the dtype its weight gradient is summed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChunkPlan {
    pub(super) chunk_len: usize,
    pub(super) weight_sum: DType,
}

/// The chunks of a call over `valid` rows of width `width` against `vocab`
/// classes, for a `weight` of dtype `weight`, and the dtype its gradient is
/// summed in.
///
/// The automatic chunk (`chunk_len` `None`) is about `valid * width / vocab`
/// rows (a chunk of logits about the size of the hidden states), at least
/// [`MIN_AUTO_CHUNK`] ([`MIN_AUTO_CHUNK_CUDA`] on CUDA); for a `low_memory`
/// loss that size rounded down to a multiple of [`LEAN_CHUNK_ROWS`], at least
/// that; never more than `valid` (nor less than 1).
///
/// A weight's gradient handed out fresh is summed over the chunks in f32 (f64
/// for f64) and rounded to the weight's dtype at the end, except:
/// - with `low_memory`, in the weight's dtype (rounded once per chunk);
/// - a bf16 weight's in one chunk (all the valid rows): that one product,
///   summed in f32, is rounded once straight into bf16 (cuBLAS's epilogue;
///   `gemm::add_matmul_tn_rounded` on the CPU), the same gradient without the
///   f32 `[V, H]` accumulator and the pass that rounds it (on the CPU, 1024 x
///   768 x 50257: the same time, peak 594 -> 516 MB). f16 keeps its
///   accumulator: its gradient is formed boosted (see
///   `precomputed::boost_of`) and could pass f16's range before the boost is
///   divided out.
///
/// On CUDA, a 16-bit weight's gradient handed out fresh costs 6 `V·H` bytes at
/// the end of the call whatever the chunks (the f32 accumulator and the
/// rounded gradient), and each chunk's product reads and writes the whole
/// accumulator (2 x 4 `V·H` bytes: 4.2 GB a chunk at 8192 x 4096 x 128256).
/// Where a chunk's logits are its only `[chunk, V]` buffer
/// ([`ChunkDevice::CudaLean`]), the automatic chunks grow to what that peak
/// already pays for:
/// - bf16 with all rows' logits (2 `N·V` bytes) no larger than the accumulator
///   (`valid <= 2 * width`): one chunk, summed straight into bf16 (above; peak
///   2 `N·V` + 2 `V·H` bytes, no accumulator pass at all);
/// - otherwise `width` rows where that is more than the automatic chunk would
///   be: their logits (2 `width·V` bytes) beside the accumulator's 4 `V·H`
///   stay within that peak.
///
/// On the CPU the products are bound by arithmetic, not by the accumulator's
/// traffic, and the automatic chunks stay as they were.
pub(super) fn plan_chunks(
    (valid, width, vocab): (usize, usize, usize),
    weight: DType,
    weight_grad: WeightGrad,
    device: ChunkDevice,
    low_memory: bool,
    chunk_len: Option<usize>,
) -> ChunkPlan {
    let hidden_sized = valid * width / vocab.max(1);
    let fresh = weight_grad == WeightGrad::Fresh;
    let cuda = device != ChunkDevice::Cpu;
    let grow = device == ChunkDevice::CudaLean && fresh && matches!(weight, DType::BF16 | DType::F16);
    let auto = if low_memory {
        (hidden_sized / LEAN_CHUNK_ROWS * LEAN_CHUNK_ROWS).max(LEAN_CHUNK_ROWS)
    } else if grow && weight == DType::BF16 && valid <= 2 * width {
        valid
    } else if grow {
        hidden_sized.max(MIN_AUTO_CHUNK_CUDA).max(width)
    } else {
        hidden_sized.max(if cuda { MIN_AUTO_CHUNK_CUDA } else { MIN_AUTO_CHUNK })
    };
    let chunk_len = chunk_len.unwrap_or(auto.min(valid).max(1));
    let one_chunk = chunk_len >= valid;
    let weight_sum =
        if low_memory || (fresh && weight == DType::BF16 && one_chunk) { weight } else { compute_dtype(weight) };
    ChunkPlan { chunk_len, weight_sum }
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
    use super::{plan_chunks, ChunkDevice, ChunkPlan, WeightGrad};
    use candle::DType::{self, BF16, F16, F32};

    /// The chunk lengths and weight-gradient sums of `plan_chunks`, from the
    /// rules its docs state (each figure worked out by hand from them).
    #[test]
    fn chunk_plans() {
        use ChunkDevice::{Cpu, Cuda, CudaLean};
        use WeightGrad::{Accumulated, Fresh, Unwanted};
        // ((valid, H, V), weight dtype, weight gradient, device, low_memory, chunk_len) -> (rows, summed in)
        type Case = ((usize, usize, usize), DType, WeightGrad, ChunkDevice, bool, Option<usize>);
        let cases: [(Case, (usize, DType)); 29] = [
            // The CPU: about N * H / V rows, at least 1024; f32 sums, but for
            // one chunk of bf16.
            (((8192, 4096, 128_256), BF16, Fresh, Cpu, false, None), (1024, F32)),
            (((1000, 64, 256), F32, Fresh, Cpu, false, None), (1000, F32)),
            (((1000, 64, 256), BF16, Fresh, Cpu, false, None), (1000, BF16)),
            (((1000, 64, 256), F16, Fresh, Cpu, false, None), (1000, F32)),
            (((1000, 64, 256), BF16, Accumulated, Cpu, false, None), (1000, F32)),
            (((0, 16, 100), F32, Fresh, Cpu, false, None), (1, F32)),
            // No valid row on CUDA: still one row (a chunk of 0 would never end).
            (((0, 16, 100), BF16, Fresh, CudaLean, false, None), (1, BF16)),
            (((0, 16, 100), F16, Fresh, CudaLean, false, None), (1, F32)),
            (((0, 16, 100), BF16, Fresh, CudaLean, true, None), (1, BF16)),
            // CUDA, bf16 handed out, N <= 2H: one chunk, summed in bf16.
            (((8192, 4096, 128_256), BF16, Fresh, CudaLean, false, None), (8192, BF16)),
            (((64, 32, 500), BF16, Fresh, CudaLean, false, None), (64, BF16)),
            // ... N > 2H: chunks of at least H rows (2048 when H is smaller), f32 sums.
            (((8193, 4096, 128_256), BF16, Fresh, CudaLean, false, None), (4096, F32)),
            (((32_768, 768, 50_257), BF16, Fresh, CudaLean, false, None), (2048, F32)),
            (((100_000, 4096, 32_000), BF16, Fresh, CudaLean, false, None), (12_800, F32)),
            // f16 keeps its accumulator (the boost), with H-row chunks.
            (((8192, 4096, 128_256), F16, Fresh, CudaLean, false, None), (4096, F32)),
            // f32 weights: the gradient is the accumulator; chunks as before.
            (((8192, 4096, 128_256), F32, Fresh, CudaLean, false, None), (2048, F32)),
            // No weight gradient, or the caller's accumulator: chunks as before.
            (((8192, 4096, 128_256), BF16, Unwanted, CudaLean, false, None), (2048, F32)),
            (((8192, 4096, 128_256), BF16, Accumulated, CudaLean, false, None), (2048, F32)),
            // A chunk_len that covers every row: bf16 summed straight in bf16;
            // a smaller one keeps the f32 sum.
            (((8192, 4096, 128_256), BF16, Fresh, CudaLean, false, Some(8192)), (8192, BF16)),
            (((8192, 4096, 128_256), BF16, Fresh, Cpu, false, Some(10_000)), (10_000, BF16)),
            (((8192, 4096, 128_256), BF16, Fresh, CudaLean, false, Some(2048)), (2048, F32)),
            (((100, 4, 1000), BF16, Fresh, CudaLean, false, Some(100)), (100, BF16)),
            // CUDA with more [chunk, V] temporaries (primitive ops, a bias): chunks as before.
            (((8192, 4096, 128_256), BF16, Fresh, Cuda, false, None), (2048, F32)),
            (((8192, 4096, 128_256), F16, Fresh, Cuda, false, None), (2048, F32)),
            (((64, 32, 500), BF16, Fresh, Cuda, false, None), (64, BF16)),
            // low_memory: multiples of 64 rows, summed in the weight's dtype.
            (((8192, 4096, 128_256), BF16, Fresh, CudaLean, true, None), (256, BF16)),
            (((1000, 64, 256), F32, Fresh, Cpu, true, None), (192, F32)),
            (((10, 16, 100), BF16, Fresh, CudaLean, true, None), (10, BF16)),
            (((100, 16, 100), BF16, Fresh, Cpu, true, Some(50)), (50, BF16)),
        ];
        for ((dims, weight, grad, device, low_memory, chunk_len), (rows, sum)) in cases {
            let plan = plan_chunks(dims, weight, grad, device, low_memory, chunk_len);
            let what = format!("{dims:?} {weight:?} {grad:?} {device:?} low_memory={low_memory} {chunk_len:?}");
            assert_eq!(plan, ChunkPlan { chunk_len: rows, weight_sum: sum }, "{what}");
        }
    }
}
