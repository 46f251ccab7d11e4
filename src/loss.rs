//! The public API: [`ChunkedCrossEntropy`], [`Reduction`] and
//! [`compute_cross_entropy`]. Every argument is validated here, once; the ops
//! behind receive `[.., V]` logits with a unit-stride vocabulary dim and `[N]`
//! contiguous i64 labels with masked rows already set to `ignore_index`.

use crate::config::{backward_factors, compute_dtype, Engine, OpConfig, RowTerms, Stat, UnitFactors};
use crate::empty::EmptyCall;
use crate::op::{self, LogitsBackward, RowWeights, StatsNode};
use crate::primitive;
use candle::{bail, DType, Device, Result, Shape, Tensor};

/// How per-token losses are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Sum of the per-token losses divided by the number of valid tokens (or
    /// by `num_label_tokens` when given). A scalar.
    #[default]
    Mean,
    /// Sum of the per-token losses. A scalar.
    Sum,
    /// The per-token losses, shaped like the labels (`[N]` or `[B, S]`), 0 on
    /// ignored tokens.
    None,
}

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
    chunk_len: usize,
    compile: bool,
    pub(crate) ignore_index: i64,
    reduction: Reduction,
    inplace_grad: bool,
    label_smoothing: f64,
    z_loss: f64,
    logit_softcap: Option<f64>,
    class_weights: Option<ClassWeights>,
    force_autograd: bool,
}

/// The `[V]` class weights of a loss configuration. Two configurations are
/// equal when they hold the same tensor (candle's `Tensor::id`), not merely
/// equal values: comparing values would read them back from the device.
#[derive(Debug, Clone)]
struct ClassWeights(Tensor);

impl PartialEq for ClassWeights {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

/// Everything one loss call computes, from one pass over the logits.
///
/// Per-token tensors have the labels' shape (`[N]` or `[B, S]`) and the
/// loss's dtype (f32, f64 for f64 logits), and are 0 on ignored tokens.
#[derive(Debug, Clone)]
pub struct CrossEntropyOutput {
    /// The loss, reduced as configured; it includes the z-loss term.
    /// Differentiable.
    pub loss: Tensor,
    /// The z-loss part of `loss` (`z · lse²` per token), reduced the same way:
    /// for logging (its gradient already flows through `loss`). 0 when
    /// `z_loss` is 0.
    pub z_loss: Tensor,
    /// Each token's loss, before reduction. Differentiable.
    pub token_losses: Tensor,
    /// Each token's log-sum-exp of the (soft-capped) logits.
    pub lse: Tensor,
    /// The fraction of valid tokens whose logits' first argmax is the label:
    /// a scalar, 0 when no token is valid. Not differentiable.
    pub token_accuracy: Tensor,
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
        Self {
            chunk_len,
            compile,
            ignore_index,
            reduction: Reduction::Mean,
            inplace_grad: false,
            label_smoothing: 0.0,
            z_loss: 0.0,
            logit_softcap: None,
            class_weights: None,
            force_autograd: false,
        }
    }

    /// Sets the number of rows per work unit (at least 1).
    pub fn chunk_len(mut self, chunk_len: usize) -> Self {
        self.chunk_len = chunk_len;
        self
    }

    /// Selects the fused kernels (`true`) or candle's primitive ops (`false`).
    pub fn compile(mut self, compile: bool) -> Self {
        self.compile = compile;
        self
    }

    /// Sets the label value that marks a token to ignore.
    pub fn ignore_index(mut self, ignore_index: i64) -> Self {
        self.ignore_index = ignore_index;
        self
    }

    /// Sets how per-token losses are combined.
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Writes the gradient into the logits' storage during backward, saving one
    /// `[N, V]` buffer. The logits hold the gradient afterwards: use it only
    /// when nothing else reads the logits after the loss's backward (true for
    /// logits straight out of an `lm_head` matmul). Requires `compile = true`.
    /// Ignored on a device the kernels do not cover (see the type's docs).
    pub fn inplace_grad(mut self, inplace_grad: bool) -> Self {
        self.inplace_grad = inplace_grad;
        self
    }

    /// Sets the label smoothing `ε` in `[0, 1]`, as PyTorch's
    /// `cross_entropy(label_smoothing=ε)`: each valid token's loss becomes
    /// `(1 - ε) ce + ε (lse - Σ_j x_j / V)`.
    pub fn label_smoothing(mut self, label_smoothing: f64) -> Self {
        self.label_smoothing = label_smoothing;
        self
    }

