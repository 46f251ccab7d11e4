//! Fused linear cross-entropy: the loss of `hidden @ weight^T (+ bias)` with
//! `chunk_len` rows of logits alive at a time. Any `[N, V]` logits tensor, even
//! computed chunk by chunk, would cost candle's backprop two more full-size
//! buffers (it adds every gradient into fresh zeros); here the gradient never
//! leaves the node as logits.
//!
//! For a scalar loss (`Mean`, `Sum`) the gradients are computed in the forward
//! pass, as Liger-Kernel does: the upstream gradient of each row's statistics
//! is known up to the one scalar that will reach the loss (see
//! `ChunkedCrossEntropy::unit_factors`), so each chunk's logits are turned into
//! their gradient in place right after their statistics, and folded into the
//! gradients of `hidden` (`G · W`) and `weight` (`Gᵀ · H`, accumulated in f32
//! in place, or for a bf16 weight in one chunk summed straight in bf16: see
//! `chunks::plan_chunks`) and `bias`. Backward then only scales them, after checking that
//! the gradient it received has that expected form; if it has not (the
//! per-token outputs were used too), or for `Reduction::None`, backward
//! recomputes each chunk's logits instead. Either way three matmuls per chunk
//! in all would be the minimum; the fast path does exactly three, the
//! recomputing one four.

mod chunks;
mod direct;
mod plan;
mod products;
mod rows;

#[cfg(feature = "testing")]
pub use chunks::recomputed_backwards;
pub use direct::{LinearGradAccumulator, LinearGrads, MicroBatchGrads};
#[cfg(feature = "testing")]
pub use products::{linear_products, LinearProducts};

use crate::call::{ClassWeights, CrossEntropyOutput, LossCall, Reduction, Settings, TokenCall};
use crate::op::{self, StatsNode};
use candle::{Result, Tensor};
use chunks::{ChunkPass, LinearBackward, Precomputed, WeightGrad};
use plan::{ChunkedCall, Plan};
use products::{GradientSums, Projection};
use std::sync::Mutex;

/// Cross-entropy of the logits `hidden @ weight^T (+ bias)`, never holding them
/// whole: a chunk of rows of logits exists at a time, and the gradients go
/// straight to `hidden`, `weight` and `bias` (a weight shared with the token
/// embedding gets the sum of both gradients, as candle sums gradients of one
/// variable). For a `Mean` or `Sum` loss the gradients are computed in the
/// forward pass and backward only scales them; otherwise (or when the per-token
/// outputs are differentiated as well) backward recomputes each chunk's logits. Peak extra memory is
/// one `[chunk, V]` logits chunk plus f32 accumulators the size of `weight`
/// (and `bias`; with [`low_memory`](Self::low_memory), or for a bf16 weight
/// whose gradient is handed out and whose valid rows fit one chunk, the
/// weight's gradient is summed in place in its own dtype), instead of several
/// `[N, V]` buffers. Rows whose label is
/// `ignore_index` (or masked) are left out of the matrix products altogether:
/// masking a third of the tokens saves a third of the work.
///
/// Same configuration and semantics as [`ChunkedCrossEntropy`](crate::ChunkedCrossEntropy)
/// (`ignore_index`, mask, [`Reduction`], `num_label_tokens`, label smoothing,
/// z-loss, soft-cap, class weights and per-token loss weights, the outputs of
/// [`forward_with_outputs`](Self::forward_with_outputs), the exact zeros when
/// nothing is valid, the errors), except that `chunk_len` defaults to
/// automatic (see [`chunk_len`](Self::chunk_len)), counted among the valid rows
/// (the chunks hold valid rows only). Labels are checked on the host before
/// any chunk runs.
///
/// On a device the kernels do not cover (Metal, or CUDA without this crate's
/// `cuda` feature; see [`ChunkedCrossEntropy`](crate::ChunkedCrossEntropy)) the logits are materialised
/// whole by candle's matmul and the loss is candle's primitive ops
/// differentiated by candle's autograd: the same results, without the memory
/// savings. On CUDA the logits and the hidden states' gradient are candle
/// matmuls, with candle's precision switches (`candle::cuda::set_gemm_reduced_precision_*`);
/// the weight gradient's own cuBLAS product follows the f32 one (TF32 products
/// for f32 inputs) and sums each chunk's product in f32 (and across chunks,
/// but with [`low_memory`](Self::low_memory)).
///
/// ```
/// use candle::{DType, Device, Tensor, Var};
/// use candle_chunked_ce::LinearCrossEntropy;
/// # fn main() -> candle::Result<()> {
/// let hidden = Var::randn(0f32, 1.0, (2, 5, 16), &Device::Cpu)?; // [B, S, H]
/// let weight = Var::randn(0f32, 0.1, (100, 16), &Device::Cpu)?;  // [V, H]
/// let labels = Tensor::zeros((2, 5), DType::U32, &Device::Cpu)?;
/// let loss = LinearCrossEntropy::default().forward(&hidden, &weight, &labels, None)?;
/// let grads = loss.backward()?;
/// assert!(grads.get(&hidden).is_some() && grads.get(&weight).is_some());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LinearCrossEntropy {
    settings: Settings,
    chunk_len: Option<usize>,
    low_memory: bool,
}

