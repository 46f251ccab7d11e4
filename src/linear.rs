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
//! in place) and `bias`. Backward then only scales them, after checking that
//! the gradient it received has that expected form; if it has not (the
//! per-token outputs were used too), or for `Reduction::None`, backward
//! recomputes each chunk's logits instead. Either way three matmuls per chunk
//! in all would be the minimum; the fast path does exactly three, the
//! recomputing one four.

use crate::config::{compute_dtype, Engine, OpConfig, RowLabel, UnitFactors, STATS, UPSTREAM};
use crate::gemm;
use crate::loss::{checked_labels, checked_logits, LossCall, TokenCall};
use crate::op::{self, NodeBackward, RowWeights, StatsNode};
use crate::primitive;
use crate::{ChunkedCrossEntropy, CrossEntropyOutput, Reduction};
use candle::{bail, CpuStorage, DType, Device, Layout, Result, Tensor};
use std::sync::Mutex;

/// Cross-entropy of the logits `hidden @ weight^T (+ bias)`, never holding them
/// whole: a chunk of rows of logits exists at a time, and the gradients go
/// straight to `hidden`, `weight` and `bias` (a weight shared with the token
/// embedding gets the sum of both gradients, as candle sums gradients of one
/// variable). For a `Mean` or `Sum` loss the gradients are computed in the
/// forward pass and backward only scales them; otherwise (or when the per-token
/// outputs are differentiated as well) backward recomputes each chunk's logits. Peak extra memory is
/// one `[chunk, V]` logits chunk plus f32 accumulators the size of `weight`
/// (and `bias`), instead of several `[N, V]` buffers. Rows whose label is
/// `ignore_index` (or masked) are left out of the matrix products altogether:
/// masking a third of the tokens saves a third of the work.
///
/// Same configuration and semantics as [`ChunkedCrossEntropy`]
/// (`ignore_index`, mask, [`Reduction`], `num_label_tokens`, label smoothing,
/// z-loss, soft-cap, class weights and per-token loss weights, the outputs of
/// [`forward_with_outputs`](Self::forward_with_outputs), the exact zeros when
/// nothing is valid, the errors), except that `chunk_len` defaults to
/// automatic: about `N * H / V` rows, so that a chunk of logits is about the
/// size of the hidden states, but at least 1024 rows, counted among the valid
/// rows (the chunks hold valid rows only). Labels are checked on the
/// host before any chunk runs.
///
/// On a device the kernels do not cover (Metal, or CUDA without this crate's
/// `cuda` feature; see [`ChunkedCrossEntropy`]) the logits are materialised
/// whole by candle's matmul and the loss is candle's primitive ops
/// differentiated by candle's autograd: the same results, without the memory
/// savings.
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
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LinearCrossEntropy {
    config: ChunkedCrossEntropy,
    chunk_len: Option<usize>,
}

impl LinearCrossEntropy {
    /// Rows of logits per chunk; `None` (the default) picks about `N * H / V`,
    /// at least 1024.
    pub fn chunk_len(mut self, chunk_len: Option<usize>) -> Self {
        self.chunk_len = chunk_len;
        self
    }

    /// Fused kernels on each chunk (`true`, the default) or candle's primitive ops.
    pub fn compile(mut self, compile: bool) -> Self {
        self.config = self.config.compile(compile);
        self
    }

    /// As [`ChunkedCrossEntropy::force_autograd`]: the path of a device the
    /// kernels do not cover, on any device. Not part of the stable API.
    #[doc(hidden)]
    pub fn force_autograd(mut self, force_autograd: bool) -> Self {
        self.config = self.config.force_autograd(force_autograd);
        self
    }

    /// The label value that marks a token to ignore (default -100).
    pub fn ignore_index(mut self, ignore_index: i64) -> Self {
        self.config = self.config.ignore_index(ignore_index);
        self
    }

