//! A call's outputs: the per-token terms composed from the row statistics
//! (the formula is in `op/mod.rs`), their reductions, and the factors that a
//! scalar loss's gradient is formed with.

use super::inputs::valid_count;
use super::{CallWeights, LossCall, Reduction, Settings};
use crate::config::{Stat, UnitFactors};
use candle::{Result, Shape, Tensor};

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

/// A row's loss terms, `[N]` each: its loss (all terms included), its z-loss
/// part when there is one, its log-sum-exp, and whether its argmax is its label.
struct TokenTerms {
    losses: Tensor,
    z_loss: Option<Tensor>,
    lse: Tensor,
    correct: Tensor,
}

impl Settings {
    /// The shape of a reduced output: a scalar, or the labels' shape for
    /// [`Reduction::None`].
    fn reduced_shape(&self, labels_shape: &Shape) -> Shape {
        match self.reduction {
            Reduction::None => labels_shape.clone(),
            Reduction::Mean | Reduction::Sum => Shape::from(()),
        }
    }

    /// The per-token terms composed from the node's `[N, 4]` statistics (the
    /// formula is in `op/mod.rs`).
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
    /// [`crate::op::RowWeights`]): the derivative of the composition in
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
}
