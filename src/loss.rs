//! The loss over logits: [`ChunkedCrossEntropy`] and NeMo's
//! [`compute_cross_entropy`]. Every argument is validated once (`call/`); the
//! ops behind receive `[.., V]` logits with a unit-stride vocabulary dim and
//! `[N]` contiguous i64 labels with masked rows already set to `ignore_index`.

use crate::call::{
    checked_labels, checked_logits, CallLabels, CallWeights, ClassWeights, CrossEntropyOutput, LossCall, Reduction,
    Settings, TokenCall,
};
use crate::candle_limits::check_cuda_elements;
use crate::config::{Engine, OpConfig};
use crate::op::{self, LogitsBackward, StatsNode};
use crate::precomputed::{boost_of, PrecomputedGrad};
use crate::primitive;
use candle::{bail, Result, Tensor};

/// Chunked, fused cross-entropy over `[N, V]` or `[B, S, V]` logits, after
/// NVIDIA NeMo AutoModel's `ChunkedCrossEntropy`, with a hand-written backward.
///
/// The whole loss is one node of candle's graph. Its forward reduces each row
/// in f32 (f64 for f64 logits) without materialising any `[N, V]` buffer; its
/// backward writes `(softmax(x) - onehot(y)) * upstream / n` straight into one
/// gradient buffer in the logits' dtype (or into the logits themselves with
/// [`inplace_grad`](Self::inplace_grad)).
///
/// | setting | default | meaning |
/// |---|---|---|
/// | `chunk_len` | 32 | rows per CPU work unit; with `compile = false`, the rows of each `[chunk_len, V]` f32 temporary (the fused kernels need no `[N, V]` scratch at all) |
/// | `compile` | `true` | fused kernels, CPU or CUDA (`true`), or candle's primitive ops chunk by chunk (`false`) |
/// | `ignore_index` | -100 | label value whose token contributes no loss and no gradient |
/// | `reduction` | [`Reduction::Mean`] | mean over valid tokens, sum, or per-token |
/// | `inplace_grad` | `false` | write the gradient over the logits (destroys them; needs `compile = true`) |
/// | `grad_in_forward` | `false` | form the gradient in the forward pass (two passes over the logits instead of three; a scalar loss only) |
/// | `label_smoothing` | 0 | PyTorch's `label_smoothing`: `(1 - ε) ce + ε (lse - mean_j x_j)` |
/// | `z_loss` | 0 | coefficient `z` of the z-loss `z · lse²` added to each token's loss |
/// | `logit_softcap` | `None` | Gemma 2's soft-cap: the loss sees `cap · tanh(x / cap)` |
/// | `class_weights` | `None` | PyTorch's `weight`: a `[V]` weight per class (see below) |
///
/// # Weights
/// Class weights `c` ([`class_weights`](Self::class_weights)) and per-token
/// loss weights `t` (the `loss_weights` of
/// [`forward_with_outputs`](Self::forward_with_outputs) and
/// [`forward_weighted`](Self::forward_weighted)) weight each valid token's
/// loss as
///
/// ```text
/// loss = t [c_y (1 - ε) ce + ε / V Σ_j c_j (lse - x_j) + z lse²]
/// ```
///
/// which is PyTorch's `F.cross_entropy(weight=c, label_smoothing=ε)` for `t
/// = 1, z = 0`, and NeMo's per-token `loss_weights` for `c = 1`. `Mean`
/// divides the sum by the summed weights `Σ t c_y` of the valid tokens (the
/// valid-token count without weights; 1 where that sum is 0), or by
/// `num_label_tokens` when given. The per-token outputs are weighted; token
/// accuracy is not.
///
/// [`forward_with_outputs`](Self::forward_with_outputs) also returns the
/// z-loss apart, per-token losses, per-token log-sum-exp and token accuracy,
/// all from the same pass over the logits.
///
/// # Divergences from PyTorch's `F.cross_entropy`
/// - When every token is ignored (or `num_label_tokens` is 0, or there are no
///   tokens) the loss and its gradient are exactly 0; PyTorch gives NaN.
/// - bf16/f16 logits are reduced in f32 and the loss is f32; the gradient is
///   formed in f32 and rounded once to the logits' dtype.
/// - NaN or `+inf` in a valid row's logits make that row's loss NaN, as in
///   PyTorch (so that mixed-precision loss scalers can see the overflow);
///   ignored rows are never read.
/// - A confident token's loss and gradient (`p_y -> 1`) keep full f32
///   precision, where PyTorch's `lse - x_y` and `softmax - 1` cancel.
/// - Labels at masked positions are ignored without being range-checked.
///
/// # Devices the kernels do not cover
/// The loss's node and its fused kernels are custom ops, implemented for the
/// CPU and, with this crate's `cuda` feature, CUDA. On any other device
/// (Metal, or CUDA when candle has it through another crate but this crate
/// was built without `cuda`) the loss runs candle's primitive ops (the
/// `compile = false` maths) recorded in the graph, and candle's autograd
/// differentiates them: same options, outputs, semantics and errors, but
/// several `[N, V]` f32 temporaries kept for backward (as
/// `candle_nn::loss::cross_entropy`), `chunk_len` and `compile` without
/// effect, and `inplace_grad` ignored (candle's backprop allocates the
/// gradient). The soft-cap's slope is then candle's `1 - tanh²`, exact to
/// about 1e-7 absolute where the cap saturates.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkedCrossEntropy {
    settings: Settings,
}