    /// How per-token losses are combined (default [`Reduction::Mean`]).
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.config = self.config.reduction(reduction);
        self
    }

    /// Label smoothing `ε` in `[0, 1]`, as [`ChunkedCrossEntropy::label_smoothing`].
    pub fn label_smoothing(mut self, label_smoothing: f64) -> Self {
        self.config = self.config.label_smoothing(label_smoothing);
        self
    }

    /// The z-loss coefficient, as [`ChunkedCrossEntropy::z_loss`].
    pub fn z_loss(mut self, z_loss: f64) -> Self {
        self.config = self.config.z_loss(z_loss);
        self
    }

    /// The logit soft-cap, as [`ChunkedCrossEntropy::logit_softcap`].
    pub fn logit_softcap(mut self, logit_softcap: Option<f64>) -> Self {
        self.config = self.config.logit_softcap(logit_softcap);
        self
    }

    /// `[V]` class weights, as [`ChunkedCrossEntropy::class_weights`] (on
    /// `hidden`'s device).
    pub fn class_weights(mut self, class_weights: Option<Tensor>) -> Self {
        self.config = self.config.class_weights(class_weights);
        self
    }

    /// The loss of `hidden @ weight^T` against `labels` (for a bias and the
    /// other outputs, see [`forward_with_outputs`](Self::forward_with_outputs)).
    ///
    /// - `hidden`: `[N, H]` or `[B, S, H]`, f32, f64, bf16 or f16.
    /// - `weight`: `[V, H]` (an `lm_head`, or the tied token embedding), same
    ///   dtype and device.
    /// - `labels`, `mask` and the result: as in [`ChunkedCrossEntropy::forward`].
    ///
    /// # Errors
    /// Those of [`ChunkedCrossEntropy::forward`], and `weight` not `[V, H]`
    /// with `hidden`'s `H`, dtype and device.
    pub fn forward(&self, hidden: &Tensor, weight: &Tensor, labels: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with_num_label_tokens(hidden, weight, labels, mask, None)
    }

    /// [`forward`](Self::forward) with the global valid-token count, as in
    /// [`ChunkedCrossEntropy::forward_with_num_label_tokens`].
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
        self.config.loss(&call, num_label_tokens)
    }

    /// [`forward`](Self::forward) with per-token `loss_weights`, as
    /// [`ChunkedCrossEntropy::forward_weighted`].
    ///
    /// # Errors
    /// Those of [`forward`](Self::forward) and of
    /// [`ChunkedCrossEntropy::forward_weighted`].
    pub fn forward_weighted(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        labels: &Tensor,
        mask: Option<&Tensor>,
        loss_weights: &Tensor,
    ) -> Result<Tensor> {
        let call = self.node(hidden, weight, None, labels, mask, Some(loss_weights), None)?;
        self.config.loss(&call, None)
    }

    /// The loss of `hidden @ weight^T + bias` and every other output of the
    /// call, as [`ChunkedCrossEntropy::forward_with_outputs`].
    ///
    /// - `bias`: optional `[V]`, the weight's dtype and device; it receives a
    ///   gradient (summed over rows in f32).
    /// - `loss_weights`: optional per-token weights, as in
    ///   [`ChunkedCrossEntropy::forward_weighted`].
    /// - the other arguments: as in [`forward_with_num_label_tokens`](Self::forward_with_num_label_tokens).
    ///
    /// # Errors
    /// Those of [`forward_with_num_label_tokens`](Self::forward_with_num_label_tokens)
    /// and of [`ChunkedCrossEntropy::forward_weighted`], and a bias that is not
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
        self.config.outputs(&call, num_label_tokens)
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
        let labels_shape = labels.shape().clone();
        let ignore_index = self.config.ignore_index;
        self.config.check_num_label_tokens(num_label_tokens)?;
        if self.chunk_len == Some(0) {
            bail!("linear cross-entropy: chunk_len must be at least 1, got 0")
        }
        let hidden = checked_logits(hidden)?;
        let vocab = checked_projection(&hidden, weight, bias)?;
        let labels = checked_labels(&hidden, vocab, labels, mask, ignore_index)?;
        let width = hidden.dim(candle::D::Minus1)?;
        let rows = hidden.reshape(((), width))?;
        if labels.dim(0)? == 0 {
            // Validated like a call with tokens; then nothing to compute.
            self.config.call_weights(&rows, vocab, &labels, &labels_shape, loss_weights)?;
            self.config.op_config(hidden.device())?;
            let inputs: Vec<&Tensor> = [&hidden, weight].into_iter().chain(bias).collect();
            if let Some(call) = self.config.empty_call(&inputs, &labels, &labels_shape)? {
                return Ok(call);
            }
        }
        // The forward call's one intended device->host read (a sync on CUDA): the labels,
        // once, to check them before any chunk runs and to count the valid ones, which the
        // precomputed gradients' scale needs on the host. Everything after it only queues
        // work on the device (scalar operands are host->device copies, and `Tensor::full`
        // is a fill kernel): `labels_checked` below tells the fused CUDA forward not to
        // read its bad-label flag back after every chunk.
        let row_labels = op::row_labels(&labels.to_vec1::<i64>()?, vocab, ignore_index)?;
        let valid = row_labels.iter().flatten().count();
        let chunk_len = match self.chunk_len {
            Some(c) => c,
            None => (valid * width / vocab.max(1)).max(MIN_AUTO_CHUNK).min(valid.max(1)),
        };
        let weights = self.config.call_weights(&rows, vocab, &labels, &labels_shape, loss_weights)?;
        let cfg = OpConfig { sum_weights: weights.sum_weights.clone(), ..self.config.op_config(hidden.device())? };
        if cfg.engine == Engine::Autograd {
            let logits = Projection { weight: weight.clone(), bias: bias.cloned() }.logits(&rows)?;
            let node = primitive::row_stats_recorded(&logits, &labels, &cfg)?;
            return Ok(LossCall::Tokens(TokenCall { node, labels, labels_shape, vocab, weights }));
        }
        // Each chunk's logits are a temporary: its gradient always overwrites it.
        let cfg = OpConfig { chunk_len, inplace_grad: true, labels_checked: true, ..cfg };
        let projection = Projection { weight: weight.detach(), bias: bias.map(Tensor::detach) };
        let wanted = Wanted::of(&rows, weight, bias);
        let row_weights = weights.row_weights()?;
        let denominator = match row_weights {
            None => valid as f64,
            // A weighted mean's denominator: one more device->host read.
            Some(_) => weights.host_denominator(&labels, ignore_index)?,
        };
        let unit = self.config.unit_factors(vocab, &weights, denominator, num_label_tokens).filter(|_| wanted.any());
        let selection = RowSelection::of(&row_labels, hidden.device())?;
        let (kept_rows, kept_labels) = (selection.gather(&rows.detach())?, selection.gather(&labels)?);
        let (stats, precomputed) = match unit {
            Some(unit) => {
                let kept_weights = row_weights.as_ref().map(|w| w.map(|c| selection.gather(c))).transpose()?;
                let pass = ChunkPass { rows: &kept_rows, projection: &projection, labels: &kept_labels, cfg: &cfg };
                let (stats, gradients, boost) = pass.forward_with_gradients(unit, kept_weights.as_ref(), wanted)?;
                let (stats, gradients) = (selection.scatter(&stats)?, selection.scatter_hidden_grad(gradients)?);
                // Over all rows: an ignored row receives them too (its gradient is 0 regardless).
                let unit_factors = op::unit_factors(&stats, unit, row_weights.as_ref())?;
                (stats, Some(Precomputed { unit_factors, gradients, boost }))
            }
            None => (selection.scatter(&row_stats(&kept_rows, &projection, &kept_labels, &cfg)?)?, None),
        };
        let precomputed = Mutex::new(precomputed);
        let backward = LinearBackward { cfg, labels: kept_labels, selection, wanted, precomputed };
        let node = StatsNode { stats, backward };
        let node = match bias {
            None => rows.apply_op2(weight, node)?,
            Some(bias) => rows.apply_op3(weight, bias, node)?,
        };
        Ok(LossCall::Tokens(TokenCall { node, labels, labels_shape, vocab, weights }))
    }
}