impl Default for LinearCrossEntropy {
    fn default() -> Self {
        Self { settings: Settings::new(32, true, -100), chunk_len: None, low_memory: false }
    }
}

impl LinearCrossEntropy {
    /// Rows of logits per chunk; `None` (the default) picks about `N * H / V`
    /// rows, so that a chunk of logits is about the size of the hidden states,
    /// but at least 1024 (2048 on CUDA), counted among the valid rows.
    ///
    /// When one chunk holds all the valid rows (this length or the automatic
    /// one) and a bf16 weight's gradient is wanted (not for
    /// [`accumulate_grads`](Self::accumulate_grads)), that gradient is summed
    /// straight into bf16: one product, in f32, rounded once per element, the
    /// same gradient as through the f32 accumulator, without it and the pass
    /// that rounds it. Through autograd an upstream gradient other than a
    /// power of two (`loss * 0.3`, not `loss * 0.25`) then rounds it once more.
    ///
    /// On CUDA, when a bf16 or f16 weight's gradient is wanted (with the fused
    /// kernels and no bias: a chunk's logits are then its only `[chunk, V]`
    /// buffer), the automatic chunks grow to what the f32 accumulator and the
    /// rounded gradient (6 bytes per weight element, the call's peak either
    /// way) already pay for, since each chunk's product reads and writes the
    /// whole accumulator: one chunk for bf16 with `N <= 2 * H` (all the logits
    /// no larger than the accumulator, which is then not needed), otherwise at
    /// least `H` rows.
    ///
    /// With [`low_memory`](Self::low_memory) the automatic chunk is smaller
    /// (see there).
    pub fn chunk_len(mut self, chunk_len: Option<usize>) -> Self {
        self.chunk_len = chunk_len;
        self
    }

    /// Trades precision and speed for memory (default `false`), as
    /// Liger-Kernel's fused linear cross-entropy does:
    ///
    /// - the weight's gradient is summed over the chunks in the weight's own
    ///   dtype, in the `[V, H]` buffer that is handed out, instead of an f32
    ///   accumulator (twice a bf16 weight's size) that is rounded once at the
    ///   end. Each chunk's product is formed in f32 and added with one
    ///   rounding, so a bf16 gradient is rounded once per chunk: its relative
    ///   error grows from bf16's 2^-9 towards about `sqrt(chunks)` times that;
    /// - without a `chunk_len`, a chunk is about `N * H / V` valid rows,
    ///   rounded down to a multiple of 64 (at least 64): its logits are no
    ///   larger than the hidden states. Smaller chunks run the products less
    ///   efficiently.
    ///
    /// The peak of [`loss_and_grads`](Self::loss_and_grads) is then the
    /// weight's gradient, the hidden states' and one chunk of logits. f32 and
    /// f64 weights are summed in their dtype either way (only the chunks
    /// change). An f16 weight is refused: its sums could pass f16's 65504.
    /// [`accumulate_grads`](Self::accumulate_grads) keeps adding into the
    /// caller's f32 accumulator.
    pub fn low_memory(mut self, low_memory: bool) -> Self {
        self.low_memory = low_memory;
        self
    }

    /// Fused kernels on each chunk (`true`, the default) or candle's primitive ops.
    pub fn compile(mut self, compile: bool) -> Self {
        self.settings.compile = compile;
        self
    }

    /// As [`ChunkedCrossEntropy::force_autograd`](crate::ChunkedCrossEntropy::force_autograd): the path of a device the
    /// kernels do not cover, on any device. A test hook (feature `testing`).
    #[cfg(feature = "testing")]
    pub fn force_autograd(mut self, force_autograd: bool) -> Self {
        self.settings.force_autograd = force_autograd;
        self
    }

    /// The label value that marks a token to ignore (default -100).
    pub fn ignore_index(mut self, ignore_index: i64) -> Self {
        self.settings.ignore_index = ignore_index;
        self
    }