    /// Sets the z-loss coefficient `z >= 0`: `z · lse²` is added to each valid
    /// token's loss (PaLM's auxiliary loss that keeps the log-partition near 0).
    pub fn z_loss(mut self, z_loss: f64) -> Self {
        self.z_loss = z_loss;
        self
    }

    /// Soft-caps the logits before the loss, as Gemma 2: `cap · tanh(x / cap)`
    /// with `cap > 0`, differentiated through in backward. `None` disables it.
    pub fn logit_softcap(mut self, logit_softcap: Option<f64>) -> Self {
        self.logit_softcap = logit_softcap;
        self
    }

    /// Sets the class weights `c`, as PyTorch's `cross_entropy(weight=c)`: a
    /// `[V]` float tensor (any float dtype) on the logits' device, finite and
    /// `>= 0`. A valid token's loss becomes `c_y ce` (and the smoothing term
    /// `ε / V Σ_j c_j (lse - x_j)`), and `Mean` divides by the summed class
    /// weights of the valid tokens' targets (see the type's docs). `None`
    /// (the default) weighs every class 1. Checked when the loss is computed.
    pub fn class_weights(mut self, class_weights: Option<Tensor>) -> Self {
        self.class_weights = class_weights.map(ClassWeights);
        self
    }

    /// Runs the loss as on a device the kernels do not cover (see the type's
    /// docs), whatever the device: the tests hold that path against the
    /// engines on the CPU, where it would otherwise never run. Not part of the
    /// stable API.
    #[doc(hidden)]
    pub fn force_autograd(mut self, force_autograd: bool) -> Self {
        self.force_autograd = force_autograd;
        self
    }