/// Checks `weight` (`[V, H]` for `hidden`'s `H`) and `bias` (`[V]`) against
/// `hidden`'s dtype and device, and returns `V`.
fn checked_projection(hidden: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<usize> {
    let width = hidden.dim(candle::D::Minus1)?;
    let vocab = match weight.dims() {
        [v, h] if *h == width => *v,
        _ => bail!(
            "linear cross-entropy: weight {:?} must be [V, {width}] for hidden {:?}",
            weight.shape(),
            hidden.shape()
        ),
    };
    for (name, t) in [("weight", Some(weight)), ("bias", bias)] {
        let Some(t) = t else { continue };
        if t.dtype() != hidden.dtype() || !t.device().same_device(hidden.device()) {
            bail!(
                "linear cross-entropy: {name} ({:?}) and hidden ({:?}) must share dtype and device",
                t.dtype(),
                hidden.dtype()
            )
        }
    }
    if let Some(bias) = bias {
        if bias.dims() != [vocab] {
            bail!("linear cross-entropy: bias {:?} must be [{vocab}] for weight {:?}", bias.shape(), weight.shape())
        }
    }
    Ok(vocab)
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

/// Matrix products of the linear loss run on this thread, by kind (a test
/// hook: see [`linear_products`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinearProducts {
    /// `rows · Wᵀ`: a chunk's logits.
    pub logits: usize,
    /// The rows of all those logits products together (ignored rows are
    /// not multiplied).
    pub logits_rows: usize,
    /// `G · W`: a chunk's hidden-state gradient.
    pub hidden_grad: usize,
    /// `Gᵀ · H`: a chunk's weight gradient.
    pub weight_grad: usize,
}

thread_local! {
    static PRODUCTS: std::cell::Cell<LinearProducts> = const {
        std::cell::Cell::new(LinearProducts { logits: 0, logits_rows: 0, hidden_grad: 0, weight_grad: 0 })
    };
}

fn count_product(kind: fn(&mut LinearProducts) -> &mut usize) {
    count(kind, 1)
}

fn count(kind: fn(&mut LinearProducts) -> &mut usize, n: usize) {
    PRODUCTS.with(|cell| {
        let mut counts = cell.get();
        *kind(&mut counts) += n;
        cell.set(counts);
    });
}

/// The matrix products the linear loss has run on this thread so far. Not
/// part of the stable API: the tests use it to check that gradients no input
/// wants are not computed.
#[doc(hidden)]
pub fn linear_products() -> LinearProducts {
    PRODUCTS.with(std::cell::Cell::get)
}

/// The output layer, detached: `weight` `[V, H]` and an optional `bias` `[V]`.
struct Projection {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Projection {
    /// The logits of `rows` (`[n, H]`): `[n, V]`, by candle's ops (recorded
    /// for autograd when the inputs track).
    fn logits(&self, rows: &Tensor) -> Result<Tensor> {
        count_product(|c| &mut c.logits);
        count(|c| &mut c.logits_rows, rows.elem_count() / rows.dim(candle::D::Minus1)?.max(1));
        self.add_bias(rows.matmul(&self.weight.t()?)?)
    }

    /// The logits of a chunk of rows (`[n, H]`): `[n, V]`, on the CPU (f32,
    /// f64) written into `buffer`, which the chunks of one pass share (a
    /// fresh `[n, V]` per chunk would fault its pages in again: ~1.4 µs per
    /// 4 KiB here, 70 ms per 1024 x 50257 f32 chunk). The chunk's logits are
    /// dead before the next chunk's are written: each becomes its gradient in
    /// place and is folded into the sums. Nothing is recorded.
    fn chunk_logits(&self, rows: &Tensor, buffer: &mut LogitsBuffer) -> Result<Tensor> {
        let (len, vocab) = (rows.dim(0)?, self.weight.dim(0)?);
        if !gemm::ops::takes(&[rows, &self.weight]) {
            return self.logits(rows);
        }
        let shared = match &buffer.0 {
            Some(shared) if shared.dim(0)? >= len => shared.clone(),
            _ => buffer.0.insert(faulted_zeros((len, vocab), rows.dtype(), rows.device())?).clone(),
        };
        let logits = shared.narrow(0, 0, len)?;
        count_product(|c| &mut c.logits);
        count(|c| &mut c.logits_rows, len);
        gemm::ops::matmul_into(&logits, rows, &self.weight, true)?;
        self.add_bias(logits)
    }

    fn add_bias(&self, logits: Tensor) -> Result<Tensor> {
        match &self.bias {
            None => Ok(logits),
            Some(bias) => logits.broadcast_add(bias),
        }
    }
}

/// The `[chunk, V]` logits buffer of one pass over the chunks (see
/// [`Projection::chunk_logits`]); allocated by the first chunk, the largest.
#[derive(Default)]
struct LogitsBuffer(Option<Tensor>);

/// Per-row statistics `[N, 4]` (see `op.rs`) of the logits of `rows` (`[N,
/// H]`, detached), one chunk of rows at a time, nothing recorded.
fn row_stats(rows: &Tensor, projection: &Projection, labels: &Tensor, cfg: &OpConfig) -> Result<Tensor> {
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
struct Precomputed {
    unit_factors: Tensor,
    gradients: Vec<Option<Tensor>>,
    /// What `gradients` are multiplied by: a power of two that brings the
    /// factors they were formed with to order 1 (see [`boost_of`]).
    boost: f64,
}

/// A power of two that brings a scalar loss's unit factors (`1 / n` for a
/// mean over `n` tokens) to order 1. The gradients formed in the forward pass
/// are formed with the factors times it, and divided by it (exactly) once
/// the upstream gradient is known: per-token gradients of size `p / n` would
/// otherwise underflow f16 before a loss scale of, say, 2^16 reached them.
/// Other dtypes (`dtype` is the logits') have f32's exponent range and no
/// boost: backward then skips the pass that would divide it out again.
fn boost_of(unit: &UnitFactors, dtype: DType) -> f64 {
    let largest = unit.ce.abs().max(unit.lse.abs());
    if dtype == DType::F16 && largest > 0.0 && largest.is_finite() {
        2f64.powi(-largest.log2().round() as i32)
    } else {
        1.0
    }
}

/// One pass over the chunks of the linear loss's forward: its detached `[N,
/// H]` rows, the output layer, the checked `[N]` labels and the settings.
struct ChunkPass<'a> {
    rows: &'a Tensor,
    projection: &'a Projection,
    labels: &'a Tensor,
    cfg: &'a OpConfig,
}

impl ChunkPass<'_> {
    /// The statistics `[N, 4]` and, from the same logits chunks, the gradients of
    /// a scalar loss whose upstream gradient is 1 (see the module docs), with the
    /// rows' `weights` for a weighted loss, multiplied by the returned boost (see
    /// [`boost_of`]).
    fn forward_with_gradients(
        &self,
        unit: UnitFactors,
        weights: Option<&RowWeights>,
        wanted: Wanted,
    ) -> Result<(Tensor, Vec<Option<Tensor>>, f64)> {
        let Self { rows, projection, labels, cfg } = *self;
        let mut sums = GradientSums::new(rows, projection, wanted)?;
        let boost = boost_of(&unit, rows.dtype());
        let boosted = UnitFactors {
            ce: unit.ce * boost,
            lse: unit.lse * boost,
            lse_squared: unit.lse_squared * boost,
            logit_sum: unit.logit_sum * boost,
        };
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
        Ok((stats, sums.finish(projection.bias.is_some())?, boost))
    }
}

/// The gradients of the rows, the weight and the bias that are [`Wanted`],
/// summed chunk by chunk: each chunk's rows get `G · W` (in their dtype), the
/// weight `Gᵀ · H` and the bias the column sums of `G` (both accumulated in
/// f32, f64 for f64).
struct GradientSums {
    rows: Option<Tensor>,
    weight: Option<ProductSum>,
    bias: Option<Sum>,
    /// The accumulator dtype, `V` and device, for a bias that received nothing.
    acc: DType,
    vocab: usize,
    device: Device,
}

impl GradientSums {
    fn new(rows: &Tensor, projection: &Projection, wanted: Wanted) -> Result<Self> {
        let weight = &projection.weight;
        Ok(Self {
            rows: wanted.rows.then(|| faulted_zeros(rows.shape(), rows.dtype(), rows.device())).transpose()?,
            weight: wanted.weight.then(|| ProductSum::new(weight)).transpose()?,
            bias: (wanted.bias && projection.bias.is_some()).then(Sum::default),
            acc: compute_dtype(weight.dtype()),
            vocab: weight.dim(0)?,
            device: weight.device().clone(),
        })
    }

    /// Adds the chunk of rows starting at `start`, whose logits' gradient is `logits_grad`.
    fn add(&mut self, start: usize, chunk: &Tensor, logits_grad: &Tensor, projection: &Projection) -> Result<()> {
        if let Some(rows) = &self.rows {
            count_product(|c| &mut c.hidden_grad);
            // Straight into the chunk's rows of the gradient on the CPU.
            let chunk_rows = rows.narrow(0, start, chunk.dim(0)?)?;
            if !gemm::ops::matmul_into(&chunk_rows, logits_grad, &projection.weight, false)? {
                rows.slice_set(&logits_grad.matmul(&projection.weight)?, 0, start)?;
            }
        }
        if let Some(weight) = &mut self.weight {
            count_product(|c| &mut c.weight_grad);
            weight.add(logits_grad, chunk)?;
        }
        if let Some(bias) = &mut self.bias {
            bias.add(logits_grad.to_dtype(self.acc)?.sum(0)?)?;
        }
        Ok(())
    }

    /// `[rows, weight, bias]` gradients (`None` where not wanted; bias only
    /// when there is one), the weight's and bias's still in the accumulator dtype.
    fn finish(self, has_bias: bool) -> Result<Vec<Option<Tensor>>> {
        let mut gradients = vec![self.rows, self.weight.map(ProductSum::into_gradient).transpose()?];
        if has_bias {
            gradients.push(match self.bias {
                Some(Sum(Some(sum))) => Some(sum),
                Some(Sum(None)) => Some(Tensor::zeros(self.vocab, self.acc, &self.device)?),
                None => None,
            });
        }
        Ok(gradients)
    }
}

/// The node's gradients from summed ones: scaled by the upstream `scale`
/// (skipped when it is 1) in f32 (f64 for f64), where a loss scale such as
/// 2^16 is representable (candle's f16 `affine` rounds it to f16's infinity),
/// and rounded once to each input's dtype. The f32 accumulators (the weight's
/// `[V, H]`, the bias's) are ours alone: they are scaled in place, so that
/// the end of backward holds the accumulator and the rounded gradient, not a
/// scaled copy as well.
fn input_gradients(gradients: Vec<Option<Tensor>>, inputs: &[&Tensor], scale: f64) -> Result<Vec<Option<Tensor>>> {
    gradients
        .into_iter()
        .zip(inputs)
        .map(|(g, input)| {
            let Some(g) = g else { return Ok(None) };
            let compute = compute_dtype(g.dtype());
            let g = match scale {
                1.0 => g,
                _ if g.dtype() == compute => {
                    g.inplace_op1(&ScaleInPlace(scale))?;
                    g
                }
                _ => g.to_dtype(compute)?.affine(scale, 0.0)?,
            };
            Ok(Some(g.to_dtype(input.dtype())?))
        })
        .collect()
}

/// Zeros whose pages are already mapped: on the CPU the buffer is advised to
/// transparent huge pages (see `cpu::advise_huge_pages`) and one thread
/// writes one element of each 4 KiB page. A fresh buffer's first write faults
/// its pages in; when that write is the gemm crate's product, the faults land
/// inside it and cost far more than a plain pass: one 1024-row chunk's
/// weight-gradient product took 871 ms into a fresh `[768, 50257]` f32
/// accumulator, 259 ms into a touched one, 320 ms with this one-thread touch
/// included (`cargo bench --bench ce_table -- --probes`).
fn faulted_zeros(shape: impl Into<candle::Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    let zeros = Tensor::zeros(shape, dtype, device)?;
    if device.is_cpu() {
        zeros.inplace_op1(&FaultIn)?;
    }
    Ok(zeros)
}

/// See [`faulted_zeros`].
struct FaultIn;

impl candle::InplaceOp1 for FaultIn {
    fn name(&self) -> &'static str {
        "chunked-linear-cross-entropy-fault-in"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _: &Layout) -> Result<()> {
        fn touch<T: Copy>(values: &mut [T]) {
            crate::cpu::advise_huge_pages(values);
            let per_page = (4096 / std::mem::size_of::<T>()).max(1);
            if let Some(&zero) = values.first() {
                values.iter_mut().step_by(per_page).for_each(|x| *x = zero);
            }
        }
        match storage {
            CpuStorage::F32(v) => touch(v),
            CpuStorage::F64(v) => touch(v),
            CpuStorage::BF16(v) => touch(v),
            CpuStorage::F16(v) => touch(v),
            _ => {}
        }
        Ok(())
    }
}