    /// How per-token losses are combined (default [`Reduction::Mean`]).
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.settings.reduction = reduction;
        self
    }

    /// Label smoothing `ε` in `[0, 1]`, as [`ChunkedCrossEntropy::label_smoothing`](crate::ChunkedCrossEntropy::label_smoothing).
    pub fn label_smoothing(mut self, label_smoothing: f64) -> Self {
        self.settings.label_smoothing = label_smoothing;
        self
    }

    /// The z-loss coefficient, as [`ChunkedCrossEntropy::z_loss`](crate::ChunkedCrossEntropy::z_loss).
    pub fn z_loss(mut self, z_loss: f64) -> Self {
        self.settings.z_loss = z_loss;
        self
    }

    /// The logit soft-cap, as [`ChunkedCrossEntropy::logit_softcap`](crate::ChunkedCrossEntropy::logit_softcap).
    pub fn logit_softcap(mut self, logit_softcap: Option<f64>) -> Self {
        self.settings.logit_softcap = logit_softcap;
        self
    }

    /// `[V]` class weights, as [`ChunkedCrossEntropy::class_weights`](crate::ChunkedCrossEntropy::class_weights) (on
    /// `hidden`'s device).
    pub fn class_weights(mut self, class_weights: Option<Tensor>) -> Self {
        self.settings.class_weights = class_weights.map(ClassWeights);
        self
    }

    /// The loss of `hidden @ weight^T` against `labels` (for a bias and the
    /// other outputs, see [`forward_with_outputs`](Self::forward_with_outputs)).
    ///
    /// - `hidden`: `[N, H]` or `[B, S, H]`, f32, f64, bf16 or f16.
    /// - `weight`: `[V, H]` (an `lm_head`, or the tied token embedding), same
    ///   dtype and device.
    /// - `labels`, `mask` and the result: as in [`ChunkedCrossEntropy::forward`](crate::ChunkedCrossEntropy::forward).
    ///
    /// # Errors
    /// Those of [`ChunkedCrossEntropy::forward`](crate::ChunkedCrossEntropy::forward), `hidden` of width
    /// `H = 0`, and `weight` not `[V, H]` with `hidden`'s `H`, dtype and device. On CUDA, as there,
    /// what candle's own kernels would walk past `2^32 - 2^24` elements: `hidden` with a gradient,
    /// a `weight` whose gradient is handed out (through autograd or
    /// [`loss_and_grads`](Self::loss_and_grads)), the rows gathered when labels are ignored, and
    /// the whole `[N, V]` logits with `force_autograd`.
    pub fn forward(&self, hidden: &Tensor, weight: &Tensor, labels: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with_num_label_tokens(hidden, weight, labels, mask, None)
    }

    /// [`forward`](Self::forward) with the global valid-token count, as in
    /// [`ChunkedCrossEntropy::forward_with_num_label_tokens`](crate::ChunkedCrossEntropy::forward_with_num_label_tokens).
    ///
    /// # Errors
    /// Those of [`forward`](Self::forward), and `num_label_tokens` given with a
    /// reduction other than [`Reduction::Mean`].
    pub fn forward_with_num_label_tokens(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        labels: &Tensor,
        mask: Option<&Tensor>,
        num_label_tokens: Option<usize>,
    ) -> Result<Tensor> {
        let call = self.node(hidden, weight, None, labels, mask, None, num_label_tokens)?;
        self.settings.loss(&call, num_label_tokens)
    }

    /// [`forward`](Self::forward) with per-token `loss_weights`, as
    /// [`ChunkedCrossEntropy::forward_weighted`](crate::ChunkedCrossEntropy::forward_weighted).
    ///
    /// # Errors
    /// Those of [`forward`](Self::forward) and of
    /// [`ChunkedCrossEntropy::forward_weighted`](crate::ChunkedCrossEntropy::forward_weighted).
    pub fn forward_weighted(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        labels: &Tensor,
        mask: Option<&Tensor>,
        loss_weights: &Tensor,
    ) -> Result<Tensor> {
        let call = self.node(hidden, weight, None, labels, mask, Some(loss_weights), None)?;
        self.settings.loss(&call, None)
    }

    /// The loss of `hidden @ weight^T + bias` and every other output of the
    /// call, as [`ChunkedCrossEntropy::forward_with_outputs`](crate::ChunkedCrossEntropy::forward_with_outputs).
    ///
    /// - `bias`: optional `[V]`, the weight's dtype and device; it receives a
    ///   gradient (summed over rows in f32).
    /// - `loss_weights`: optional per-token weights, as in
    ///   [`ChunkedCrossEntropy::forward_weighted`](crate::ChunkedCrossEntropy::forward_weighted).
    /// - the other arguments: as in [`forward_with_num_label_tokens`](Self::forward_with_num_label_tokens).
    ///
    /// # Errors
    /// Those of [`forward_with_num_label_tokens`](Self::forward_with_num_label_tokens)
    /// and of [`ChunkedCrossEntropy::forward_weighted`](crate::ChunkedCrossEntropy::forward_weighted), and a bias that is not
    /// `[V]` with the weight's dtype and device.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_outputs(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        labels: &Tensor,
        mask: Option<&Tensor>,
        loss_weights: Option<&Tensor>,
        num_label_tokens: Option<usize>,
    ) -> Result<CrossEntropyOutput> {
        let call = self.node(hidden, weight, bias, labels, mask, loss_weights, num_label_tokens)?;
        self.settings.outputs(&call, num_label_tokens)
    }

    /// Validates the inputs, runs the chunks, and attaches the loss's graph
    /// node (its `[N, 4]` statistics). With `Engine::Autograd`, the statistics
    /// of the whole logits, recorded op by op, with no node.
    #[allow(clippy::too_many_arguments)]
    fn node(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        labels: &Tensor,
        mask: Option<&Tensor>,
        loss_weights: Option<&Tensor>,
        num_label_tokens: Option<usize>,
    ) -> Result<LossCall> {
        let weight_grad = if weight.track_op() { WeightGrad::Fresh } else { WeightGrad::Unwanted };
        let call = match self.plan(hidden, weight, bias, labels, mask, loss_weights, num_label_tokens, weight_grad)? {
            Plan::Empty(call) => return Ok(call),
            Plan::Recorded(call) => return Ok(LossCall::Tokens(call)),
            Plan::Chunks(call) => call,
        };
        let ChunkedCall {
            rows,
            labels,
            labels_shape,
            vocab,
            weights,
            cfg,
            row_weights,
            denominator,
            selection,
            weight_sum,
        } = call;
        let wanted = Wanted::of(&rows, weight, bias);
        let unit = self.settings.unit_factors(vocab, &weights, denominator, num_label_tokens).filter(|_| wanted.any());
        let projection = Projection { weight: weight.detach(), bias: bias.map(Tensor::detach) };
        let (kept_rows, kept_labels) = (selection.gather(&rows.detach())?, selection.gather(&labels)?);
        let (stats, precomputed) = match unit {
            Some(unit) => {
                let kept_weights = row_weights.as_ref().map(|w| w.map(|c| selection.gather(c))).transpose()?;
                let pass = ChunkPass { rows: &kept_rows, projection: &projection, labels: &kept_labels, cfg: &cfg };
                let sums = GradientSums::new(&kept_rows, &projection, wanted, weight_sum)?;
                let (stats, sums, boost) = pass.forward_with_gradients(unit, kept_weights.as_ref(), sums)?;
                let gradients = sums.finish(projection.bias.is_some())?;
                let (stats, gradients) = (selection.scatter(&stats)?, selection.scatter_hidden_grad(gradients)?);
                // Over all rows: an ignored row receives them too (its gradient is 0 regardless).
                let unit_factors = op::unit_factors(&stats, unit, row_weights.as_ref())?;
                (stats, Some(Precomputed { unit_factors, gradients, boost }))
            }
            None => (selection.scatter(&chunks::row_stats(&kept_rows, &projection, &kept_labels, &cfg)?)?, None),
        };
        let precomputed = Mutex::new(precomputed);
        let backward = LinearBackward { cfg, labels: kept_labels, selection, wanted, weight_sum, precomputed };
        let node = StatsNode { stats, backward };
        let node = match bias {
            None => rows.apply_op2(weight, node)?,
            Some(bias) => rows.apply_op3(weight, bias, node)?,
        };
        Ok(LossCall::Tokens(TokenCall { node, labels, labels_shape, vocab, weights }))
    }
}

/// Which of the node's inputs want a gradient, from candle's `track_op`: a
/// variable, or computed from one. Evaluation wants none, a frozen (or LoRA)
/// head no weight or bias gradient; the products and `[V, H]` accumulator of
/// an input that wants none are never computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wanted {
    rows: bool,
    weight: bool,
    bias: bool,
}

impl Wanted {
    fn of(rows: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Self {
        Self { rows: rows.track_op(), weight: weight.track_op(), bias: bias.is_some_and(Tensor::track_op) }
    }

    fn any(self) -> bool {
        self.rows || self.weight || self.bias
    }
}