    /// The loss of `logits` against `labels`.
    ///
    /// - `logits`: `[N, V]` or `[B, S, V]`, f32, f64, bf16 or f16, any strides.
    /// - `labels`: `[N]` or `[B, S]` (the logits' shape without `V`), u8, u32,
    ///   i16, i32 or i64; each in `[0, V)` or equal to `ignore_index`. Never
    ///   modified.
    /// - `mask`: optional, same shape as `labels`, any integer or float dtype
    ///   of 8 to 64 bits (not the packed F6, F4 or F8E8M0); tokens where it is
    ///   0 are ignored.
    ///
    /// Returns an f32 tensor (f64 for f64 logits): a scalar for
    /// [`Reduction::Mean`] and [`Reduction::Sum`], the labels' shape for
    /// [`Reduction::None`]. Differentiable with respect to the logits.
    ///
    /// # Errors
    /// A `candle::Error` naming the problem for: logits of rank other than 2 or
    /// 3, or not a float dtype; labels not integer or not shaped like the
    /// logits without `V`; a mask of another shape, of a packed dtype, or on
    /// another device; a label outside `[0, V)`
    /// that is not `ignore_index` (the message gives the row and the value);
    /// `V = 0` with tokens present; `chunk_len = 0`; `inplace_grad` with
    /// `compile = false`; `label_smoothing` outside `[0, 1]`, a negative or
    /// non-finite `z_loss`, a soft-cap that is not positive and finite; logits
    /// and labels on different devices.
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
        self.loss(&call, num_label_tokens)
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
        self.loss(&call, None)
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
        self.outputs(&call, num_label_tokens)
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
        let cfg = self.op_config(logits.device())?;
        self.check_num_label_tokens(num_label_tokens)?;
        let (logits, labels) = self.checked_inputs(logits, labels, mask, &cfg)?;
        let vocab = logits.dim(candle::D::Minus1)?;
        let weights = self.call_weights(&logits, vocab, &labels, &labels_shape, loss_weights)?;
        if let Some(call) = self.empty_call(&[&logits], &labels, &labels_shape)? {
            return Ok(call);
        }
        let cfg = OpConfig { sum_weights: weights.sum_weights.clone(), ..cfg };
        let node = if cfg.engine == Engine::Autograd {
            primitive::row_stats_recorded(&logits, &labels, &cfg)?
        } else {
            let stats = op::row_stats(&logits, &labels, &cfg)?;
            let backward = LogitsBackward { cfg, labels: labels.clone() };
            logits.apply_op1(StatsNode { stats, backward })?
        };
        Ok(LossCall::Tokens(TokenCall { node, labels, labels_shape, vocab, weights }))
    }

    /// The call over `inputs` when it has no token (`labels` is `[0]`) and the
    /// kernels cover their device (see [`EmptyCall`]); `None` otherwise.
    pub(crate) fn empty_call(
        &self,
        inputs: &[&Tensor],
        labels: &Tensor,
        labels_shape: &Shape,
    ) -> Result<Option<LossCall>> {
        let device = inputs[0].device();
        if labels.dim(0)? > 0 || !op::kernels_cover(device.location()) {
            return Ok(None);
        }
        let call = EmptyCall::new(inputs, compute_dtype(inputs[0].dtype()));
        Ok(Some(LossCall::Empty { call, labels_shape: labels_shape.clone() }))
    }

    /// The shape of a reduced output: a scalar, or the labels' shape for
    /// [`Reduction::None`].
    fn reduced_shape(&self, labels_shape: &Shape) -> Shape {
        match self.reduction {
            Reduction::None => labels_shape.clone(),
            Reduction::Mean | Reduction::Sum => Shape::from(()),
        }
    }

    /// Validates the call's class weights (`[V]`) and `loss_weights` (the
    /// labels' shape) and brings them to the loss's dtype on the device of
    /// `inputs` (the logits, or the linear loss's hidden states, whose dtype
    /// the loss's follows). `labels` (`[N]` i64) are already checked.
    pub(crate) fn call_weights(
        &self,
        inputs: &Tensor,
        vocab: usize,
        labels: &Tensor,
        labels_shape: &Shape,
        loss_weights: Option<&Tensor>,
    ) -> Result<CallWeights> {
        let dtype = compute_dtype(inputs.dtype());
        let mut weights = CallWeights { mean_class: 1.0, ..CallWeights::default() };
        let class = match &self.class_weights {
            Some(ClassWeights(class)) => {
                Some(checked_weights("class_weights", class, &[vocab], "[V] for the logits' V", inputs)?)
            }
            None => None,
        };
        let token = match loss_weights {
            Some(token) => {
                Some(checked_weights("loss_weights", token, labels_shape.dims(), "the labels' shape", inputs)?)
            }
            None => None,
        };
        // Without tokens (and so with V = 0) there is nothing to weigh: no op on empty tensors.
        if labels.dim(0)? == 0 {
            return Ok(weights);
        }
        if let Some(class) = class {
            let total: f64 = class.to_dtype(DType::F64)?.sum_all()?.to_scalar()?;
            weights.mean_class = total / vocab as f64;
            let valid = labels.ne(self.ignore_index as f64)?;
            let safe = valid.where_cond(labels, &labels.zeros_like()?)?;
            let class = class.to_dtype(dtype)?;
            weights.target_class = Some((class.gather(&safe, 0)? * valid.to_dtype(dtype)?)?);
            weights.sum_weights = Some(class).filter(|_| self.label_smoothing > 0.0);
        }
        if let Some(token) = token {
            weights.token = Some(token.flatten_all()?.to_dtype(dtype)?);
        }
        Ok(weights)
    }

    /// The per-token terms composed from the node's `[N, 4]` statistics (the
    /// formula is in `op.rs`).
    fn token_terms(&self, node: &Tensor, vocab: usize, weights: &CallWeights) -> Result<TokenTerms> {
        let column = |stat: Stat| stat.of(node)?.squeeze(1);
        let (ce, lse, logit_sum, correct) =
            (column(Stat::Ce)?, column(Stat::Lse)?, column(Stat::LogitSum)?, column(Stat::Correct)?);
        // Terms with a zero coefficient are left out, not multiplied by 0: the
        // default loss stays the bare `ce` column.
        let mut losses = match &weights.target_class {
            Some(target_class) => (&ce * target_class)?,
            None => ce,
        };
        if self.label_smoothing > 0.0 {
            let eps = self.label_smoothing;
            let smooth = (lse.affine(eps * weights.mean_class, 0.0)? - logit_sum.affine(eps / vocab as f64, 0.0)?)?;
            losses = if eps < 1.0 { (losses.affine(1.0 - eps, 0.0)? + smooth)? } else { smooth };
        }
        let mut z_loss = if self.z_loss > 0.0 { Some(lse.sqr()?.affine(self.z_loss, 0.0)?) } else { None };
        if let Some(z_loss) = &z_loss {
            losses = (losses + z_loss)?;
        }
        if let Some(token) = &weights.token {
            losses = (losses * token)?;
            z_loss = z_loss.map(|z| z * token).transpose()?;
        }
        Ok(TokenTerms { losses, z_loss, lse, correct })
    }

    /// The reduced loss of the call's statistics, and nothing else.
    pub(crate) fn loss(&self, call: &LossCall, num_label_tokens: Option<usize>) -> Result<Tensor> {
        let call = match call {
            LossCall::Tokens(call) => call,
            LossCall::Empty { call, labels_shape } => return call.node(self.reduced_shape(labels_shape)),
        };
        let terms = self.token_terms(&call.node, call.vocab, &call.weights)?;
        self.reduce(&terms.losses, &call.labels_shape, num_label_tokens, || {
            call.weights.denominator(&call.labels, self.ignore_index, terms.losses.dtype())
        })
    }

    /// Every output of the call's statistics (see [`CrossEntropyOutput`]).
    pub(crate) fn outputs(&self, call: &LossCall, num_label_tokens: Option<usize>) -> Result<CrossEntropyOutput> {
        let call = match call {
            LossCall::Tokens(call) => call,
            LossCall::Empty { call, labels_shape } => {
                let reduced = self.reduced_shape(labels_shape);
                return Ok(CrossEntropyOutput {
                    loss: call.node(reduced.clone())?,
                    z_loss: call.zeros(reduced)?,
                    token_losses: call.node(labels_shape.clone())?,
                    lse: call.zeros(labels_shape.clone())?,
                    token_accuracy: call.zeros(())?,
                });
            }
        };
        let terms = self.token_terms(&call.node, call.vocab, &call.weights)?;
        let dtype = terms.losses.dtype();
        let denominator = call.weights.denominator(&call.labels, self.ignore_index, dtype)?;
        let shape = &call.labels_shape;
        let reduce = |per_token: &Tensor| self.reduce(per_token, shape, num_label_tokens, || Ok(denominator.clone()));
        let z_loss = match &terms.z_loss {
            Some(z_loss) => reduce(z_loss)?,
            None => reduce(&terms.lse.zeros_like()?)?,
        };
        let count = valid_count(&call.labels, self.ignore_index, dtype)?;
        Ok(CrossEntropyOutput {
            loss: reduce(&terms.losses)?,
            z_loss,
            token_losses: terms.losses.reshape(shape)?,
            lse: terms.lse.reshape(shape)?,
            token_accuracy: terms.correct.detach().sum_all()?.broadcast_div(&count)?,
        })
    }

    /// The gradients that the statistics of a valid row receive when the
    /// reduced loss receives 1, before the row's own weights (see
    /// [`RowWeights`]): the derivative of the composition in
    /// [`token_terms`](Self::token_terms), `g_ce = c (1 - ε)`, `g_lse = c ε C
    /// / V + 2 c z lse`, `g_sum = -c ε / V`, with `c` the reduction's factor
    /// (`1 / denominator` for a `Mean`, see [`CallWeights::host_denominator`])
    /// and `C / V` the mean class weight. `None` for [`Reduction::None`],
    /// whose upstream gradient is per token.
    pub(crate) fn unit_factors(
        &self,
        vocab: usize,
        weights: &CallWeights,
        denominator: f64,
        num_label_tokens: Option<usize>,
    ) -> Option<UnitFactors> {
        let c = match (self.reduction, num_label_tokens) {
            (Reduction::None, _) => return None,
            (Reduction::Sum, _) => 1.0,
            (Reduction::Mean, Some(0)) => 0.0,
            (Reduction::Mean, Some(n)) => 1.0 / n as f64,
            (Reduction::Mean, None) if denominator > 0.0 => 1.0 / denominator,
            (Reduction::Mean, None) => 1.0,
        };
        let eps = self.label_smoothing;
        Some(UnitFactors {
            ce: c * (1.0 - eps),
            lse: c * eps * weights.mean_class,
            lse_squared: 2.0 * c * self.z_loss,
            logit_sum: -c * eps / vocab.max(1) as f64,
        })
    }

    /// Combines per-token values `[N]` into the configured reduction; `count`
    /// gives the number of valid tokens (at least 1) as a scalar on their
    /// device, and is only called for a `Mean` without `num_label_tokens`.
    fn reduce(
        &self,
        per_token: &Tensor,
        labels_shape: &Shape,
        num_label_tokens: Option<usize>,
        count: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self.reduction {
            Reduction::None => per_token.reshape(labels_shape),
            Reduction::Sum => per_token.sum_all(),
            Reduction::Mean => {
                let total = per_token.sum_all()?;
                match num_label_tokens {
                    // Not `affine(0, 0)`: candle's backprop prunes a zero affine, which
                    // would leave the logits without a gradient.
                    Some(0) => total.broadcast_mul(&total.zeros_like()?),
                    Some(n) => total.affine(1.0 / n as f64, 0.0),
                    // Dividing by a device-side count (at least 1) keeps an all-ignored batch at 0.
                    None => total.broadcast_div(&count()?),
                }
            }
        }
    }

    pub(crate) fn check_num_label_tokens(&self, num_label_tokens: Option<usize>) -> Result<()> {
        if num_label_tokens.is_some() && self.reduction != Reduction::Mean {
            bail!("chunked cross-entropy: num_label_tokens applies to Reduction::Mean only, not {:?}", self.reduction)
        }
        Ok(())
    }

    /// The two ops of a `Reduction::Mean` loss timed apart, for the benchmarks:
    /// the forward op's row statistics `[N, 4]`, then the backward op's
    /// gradient (upstream gradient 1), each timed between device
    /// synchronisations. Not part of the stable API.
    #[doc(hidden)]
    pub fn bench_ops(
        &self,
        logits: &Tensor,
        labels: &Tensor,
    ) -> Result<(std::time::Duration, std::time::Duration, Tensor)> {
        let cfg = self.op_config(logits.device())?;
        let (logits, labels) = self.checked_inputs(logits, labels, None, &cfg)?;
        let device = logits.device();
        device.synchronize()?;
        let start = std::time::Instant::now();
        let stats = op::row_stats(&logits, &labels, &cfg)?;
        device.synchronize()?;
        let forward = start.elapsed();
        let count = valid_count(&labels, self.ignore_index, stats.dtype())?;
        let g_ce = count.recip()?.broadcast_as((labels.dim(0)?, 1))?;
        let zeros = g_ce.zeros_like()?;
        let factors = backward_factors(&Tensor::cat(&[&g_ce, &zeros, &zeros], 1)?, &stats)?;
        device.synchronize()?;
        let start = std::time::Instant::now();
        let grad = op::logits_grad(&logits, &labels, &factors, &cfg)?;
        device.synchronize()?;
        Ok((forward, start.elapsed(), grad))
    }

    /// Validates logits, labels and mask (see [`forward`](Self::forward)) and
    /// returns the logits with a unit-stride vocabulary dim and the labels as
    /// `[N]` contiguous i64 with masked tokens set to `ignore_index`.
    fn checked_inputs(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: Option<&Tensor>,
        cfg: &OpConfig,
    ) -> Result<(Tensor, Tensor)> {
        let logits = checked_logits(logits)?;
        let vocab = logits.dim(candle::D::Minus1)?;
        let labels = checked_labels(&logits, vocab, labels, mask, self.ignore_index)?;
        if cfg.engine != Engine::Fused {
            // The fused op checks labels inside its kernel; candle's ops (whose `gather`
            // may not check its indices on every device) need them checked here.
            op::row_labels(&labels.to_vec1::<i64>()?, vocab, self.ignore_index)?;
        }
        Ok((logits, labels))
    }

    /// The validated settings of a call on `device`, and the engine that runs
    /// it there (the one place that asks whether our kernels cover a device).
    pub(crate) fn op_config(&self, device: &Device) -> Result<OpConfig> {
        if self.chunk_len == 0 {
            bail!("chunked cross-entropy: chunk_len must be at least 1, got 0")
        }
        if self.inplace_grad && !self.compile {
            bail!("chunked cross-entropy: inplace_grad needs the fused kernels (compile = true)")
        }
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            bail!("chunked cross-entropy: label_smoothing must be in [0, 1], got {}", self.label_smoothing)
        }
        if !(self.z_loss >= 0.0 && self.z_loss.is_finite()) {
            bail!("chunked cross-entropy: z_loss must be finite and >= 0, got {}", self.z_loss)
        }
        if let Some(cap) = self.logit_softcap {
            if !(cap > 0.0 && cap.is_finite()) {
                bail!("chunked cross-entropy: logit_softcap must be finite and > 0, got {cap}")
            }
        }
        let covered = op::kernels_cover(device.location()) && !self.force_autograd;
        let engine = Engine::select(covered, self.compile);
        Ok(OpConfig {
            engine,
            ignore_index: self.ignore_index,
            chunk_len: self.chunk_len,
            // Candle's backprop allocates the gradient of recorded ops: nothing to write in place.
            inplace_grad: self.inplace_grad && engine != Engine::Autograd,
            terms: RowTerms { softcap: self.logit_softcap, logit_sum: self.label_smoothing > 0.0 },
            // Set per call, once the class weights are checked against the logits.
            sum_weights: None,
            // `checked_inputs` checks them on the host for every engine but the fused one.
            labels_checked: engine != Engine::Fused,
        })
    }
}