/// `x *= scale` in place, for the gradients' f32 (f64) accumulators.
struct ScaleInPlace(f64);

impl candle::InplaceOp1 for ScaleInPlace {
    fn name(&self) -> &'static str {
        "chunked-linear-cross-entropy-scale"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        use candle::backend::BackendStorage;
        use rayon::prelude::*;
        // Contiguous, or its transpose (the CPU's weight gradient): either way
        // the elements fill one range of the storage.
        let (start, end) = match layout.contiguous_offsets() {
            Some(range) => range,
            None if layout.is_fortran_contiguous() => {
                (layout.start_offset(), layout.start_offset() + layout.shape().elem_count())
            }
            None => bail!("linear cross-entropy: the scaled gradient must be dense"),
        };
        match storage {
            CpuStorage::F32(v) => v[start..end].par_iter_mut().for_each(|x| *x *= self.0 as f32),
            CpuStorage::F64(v) => v[start..end].par_iter_mut().for_each(|x| *x *= self.0),
            other => bail!("linear cross-entropy: only f32/f64 gradients are scaled in place, got {:?}", other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle::CudaStorage, layout: &Layout) -> Result<()> {
        crate::cuda_gemm::scale_in_place(storage, layout, self.0)
    }
}

/// The rows the products run on. A row whose label is `ignore_index` adds
/// nothing to the loss or to any gradient (its statistics and its logits'
/// gradient are 0, see `op.rs`), so when some rows are ignored the products
/// run on a dense copy of the others: all three matmuls shrink by the ignored
/// share (prompt and padding tokens, often a third of a fine-tuning batch or
/// more), for a gather of the `[N, H]` rows and a scatter of their gradient.
enum RowSelection {
    /// Every row is valid: the rows as they are, no copy.
    All,
    /// The valid rows' indices (`[n_valid]` u32, ascending) among `total`;
    /// `None` when no row is valid (candle's CUDA index ops would launch an
    /// empty grid, which the driver refuses).
    Valid { index: Option<Tensor>, total: usize },
}

impl RowSelection {
    fn of(labels: &[RowLabel], device: &Device) -> Result<Self> {
        if labels.iter().all(Option::is_some) {
            return Ok(Self::All);
        }
        if u32::try_from(labels.len()).is_err() {
            bail!("linear cross-entropy: {} rows exceed the u32 row index", labels.len())
        }
        let index: Vec<u32> = (0..labels.len() as u32).filter(|&i| labels[i as usize].is_some()).collect();
        let len = index.len();
        let index = (len > 0).then(|| Tensor::from_vec(index, len, device)).transpose()?;
        Ok(Self::Valid { index, total: labels.len() })
    }

