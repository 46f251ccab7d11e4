//! One loss call from its settings to its outputs: what both public losses
//! ([`crate::ChunkedCrossEntropy`] over logits, [`crate::LinearCrossEntropy`]
//! over hidden states and an output layer) share, below both, so that a call
//! flows down from either without climbing back into the other.
//!
//! - here: the settings ([`Settings`]: options, validated once into the
//!   engines' [`OpConfig`]), and a call past validation ([`LossCall`]);
//! - `inputs.rs`: the checks of logits, labels and weights, and the call's
//!   weights;
//! - `outputs.rs`: the per-token terms composed from the row statistics,
//!   the reductions, and the factors a scalar loss's gradient is formed with.

mod inputs;
mod outputs;

#[cfg(feature = "testing")]
pub(crate) use inputs::valid_count;
pub(crate) use inputs::{checked_labels, checked_logits, CallLabels, CallWeights};
pub use outputs::CrossEntropyOutput;

use crate::config::{compute_dtype, Engine, OpConfig, RowTerms};
use crate::empty::EmptyCall;
use crate::op;
use candle::{bail, Device, Result, Shape, Tensor};

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

/// The options both losses take (see [`crate::ChunkedCrossEntropy`]'s table),
/// as set; [`Settings::op_config`] validates them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    pub chunk_len: usize,
    pub compile: bool,
    pub ignore_index: i64,
    pub reduction: Reduction,
    pub inplace_grad: bool,
    /// The logits loss's `grad_in_forward` (the linear loss forms its gradients
    /// in forward whenever it can, and leaves this `false`).
    pub grad_in_forward: bool,
    pub label_smoothing: f64,
    pub z_loss: f64,
    pub logit_softcap: Option<f64>,
    pub class_weights: Option<ClassWeights>,
    pub force_autograd: bool,
}

/// The `[V]` class weights of a loss configuration. Two configurations are
/// equal when they hold the same tensor (candle's `Tensor::id`), not merely
/// equal values: comparing values would read them back from the device.
#[derive(Debug, Clone)]
pub(crate) struct ClassWeights(pub Tensor);

impl PartialEq for ClassWeights {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

impl Settings {
    /// NeMo's `ChunkedCrossEntropy(chunk_len, compile, ignore_index)`, with
    /// [`Reduction::Mean`] and every option off.
    pub(crate) fn new(chunk_len: usize, compile: bool, ignore_index: i64) -> Self {
        Self {
            chunk_len,
            compile,
            ignore_index,
            reduction: Reduction::Mean,
            inplace_grad: false,
            grad_in_forward: false,
            label_smoothing: 0.0,
            z_loss: 0.0,
            logit_softcap: None,
            class_weights: None,
            force_autograd: false,
        }
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
        if self.grad_in_forward && self.reduction == Reduction::None {
            bail!(
                "chunked cross-entropy: grad_in_forward needs a scalar loss (Reduction::Mean or Reduction::Sum), \
                 not Reduction::None, whose upstream gradient differs per token"
            )
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
            // `checked_inputs` checks them on the host for every engine but the fused one,
            // and for that one too when the caller's labels are on the host.
            labels_checked: engine != Engine::Fused,
        })
    }

    pub(crate) fn check_num_label_tokens(&self, num_label_tokens: Option<usize>) -> Result<()> {
        if num_label_tokens.is_some() && self.reduction != Reduction::Mean {
            bail!("chunked cross-entropy: num_label_tokens applies to Reduction::Mean only, not {:?}", self.reduction)
        }
        Ok(())
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