/// One loss call past validation.
pub(crate) enum LossCall {
    /// At least one token.
    Tokens(TokenCall),
    /// No token (`N = 0`) on a device the kernels cover: nothing to compute
    /// (see [`EmptyCall`]); the labels' shape, for the per-token outputs.
    Empty { call: EmptyCall, labels_shape: Shape },
}

/// A call with tokens: its graph node's `[N, 4]` statistics, the checked
/// `[N]` i64 labels, their original shape, `V`, and the weights.
pub(crate) struct TokenCall {
    pub node: Tensor,
    pub labels: Tensor,
    pub labels_shape: Shape,
    pub vocab: usize,
    pub weights: CallWeights,
}

/// The validated weights of one call (see [`ChunkedCrossEntropy`]'s docs), in
/// the loss's dtype on the logits' device; `None` where the call has none.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallWeights {
    /// `t`, `[N]`: the tokens' loss weights.
    token: Option<Tensor>,
    /// `c_y`, `[N]`: each token's target-class weight, 0 on ignored tokens.
    target_class: Option<Tensor>,
    /// `c`, `[V]`, where the logit sum they weigh is computed (with label
    /// smoothing): [`OpConfig::sum_weights`].
    pub sum_weights: Option<Tensor>,
    /// `C / V = Σ_j c_j / V`, 1 without class weights.
    mean_class: f64,
}