    /// The selected rows (dim 0) of `t`.
    fn gather(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Self::All => Ok(t.clone()),
            Self::Valid { index: Some(index), .. } => t.index_select(index, 0),
            Self::Valid { index: None, .. } => zero_rows(t, 0),
        }
    }

    /// The rows of `t`, one per selected row, put back in their places among
    /// all rows, with zero rows for the others.
    fn scatter(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Self::All => Ok(t.clone()),
            Self::Valid { index: Some(index), total } => zero_rows(t, *total)?.index_add(index, t, 0),
            Self::Valid { index: None, total } => zero_rows(t, *total),
        }
    }

    /// The input gradients (hidden states first, see [`GradientSums::finish`])
    /// with the hidden states' put back among all rows.
    fn scatter_hidden_grad(&self, mut gradients: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
        gradients[0] = gradients[0].take().map(|g| self.scatter(&g)).transpose()?;
        Ok(gradients)
    }
}

/// `rows` rows of zeros shaped like those of `t` (dim 0).
fn zero_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    let mut dims = t.dims().to_vec();
    dims[0] = rows;
    Tensor::zeros(dims, t.dtype(), t.device())
}

/// The automatic chunk never has fewer rows than this: thinner chunks make
/// the thin matmuls dominate (31-row chunks at N = 2048, H = 768, V = 50257
/// took 4x longer than 1024-row ones, when each chunk also allocated a `[V,
/// H]` product), and the gemm crate's `G · W` (inner dimension V) still runs
/// at 243-259 GFLOP/s on 512 rows against 282-300 on 1024 (`cargo bench
/// --bench gemm_routes`, BENCHMARKS.md).
const MIN_AUTO_CHUNK: usize = 1024;