impl Default for ChunkedCrossEntropy {
    fn default() -> Self {
        Self::new(32, true, -100)
    }
}

impl ChunkedCrossEntropy {
    /// The NeMo constructor: `ChunkedCrossEntropy(chunk_len, compile,
    /// ignore_index)`, with [`Reduction::Mean`] and `inplace_grad = false`.
    /// `chunk_len` is checked when the loss is computed (0 is an error).
    pub fn new(chunk_len: usize, compile: bool, ignore_index: i64) -> Self {
        Self { settings: Settings::new(chunk_len, compile, ignore_index) }
    }

    /// Sets the number of rows per work unit (at least 1).
    pub fn chunk_len(mut self, chunk_len: usize) -> Self {
        self.settings.chunk_len = chunk_len;
        self
    }

    /// Selects the fused kernels (`true`) or candle's primitive ops (`false`).
    pub fn compile(mut self, compile: bool) -> Self {
        self.settings.compile = compile;
        self
    }

    /// Sets the label value that marks a token to ignore.
    pub fn ignore_index(mut self, ignore_index: i64) -> Self {
        self.settings.ignore_index = ignore_index;
        self
    }

    /// Sets how per-token losses are combined.
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.settings.reduction = reduction;
        self
    }

    /// Writes the gradient into the logits' storage during backward, saving one
    /// `[N, V]` buffer. The logits hold the gradient afterwards: use it only
    /// when nothing else reads the logits after the loss's backward (true for
    /// logits straight out of an `lm_head` matmul). Requires `compile = true`.
    /// Ignored on a device the kernels do not cover (see the type's docs).
    pub fn inplace_grad(mut self, inplace_grad: bool) -> Self {
        self.settings.inplace_grad = inplace_grad;
        self
    }

    /// Forms the gradient of the reduced loss in the forward pass, as Liger
    /// does: each row is read for its statistics, then again (on CUDA mostly
    /// from L2) to write its gradient, two passes over the logits where a
    /// forward and a separate backward make three. Backward then only checks
    /// its upstream gradient and, unless it is 1, scales.
    ///
    /// - With [`inplace_grad`](Self::inplace_grad) the gradient is written
    ///   over the logits during forward (on CUDA in one kernel with the
    ///   statistics): the logits must not be read after the loss's forward
    ///   (true for logits straight out of an `lm_head` matmul, not for the
    ///   output of an op whose backward reads its own output, such as
    ///   candle's `tanh`). If the backward pass then reaches the loss's
    ///   statistics other than through the reduced loss times a scalar (a
    ///   per-token output of [`forward_with_outputs`](Self::forward_with_outputs)
    ///   weighted per token, say), it fails with an error: the logits are gone.
    /// - Without it, the gradient goes to a fresh buffer, held from forward
    ///   to the first backward pass; the logits are kept, and a backward pass
    ///   of any other form runs the backward kernels on them instead.
    ///
    /// The scalar upstream gradient costs a pass over the gradient when it is
    /// not 1 (a loss scale, `1 / k` for gradient accumulation:
    /// `num_label_tokens` needs none), and always in f16: there the gradient
    /// is formed times the power of two nearest the mean's count (f16 would
    /// flush `p / n` to zero before a loss scale reached it), which f16 logits
    /// hold in place until backward divides it out. Needs a scalar loss
    /// ([`Reduction::Mean`] or [`Reduction::Sum`]), and the labels on the host
    /// in forward, checked and counted before any logit is overwritten: the
    /// caller's, when they are on the CPU, else read back from the device (a
    /// synchronisation on CUDA). Ignored on a
    /// device the kernels do not cover (see the type's docs).
    pub fn grad_in_forward(mut self, grad_in_forward: bool) -> Self {
        self.settings.grad_in_forward = grad_in_forward;
        self
    }

    /// Sets the label smoothing `ε` in `[0, 1]`, as PyTorch's
    /// `cross_entropy(label_smoothing=ε)`: each valid token's loss becomes
    /// `(1 - ε) ce + ε (lse - Σ_j x_j / V)`.
    pub fn label_smoothing(mut self, label_smoothing: f64) -> Self {
        self.settings.label_smoothing = label_smoothing;
        self
    }

    /// Sets the z-loss coefficient `z >= 0`: `z · lse²` is added to each valid
    /// token's loss (PaLM's auxiliary loss that keeps the log-partition near 0).
    pub fn z_loss(mut self, z_loss: f64) -> Self {
        self.settings.z_loss = z_loss;
        self
    }

    /// Soft-caps the logits before the loss, as Gemma 2: `cap · tanh(x / cap)`
    /// with `cap > 0`, differentiated through in backward. `None` disables it.
    pub fn logit_softcap(mut self, logit_softcap: Option<f64>) -> Self {
        self.settings.logit_softcap = logit_softcap;
        self
    }

    /// Sets the class weights `c`, as PyTorch's `cross_entropy(weight=c)`: a
    /// `[V]` float tensor (any float dtype) on the logits' device, finite and
    /// `>= 0`. A valid token's loss becomes `c_y ce` (and the smoothing term
    /// `ε / V Σ_j c_j (lse - x_j)`), and `Mean` divides by the summed class
    /// weights of the valid tokens' targets (see the type's docs). `None`
    /// (the default) weighs every class 1. Checked when the loss is computed.
    pub fn class_weights(mut self, class_weights: Option<Tensor>) -> Self {
        self.settings.class_weights = class_weights.map(ClassWeights);
        self
    }

    /// Runs the loss as on a device the kernels do not cover (see the type's
    /// docs), whatever the device: the tests hold that path against the
    /// engines on the CPU, where it would otherwise never run. A test hook
    /// (feature `testing`).
    #[cfg(feature = "testing")]
    pub fn force_autograd(mut self, force_autograd: bool) -> Self {
        self.settings.force_autograd = force_autograd;
        self
    }

    /// The loss of `logits` against `labels`.
    ///
    /// - `logits`: `[N, V]` or `[B, S, V]`, f32, f64, bf16 or f16, any strides.
    /// - `labels`: `[N]` or `[B, S]` (the logits' shape without `V`), u8, u32,
    ///   i16, i32 or i64; each in `[0, V)` or equal to `ignore_index`. Never
    ///   modified. On the logits' device, or on the CPU: there they are
    ///   checked without a read from the GPU (which waits for all the work
    ///   queued before it) and copied to it; batches built on the host can keep
    ///   their labels and mask there.
    /// - `mask`: optional, same shape as `labels`, any integer or float dtype
    ///   of 8 to 64 bits (not the packed F6, F4 or F8E8M0), on the labels'
    ///   device; tokens where it is 0 are ignored.
    ///
    /// Returns an f32 tensor (f64 for f64 logits): a scalar for
    /// [`Reduction::Mean`] and [`Reduction::Sum`], the labels' shape for
    /// [`Reduction::None`]. Differentiable with respect to the logits.
    ///
    /// # Errors
    /// A `candle::Error` naming the problem for: logits of rank other than 2 or
    /// 3, or not a float dtype; labels not integer or not shaped like the
    /// logits without `V`; a mask of another shape or of a packed dtype; a
    /// label outside `[0, V)`
    /// that is not `ignore_index` (the message gives the row and the value);
    /// `V = 0` with tokens present; `chunk_len = 0`; `inplace_grad` with
    /// `compile = false`; `label_smoothing` outside `[0, 1]`, a negative or
    /// non-finite `z_loss`, a soft-cap that is not positive and finite;
    /// `grad_in_forward` with [`Reduction::None`]; labels on a device other
    /// than the logits' and the CPU, a mask on another device than the labels;
    /// on CUDA, logits of `2^32 - 2^24` elements or more that have a gradient
    /// (candle's backward adds it), need a copy to a unit-stride `V` or go
    /// through `force_autograd`: candle's own CUDA kernels count elements in
    /// 32 bits and would take over 100 times their work or never finish (our
    /// kernels count in 64 bits: detached logits of any size are fine).
    pub fn forward(&self, logits: &Tensor, labels: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with_num_label_tokens(logits, labels, mask, None)
    }

    /// [`forward`](Self::forward) for gradient accumulation and data
    /// parallelism: with [`Reduction::Mean`], the summed loss is divided by
    /// `num_label_tokens` (the global count of valid tokens across all
    /// micro-batches and ranks) instead of this call's own count, so that the
    /// accumulated gradients equal one big batch's. `Some(0)` gives a loss and
    /// gradient of exactly 0. `None` behaves like [`forward`](Self::forward).
    ///
    /// # Errors
    /// Those of [`forward`](Self::forward), and `num_label_tokens` given with a
    /// reduction other than [`Reduction::Mean`].
    pub fn forward_with_num_label_tokens(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: Option<&Tensor>,
        num_label_tokens: Option<usize>,
    ) -> Result<Tensor> {
        let call = self.node(logits, labels, mask, None, num_label_tokens)?;
        self.settings.loss(&call, num_label_tokens)
    }

    /// [`forward`](Self::forward) with per-token `loss_weights` (NeMo's
    /// `loss_weights`): each token's loss is multiplied by its weight before
    /// the reduction, and `Mean` divides by the summed weights of the valid
    /// tokens (see the type's docs).
    ///
    /// - `loss_weights`: the labels' shape (`[N]` or `[B, S]`), any float
    ///   dtype, on the logits' device, finite and `>= 0`.
    ///
    /// # Errors
    /// Those of [`forward`](Self::forward), and `loss_weights` of another
    /// shape, not a float dtype, on another device, or holding a negative or
    /// non-finite value (the message names the first such token).
    pub fn forward_weighted(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: Option<&Tensor>,
        loss_weights: &Tensor,
    ) -> Result<Tensor> {
        let call = self.node(logits, labels, mask, Some(loss_weights), None)?;
        self.settings.loss(&call, None)
    }

    /// [`forward_with_num_label_tokens`](Self::forward_with_num_label_tokens),
    /// with optional per-token `loss_weights` (as in
    /// [`forward_weighted`](Self::forward_weighted)), returning every output
    /// of the call: the loss, the z-loss apart, per-token losses and
    /// log-sum-exp, and token accuracy. They come from the same pass over the
    /// logits; the extra outputs cost only a few `[N]` ops.
    ///
    /// # Errors
    /// Those of [`forward_with_num_label_tokens`](Self::forward_with_num_label_tokens)
    /// and of [`forward_weighted`](Self::forward_weighted).
    pub fn forward_with_outputs(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: Option<&Tensor>,
        loss_weights: Option<&Tensor>,
        num_label_tokens: Option<usize>,
    ) -> Result<CrossEntropyOutput> {
        let call = self.node(logits, labels, mask, loss_weights, num_label_tokens)?;
        self.settings.outputs(&call, num_label_tokens)
    }

    /// Validates the inputs and attaches the loss's graph node (its `[N, 4]`
    /// statistics). With `Engine::Autograd` the statistics are recorded op
    /// by op instead, with no node.
    fn node(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: Option<&Tensor>,
        loss_weights: Option<&Tensor>,
        num_label_tokens: Option<usize>,
    ) -> Result<LossCall> {
        let labels_shape = labels.shape().clone();
        let cfg = self.settings.op_config(logits.device())?;
        self.settings.check_num_label_tokens(num_label_tokens)?;
        let (logits, call_labels, cfg) = self.checked_inputs(logits, labels, mask, &cfg)?;
        let labels = call_labels.tensor.clone();
        let vocab = logits.dim(candle::D::Minus1)?;
        let weights = self.settings.call_weights(&logits, vocab, &labels, &labels_shape, loss_weights)?;
        if let Some(call) = self.settings.empty_call(&[&logits], &labels, &labels_shape)? {
            return Ok(call);
        }
        let cfg = OpConfig { sum_weights: weights.sum_weights.clone(), ..cfg };
        let node = if cfg.engine == Engine::Autograd {
            primitive::row_stats_recorded(&logits, &labels, &cfg)?
        } else {
            let (stats, precomputed) = match self.settings.grad_in_forward {
                true => self.stats_and_grad(&logits, &call_labels, &cfg, vocab, &weights, num_label_tokens)?,
                false => (op::row_stats(&logits, &labels, &cfg)?, None),
            };
            let backward = LogitsBackward { cfg, labels: labels.clone(), precomputed };
            logits.apply_op1(StatsNode { stats, backward })?
        };
        Ok(LossCall::Tokens(TokenCall { node, labels, labels_shape, vocab, weights }))
    }

    /// The statistics `[N, 4]` and the gradient of the reduced loss, formed
    /// together (`grad_in_forward`): the labels on the host first (read back
    /// unless the caller's were there: one synchronisation on CUDA), checked
    /// before any logit is overwritten and counted for a `Mean`'s factor (a
    /// weighted mean's denominator is one more read).
    fn stats_and_grad(
        &self,
        logits: &Tensor,
        call_labels: &CallLabels,
        cfg: &OpConfig,
        vocab: usize,
        weights: &CallWeights,
        num_label_tokens: Option<usize>,
    ) -> Result<(Tensor, Option<PrecomputedGrad>)> {
        let ignore_index = self.settings.ignore_index;
        let labels = &call_labels.tensor;
        let row_labels = op::row_labels(&call_labels.host_values()?, vocab, ignore_index)?;
        let cfg = OpConfig { labels_checked: true, ..cfg.clone() };
        let row_weights = weights.row_weights()?;
        let denominator = match (&row_weights, self.settings.reduction, num_label_tokens) {
            (Some(_), Reduction::Mean, None) => weights.host_denominator(labels, ignore_index)?,
            _ => row_labels.iter().flatten().count() as f64,
        };
        let Some(unit) = self.settings.unit_factors(vocab, weights, denominator, num_label_tokens) else {
            bail!("chunked cross-entropy: grad_in_forward needs a scalar loss (Reduction::Mean or Reduction::Sum)")
        };
        let boost = boost_of(&unit, logits.dtype());
        let (stats, grad) =
            op::row_stats_and_unit_grad(logits, labels, &cfg, unit.scaled(boost), row_weights.as_ref())?;
        let unit_factors = op::unit_factors(&stats, unit, row_weights.as_ref())?;
        Ok((stats, Some(PrecomputedGrad::new(grad, unit_factors, boost, cfg.inplace_grad))))
    }

    /// The two ops of a `Reduction::Mean` loss timed apart, for the benchmarks:
    /// the forward op's row statistics `[N, 4]`, then the backward op's
    /// gradient (upstream gradient 1), each timed between device
    /// synchronisations; with `grad_in_forward`, the op that forms both,
    /// timed as the forward, and a zero backward. A benchmarks' hook (feature
    /// `testing`).
    #[cfg(feature = "testing")]
    pub fn bench_ops(
        &self,
        logits: &Tensor,
        labels: &Tensor,
    ) -> Result<(std::time::Duration, std::time::Duration, Tensor)> {
        let cfg = self.settings.op_config(logits.device())?;
        let (logits, call_labels, cfg) = self.checked_inputs(logits, labels, None, &cfg)?;
        let labels = call_labels.tensor.clone();
        let device = logits.device();
        if self.settings.grad_in_forward {
            let valid = call_labels.host_values()?.iter().filter(|&&l| l != self.settings.ignore_index).count();
            let unit = crate::config::UnitFactors {
                ce: 1.0 / valid.max(1) as f64,
                lse: 0.0,
                lse_squared: 0.0,
                logit_sum: 0.0,
            };
            device.synchronize()?;
            let start = std::time::Instant::now();
            let cfg = OpConfig { labels_checked: true, ..cfg };
            let (_, grad) = op::row_stats_and_unit_grad(&logits, &labels, &cfg, unit, None)?;
            device.synchronize()?;
            return Ok((start.elapsed(), std::time::Duration::ZERO, grad));
        }
        device.synchronize()?;
        let start = std::time::Instant::now();
        let stats = op::row_stats(&logits, &labels, &cfg)?;
        device.synchronize()?;
        let forward = start.elapsed();
        let count = crate::call::valid_count(&labels, self.settings.ignore_index, stats.dtype())?;
        let g_ce = count.recip()?.broadcast_as((labels.dim(0)?, 1))?;
        let zeros = g_ce.zeros_like()?;
        let factors = crate::config::backward_factors(&Tensor::cat(&[&g_ce, &zeros, &zeros], 1)?, &stats)?;
        device.synchronize()?;
        let start = std::time::Instant::now();
        let grad = op::logits_grad(&logits, &labels, &factors, &cfg)?;
        device.synchronize()?;
        Ok((forward, start.elapsed(), grad))
    }

    /// Validates logits, labels and mask (see [`forward`](Self::forward)) and
    /// returns the logits with a unit-stride vocabulary dim, the labels (see
    /// [`CallLabels`]) and the `cfg` to run them with: labels checked on the
    /// host when they are there (no device read) or when candle's ops would not
    /// check them (`labels_checked`); the fused kernels check the others.
    fn checked_inputs(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: Option<&Tensor>,
        cfg: &OpConfig,
    ) -> Result<(Tensor, CallLabels, OpConfig)> {
        if logits.track_op() || cfg.engine == Engine::Autograd {
            check_cuda_elements(logits.device(), logits.elem_count(), || {
                format!(
                    "chunked cross-entropy: logits {:?} whose gradient candle's backward adds (or that candle's ops \
                     reduce, with force_autograd): use LinearCrossEntropy (no [N, V] logits or gradient), or form \
                     the logits of fewer tokens a call",
                    logits.shape()
                )
            })?;
        }
        let logits = checked_logits(logits)?;
        let vocab = logits.dim(candle::D::Minus1)?;
        let labels = checked_labels(&logits, vocab, labels, mask, self.settings.ignore_index)?;
        let on_host = labels.on_host() || cfg.engine != Engine::Fused;
        if on_host {
            // candle's ops (whose `gather` may not check its indices on every device) need
            // them checked here; for the fused kernels it spares reading their flag back.
            op::row_labels(&labels.host_values()?, vocab, self.settings.ignore_index)?;
        }
        Ok((logits, labels, OpConfig { labels_checked: cfg.labels_checked || on_host, ..cfg.clone() }))
    }
}

/// The sum over rows of the f32 cross-entropy of `logits` (`[N, V]` or `[B, S,
/// V]`, any float dtype) against `targets` (`[N]` or `[B, S]`, integer),
/// skipping rows whose target is `ignore_index`: NeMo's
/// `compute_cross_entropy`. An f32 scalar (f64 for f64 logits), differentiable
/// with respect to the logits. Uses the fused kernels with the default
/// `chunk_len`.
///
/// # Errors
/// As [`ChunkedCrossEntropy::forward`].
pub fn compute_cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    ChunkedCrossEntropy::default().ignore_index(ignore_index).reduction(Reduction::Sum).forward(logits, targets, None)
}