impl CallWeights {
    /// The rows' multipliers of the unit factors, `t c_y` and `t` as `[N, 1]`
    /// columns; `None` for an unweighted call.
    pub(crate) fn row_weights(&self) -> Result<Option<RowWeights>> {
        let ce = match (&self.token, &self.target_class) {
            (None, None) => return Ok(None),
            (Some(t), None) => t.clone(),
            (None, Some(c)) => c.clone(),
            (Some(t), Some(c)) => (t * c)?,
        };
        let rest = match &self.token {
            Some(t) => t.clone(),
            None => ce.ones_like()?,
        };
        Ok(Some(RowWeights { ce: ce.unsqueeze(1)?, rest: rest.unsqueeze(1)? }))
    }

    /// What a `Mean` divides by, as a scalar of `dtype` on the labels' device
    /// (no host round trip): the valid-token count (at least 1), or with
    /// weights their summed weights `Σ t c_y` (1 where that sum is 0).
    fn denominator(&self, labels: &Tensor, ignore_index: i64, dtype: DType) -> Result<Tensor> {
        if self.token.is_none() && self.target_class.is_none() {
            return valid_count(labels, ignore_index, dtype);
        }
        let mut weights = labels.ne(ignore_index as f64)?.to_dtype(dtype)?;
        for w in [&self.token, &self.target_class].into_iter().flatten() {
            weights = (weights * w)?;
        }
        let total = weights.sum_all()?;
        total.gt(0f64)?.where_cond(&total, &total.ones_like()?)
    }