/// `(start, len)` of each chunk of `chunk_len` rows.
fn chunks(rows: usize, chunk_len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).step_by(chunk_len).map(move |start| (start, chunk_len.min(rows - start)))
}

/// The backward of the linear loss: the gradients of `rows`, `weight` and,
/// when it is an input, `bias`. The labels are not differentiable and travel
/// inside it, with the gradients the forward pass computed, if it did. Those
/// are handed over by the first backward pass (so that the graph does not keep
/// them alive afterwards); a later backward pass over the same graph recomputes.
struct LinearBackward {
    cfg: OpConfig,
    wanted: Wanted,
    /// The rows the products run on, and their labels.
    selection: RowSelection,
    labels: Tensor,
    precomputed: Mutex<Option<Precomputed>>,
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
    fn recompute(&self, inputs: &[&Tensor], factors: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let rows = self.selection.gather(&inputs[0].detach())?;
        let factors = self.selection.gather(factors)?;
        let projection = Projection { weight: inputs[1].detach(), bias: inputs.get(2).map(|b| b.detach()) };
        let (mut sums, mut buffer) = (GradientSums::new(&rows, &projection, self.wanted)?, LogitsBuffer::default());
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
#[doc(hidden)]
pub fn recomputed_backwards() -> usize {
    RECOMPUTED_BACKWARDS.with(std::cell::Cell::get)
}

/// The scalar `u` with `received = u * unit` element-wise (to 1e-5 relative),
/// if there is one: then the gradients computed in forward, scaled by `u`, are
/// exact. Both are `[N, 3]` (a few KB); they are compared on the host, with one
/// transfer.
fn upstream_scale(received: &Tensor, unit: &Tensor) -> Result<Option<f64>> {
    let both = Tensor::cat(&[received, unit], 1)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let pairs: Vec<(f64, f64)> = both.chunks_exact(6).flat_map(|r| (0..3).map(move |i| (r[i], r[i + 3]))).collect();
    let norm: f64 = pairs.iter().map(|(_, f)| f * f).sum();
    // With a zero `unit` (nothing valid, `num_label_tokens = 0`, no rows) the
    // precomputed gradients are zeros, right only if nothing was received.
    let scale = if norm == 0.0 { 0.0 } else { pairs.iter().map(|(a, f)| a * f).sum::<f64>() / norm };
    let proportional = pairs.iter().all(|(a, f)| (a - scale * f).abs() <= 1e-5 * a.abs());
    Ok(proportional.then_some(scale))
}

/// `Σ_chunks Gᵀ · H`, the weight gradient, accumulated in f32 (f64 for f64)
/// in place, with no `[V, H]` product per chunk. On the CPU it is held
/// transposed, `[H, V]` += `Hᵀ · G` by `gemm::ops::AddTransposedProduct` (on
/// f32/f64 copies of the chunk's operands): the gemm crate runs that
/// orientation at torch's speed and the other at three quarters of it
/// (BENCHMARKS.md), and the gradient handed out is the transposed view (candle's
/// backprop copies it into its own sum anyway). On CUDA (f32, bf16, f16) one
/// cuBLAS GEMM per chunk reads the operands as they are and adds into the f32
/// `[V, H]` accumulator (`beta = 1`, see `cuda_gemm.rs`). f64 on CUDA, and
/// other devices, take candle ops: a `[V, H]` product and a new sum per chunk.
struct ProductSum {
    acc: Tensor,
    /// `acc` is `[H, V]`, the gradient transposed (the CPU).
    transposed: bool,
}

impl ProductSum {
    fn new(weight: &Tensor) -> Result<Self> {
        let dtype = compute_dtype(weight.dtype());
        let transposed = weight.device().is_cpu();
        let (vocab, width) = weight.dims2()?;
        let shape = if transposed { (width, vocab) } else { (vocab, width) };
        Ok(Self { acc: faulted_zeros(shape, dtype, weight.device())?, transposed })
    }

    fn dtype(&self) -> DType {
        self.acc.dtype()
    }

    /// Adds `lhsᵀ · rhs` (`lhs` `[k, V]`, `rhs` `[k, H]`, of the weight's dtype).
    fn add(&mut self, lhs: &Tensor, rhs: &Tensor) -> Result<()> {
        #[cfg(feature = "cuda")]
        if self.acc.device().is_cuda() && self.dtype() == DType::F32 {
            // The chunk's gradient and rows are contiguous already (no copy).
            return crate::cuda_gemm::add_transposed_product(&self.acc, &lhs.contiguous()?, &rhs.contiguous()?);
        }
        let (lhs, rhs) = (lhs.to_dtype(self.dtype())?.contiguous()?, rhs.to_dtype(self.dtype())?.contiguous()?);
        if self.transposed {
            // `[H, V] += rhsᵀ · lhs`.
            self.acc.inplace_op3(&rhs, &lhs, &gemm::ops::AddTransposedProduct)
        } else {
            self.acc = (&self.acc + lhs.t()?.matmul(&rhs)?)?;
            Ok(())
        }
    }

    /// The summed gradient, `[V, H]` (a transposed view on the CPU).
    fn into_gradient(self) -> Result<Tensor> {
        if self.transposed {
            self.acc.t()
        } else {
            Ok(self.acc)
        }
    }
}

/// A gradient summed over chunks in the accumulator dtype; the first chunk's
/// term starts the sum (no zero-filled buffer).
#[derive(Default)]
struct Sum(Option<Tensor>);

impl Sum {
    fn add(&mut self, term: Tensor) -> Result<()> {
        self.0 = Some(match self.0.take() {
            None => term,
            Some(sum) => (sum + term)?,
        });
        Ok(())
    }
}