    /// [`denominator`](Self::denominator) on the host, before the 1 that
    /// replaces a zero (see [`ChunkedCrossEntropy::unit_factors`]).
    pub(crate) fn host_denominator(&self, labels: &Tensor, ignore_index: i64) -> Result<f64> {
        let dtype = self.token.as_ref().or(self.target_class.as_ref()).map_or(DType::F64, Tensor::dtype);
        self.denominator(labels, ignore_index, dtype)?.to_dtype(DType::F64)?.to_scalar::<f64>()
    }
}

/// Checks a weights tensor: `dims`, a float dtype, `inputs`' device, every
/// value finite and `>= 0` (read on the host: one transfer of the weights).
fn checked_weights(name: &str, weights: &Tensor, dims: &[usize], expected: &str, inputs: &Tensor) -> Result<Tensor> {
    if weights.dims() != dims {
        bail!("chunked cross-entropy: {name} {:?} must be {expected}, i.e. {dims:?}", weights.shape())
    }
    if !weights.dtype().is_float() {
        bail!("chunked cross-entropy: {name} must be a float dtype, got {:?}", weights.dtype())
    }
    if !weights.device().same_device(inputs.device()) {
        bail!("chunked cross-entropy: {name} are on {:?} but the inputs on {:?}", weights.device(), inputs.device())
    }
    if weights.elem_count() == 0 {
        return Ok(weights.detach());
    }
    let values = weights.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !(v.is_finite() && **v >= 0.0)) {
        bail!("chunked cross-entropy: {name} must be finite and >= 0, got {v} at flat index {i}")
    }
    // Weights are data, not parameters: no gradient flows to them.
    Ok(weights.detach())
}

/// A row's loss terms, `[N]` each: its loss (all terms included), its z-loss
/// part when there is one, its log-sum-exp, and whether its argmax is its label.
struct TokenTerms {
    losses: Tensor,
    z_loss: Option<Tensor>,
    lse: Tensor,
    correct: Tensor,
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

/// Checks rank and dtype, and gives the vocabulary dim unit stride (a copy
/// only when it has another stride, e.g. transposed logits).
pub(crate) fn checked_logits(logits: &Tensor) -> Result<Tensor> {
    if !matches!(logits.rank(), 2 | 3) {
        bail!("chunked cross-entropy: logits must be [N, V] or [B, S, V], got {:?}", logits.shape())
    }
    if !matches!(logits.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
        bail!("chunked cross-entropy: logits must be f32, f64, bf16 or f16, got {:?}", logits.dtype())
    }
    let vocab = logits.dim(candle::D::Minus1)?;
    let unit_stride = logits.stride().last() == Some(&1) || vocab <= 1;
    if unit_stride {
        Ok(logits.clone())
    } else {
        logits.contiguous()
    }
}

/// Checks labels (and mask) against the logits (`[.., V]`, or the linear
/// loss's `[.., H]` hidden states) and the vocabulary size `V`, and returns
/// them as `[N]` contiguous i64, masked tokens set to `ignore_index`. The
/// caller's tensors are not modified.
pub(crate) fn checked_labels(
    logits: &Tensor,
    vocab: usize,
    labels: &Tensor,
    mask: Option<&Tensor>,
    ignore_index: i64,
) -> Result<Tensor> {
    let expected = &logits.dims()[..logits.rank() - 1];
    if labels.dims() != expected {
        bail!(
            "chunked cross-entropy: labels {:?} must have the logits' shape {:?} without the vocabulary dim, i.e. {expected:?}",
            labels.shape(),
            logits.shape()
        )
    }
    if !matches!(labels.dtype(), DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64) {
        bail!(
            "chunked cross-entropy: labels must be an integer dtype (u8, u32, i16, i32, i64), got {:?}",
            labels.dtype()
        )
    }
    if !labels.device().same_device(logits.device()) {
        bail!("chunked cross-entropy: labels are on {:?} but logits on {:?}", labels.device(), logits.device())
    }
    if let Some(mask) = mask {
        if mask.dims() != expected {
            bail!("chunked cross-entropy: mask {:?} must have the labels' shape {expected:?}", mask.shape())
        }
    }
    if labels.elem_count() > 0 && vocab == 0 {
        bail!("chunked cross-entropy: an empty vocabulary (V = 0) cannot predict {} tokens", labels.elem_count())
    }
    crate::labels::row_labels(labels, mask, ignore_index)
}

/// The number of labels that are not `ignore_index`, at least 1, as a scalar
/// of `dtype` on the labels' device (no host round trip).
fn valid_count(labels: &Tensor, ignore_index: i64, dtype: DType) -> Result<Tensor> {
    labels.ne(ignore_index as f64)?.to_dtype(dtype)?.sum_all()?.maximum(1f64)
}
