//! The linear loss with its gradients handed over directly, for training
//! loops that drive their own backward (activation checkpointing, gradient
//! accumulation into their own buffers): nothing is recorded in candle's
//! graph, and no `[V, H]` gradient passes through candle's backprop, which
//! adds every gradient into fresh zeros (a second and third `[V, H]` buffer,
//! and 74-80% of a logits loss's time on an H200).
//!
//! The gradients are those a `Mean` or `Sum` loss computes in its forward pass
//! anyway (see the module docs of `linear`): [`LinearCrossEntropy::loss_and_grads`]
//! returns them, [`LinearCrossEntropy::accumulate_grads`] adds the weight's
//! (and bias's) into a [`LinearGradAccumulator`] the caller keeps across
//! micro-batches.

use super::chunks::WeightGrad;
use super::products::{GradientSums, ProductSum, Projection};
use super::{ChunkPass, ChunkedCall, LinearCrossEntropy, Plan, Wanted};
use crate::call::{LossCall, Reduction, TokenCall};
use crate::config::{compute_dtype, Engine};
use candle::{bail, DType, Device, Result, Tensor, Var};

/// The loss and every gradient of one call of
/// [`LinearCrossEntropy::loss_and_grads`].
#[derive(Debug, Clone)]
pub struct LinearGrads {
    /// The reduced loss: an f32 scalar (f64 for f64 inputs), recorded in no
    /// graph.
    pub loss: Tensor,
    /// `d loss / d hidden`: `hidden`'s shape and dtype.
    pub hidden_grad: Tensor,
    /// `d loss / d weight`: `[V, H]` in `weight`'s dtype (on the CPU, for
    /// f32 and f64 weights, a bf16 weight in one chunk and with
    /// [`low_memory`](LinearCrossEntropy::low_memory), a transposed view of
    /// the sum: not contiguous).
    pub weight_grad: Tensor,
    /// `d loss / d bias`: `[V]` in the bias's dtype, `Some` exactly when a bias
    /// is given.
    pub bias_grad: Option<Tensor>,
}

/// A weight's gradient and, with a bias, the bias's.
type WeightGrads = (Tensor, Option<Tensor>);

/// What one [`LinearCrossEntropy::accumulate_grads`] call returns; the
/// weight's (and bias's) gradients went into the accumulator.
#[derive(Debug, Clone)]
pub struct MicroBatchGrads {
    /// This micro-batch's share of the reduced loss (divided by
    /// `num_label_tokens` for a `Mean`): an f32 scalar (f64 for f64 inputs).
    pub loss: Tensor,
    /// `d loss / d hidden` for this micro-batch: `hidden`'s shape and dtype.
    pub hidden_grad: Tensor,
}

/// The weight's (and bias's) gradient summed over micro-batches in f32 (f64
/// for f64 weights), in a buffer the caller owns: see
/// [`LinearCrossEntropy::accumulate_grads`]. Each call adds its gradients in
/// place, one matrix product per chunk of rows, without a `[V, H]` temporary.
#[derive(Debug)]
pub struct LinearGradAccumulator {
    /// `None` only while a call adds into it.
    weight: Option<ProductSum>,
    bias: Option<Tensor>,
    /// The weight's `[V, H]`, dtype and device, that calls must match.
    dims: (usize, usize),
    dtype: DType,
    device: Device,
}

impl LinearGradAccumulator {
    /// Zeros for the gradients of `weight` (`[V, H]`, any float dtype) and,
    /// when given, `bias` (`[V]`), on the weight's device.
    ///
    /// # Errors
    /// A weight that is not `[V, H]` of a float dtype; a bias that is not
    /// `[V]` of the weight's dtype and device.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let dims = match weight.dims() {
            [v, h] if weight.dtype().is_float() => (*v, *h),
            _ => bail!(
                "linear gradient accumulator: weight must be [V, H] of a float dtype, got {:?} {:?}",
                weight.shape(),
                weight.dtype()
            ),
        };
        let acc = compute_dtype(weight.dtype());
        let bias = match bias {
            None => None,
            Some(b)
                if b.dims() == [dims.0] && b.dtype() == weight.dtype() && b.device().same_device(weight.device()) =>
            {
                Some(Tensor::zeros(dims.0, acc, weight.device())?)
            }
            Some(b) => bail!(
                "linear gradient accumulator: bias {:?} {:?} must be [{}] {:?} on the weight's device",
                b.shape(),
                b.dtype(),
                dims.0,
                weight.dtype()
            ),
        };
        let weight_sum = Some(ProductSum::new(weight, acc)?);
        Ok(Self { weight: weight_sum, bias, dims, dtype: weight.dtype(), device: weight.device().clone() })
    }

    /// The summed weight gradient, `[V, H]` in f32 (f64 for f64 weights): a
    /// view of the accumulator (transposed storage on the CPU), not a copy.
    pub fn weight_grad(&self) -> Result<Tensor> {
        self.sum()?.gradient()
    }

    /// The summed bias gradient, `[V]` in f32 (f64), if the accumulator has a
    /// bias.
    pub fn bias_grad(&self) -> Option<Tensor> {
        self.bias.clone()
    }

    /// Sets the sums back to zero (the buffers are kept).
    pub fn zero(&mut self) -> Result<()> {
        self.sum()?.zero()?;
        if let Some(bias) = &mut self.bias {
            *bias = bias.zeros_like()?;
        }
        Ok(())
    }

    fn sum(&self) -> Result<&ProductSum> {
        match &self.weight {
            Some(sum) => Ok(sum),
            None => bail!("linear gradient accumulator: a failed call left it without its sum"),
        }
    }

    /// Checks a call's `weight` and `bias` against the accumulator.
    fn check(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        let fits = weight.dims() == [self.dims.0, self.dims.1]
            && weight.dtype() == self.dtype
            && weight.device().same_device(&self.device);
        if !fits {
            bail!(
                "linear gradient accumulator: made for a [{}, {}] {:?} weight, got {:?} {:?}",
                self.dims.0,
                self.dims.1,
                self.dtype,
                weight.shape(),
                weight.dtype()
            )
        }
        if bias.is_some() != self.bias.is_some() {
            bail!(
                "linear gradient accumulator: made {} a bias, called {} one",
                has(self.bias.is_some()),
                has(bias.is_some())
            )
        }
        Ok(())
    }
}

fn has(yes: bool) -> &'static str {
    if yes {
        "with"
    } else {
        "without"
    }
}

impl LinearCrossEntropy {
    /// The loss of `hidden @ weight^T (+ bias)` and its gradients with respect
    /// to `hidden`, `weight` and `bias`, computed in the forward pass (as the
    /// loss's own backward would, to within rounding), with nothing recorded
    /// in candle's graph. For training loops that drive their own backward.
    ///
    /// - `hidden`, `weight`, `bias`, `labels`, `mask`: as in
    ///   [`forward_with_outputs`](Self::forward_with_outputs); the inputs'
    ///   own graph is ignored (every gradient is computed).
    ///
    /// Peak extra memory: the weight gradient's f32 accumulator (`[V, H]`)
    /// and one chunk of logits, then, for 16-bit weights, the rounded
    /// gradient beside the accumulator while it is made; for a bf16 weight
    /// whose rows fit one chunk (see [`chunk_len`](Self::chunk_len)), that
    /// chunk of logits and the gradient itself. No `[V, H]` zeros +
    /// add. With [`low_memory`](Self::low_memory): the weight's gradient
    /// itself, the hidden states' and one smaller chunk of logits.
    ///
    /// # Errors
    /// Those of [`forward`](Self::forward), and a reduction other than
    /// [`Reduction::Mean`] or [`Reduction::Sum`] (the gradients are those of a
    /// scalar loss).
    pub fn loss_and_grads(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        labels: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<LinearGrads> {
        let (MicroBatchGrads { loss, hidden_grad }, weights) =
            self.direct(hidden, weight, bias, labels, mask, None, None)?;
        let Some((weight_grad, bias_grad)) = weights else {
            bail!("linear cross-entropy: the weight's gradient was not formed")
        };
        Ok(LinearGrads { loss, hidden_grad, weight_grad, bias_grad })
    }

    /// [`loss_and_grads`](Self::loss_and_grads) for gradient accumulation:
    /// the weight's (and bias's) gradients are added, in f32 (f64 for f64),
    /// into `acc`, which the caller keeps across micro-batches; the loss and
    /// the hidden states' gradient are returned. With `num_label_tokens` (the
    /// valid tokens of all micro-batches together, `Mean` only) the sums equal
    /// one big batch's gradients.
    ///
    /// Peak extra memory: one chunk of logits beside the caller's
    /// accumulator. For f16 inputs, whose chunk gradients are formed scaled up
    /// by a power of two (so that they do not underflow f16), the accumulator
    /// is scaled by it and back, exactly, around the call.
    ///
    /// # Errors
    /// Those of [`loss_and_grads`](Self::loss_and_grads), `num_label_tokens`
    /// with a reduction other than `Mean`, and a `weight` or `bias` that does
    /// not fit `acc` (shape, dtype, device, with or without a bias).
    #[allow(clippy::too_many_arguments)]
    pub fn accumulate_grads(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        labels: &Tensor,
        mask: Option<&Tensor>,
        num_label_tokens: Option<usize>,
        acc: &mut LinearGradAccumulator,
    ) -> Result<MicroBatchGrads> {
        acc.check(weight, bias)?;
        Ok(self.direct(hidden, weight, bias, labels, mask, num_label_tokens, Some(acc))?.0)
    }

    /// The loss and the hidden states' gradient, and (without `acc`) the
    /// weight's and bias's, or (with `acc`) `None`: those went into it.
    #[allow(clippy::too_many_arguments)]
    fn direct(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        labels: &Tensor,
        mask: Option<&Tensor>,
        num_label_tokens: Option<usize>,
        acc: Option<&mut LinearGradAccumulator>,
    ) -> Result<(MicroBatchGrads, Option<WeightGrads>)> {
        if self.settings.reduction == Reduction::None {
            bail!("linear cross-entropy: direct gradients need a scalar loss (Reduction::Mean or Sum), not None")
        }
        let (hidden, weight, bias) = (hidden.detach(), weight.detach(), bias.map(Tensor::detach));
        if self.settings.op_config(hidden.device())?.engine == Engine::Autograd {
            return self.recorded(&hidden, &weight, bias.as_ref(), labels, mask, num_label_tokens, acc);
        }
        let weight_grad = if acc.is_some() { WeightGrad::Accumulated } else { WeightGrad::Fresh };
        let call =
            match self.plan(&hidden, &weight, bias.as_ref(), labels, mask, None, num_label_tokens, weight_grad)? {
                Plan::Chunks(call) => call,
                Plan::Empty(_) => return self.no_tokens(&hidden, &weight, bias.as_ref(), acc),
                Plan::Recorded(_) => bail!("linear cross-entropy: a covered device planned a recorded call"),
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
        let Some(unit) = self.settings.unit_factors(vocab, &weights, denominator, num_label_tokens) else {
            bail!("linear cross-entropy: direct gradients need a scalar loss")
        };
        let projection = Projection { weight: weight.clone(), bias: bias.clone() };
        let (kept_rows, kept_labels) = (selection.gather(&rows)?, selection.gather(&labels)?);
        let kept_weights = row_weights.as_ref().map(|w| w.map(|c| selection.gather(c))).transpose()?;
        let pass = ChunkPass { rows: &kept_rows, projection: &projection, labels: &kept_labels, cfg: &cfg };
        let everything = Wanted { rows: true, weight: true, bias: bias.is_some() };
        let (stats, hidden_grad, sums) = match acc {
            None => {
                let sums = GradientSums::new(&kept_rows, &projection, everything, weight_sum)?;
                let (stats, sums, boost) = pass.forward_with_gradients(unit, kept_weights.as_ref(), sums)?;
                let inputs: Vec<&Tensor> = [&hidden, &weight].into_iter().chain(bias.as_ref()).collect();
                let gradients = selection.scatter_hidden_grad(sums.finish(bias.is_some())?)?;
                let mut gradients = super::products::input_gradients(gradients, &inputs, 1.0 / boost)?.into_iter();
                let mut next = || gradients.next().flatten();
                let (hidden_grad, weight_grad, bias_grad) = (next(), next(), next());
                let Some(weight_grad) = weight_grad else { bail!("linear cross-entropy: no weight gradient") };
                (stats, hidden_grad, Some((weight_grad, bias_grad)))
            }
            Some(acc) => {
                let boost = crate::precomputed::boost_of(&unit, kept_rows.dtype());
                acc.scale(boost)?;
                let sums = GradientSums::into_accumulator(&kept_rows, acc.take()?)?;
                let (stats, sums, _) = pass.forward_with_gradients(unit, kept_weights.as_ref(), sums)?;
                let (rows_grad, weight_sum, bias_sum) = sums.into_parts();
                acc.put_back(weight_sum, bias_sum)?;
                acc.scale(1.0 / boost)?;
                let rows_grad = selection.scatter_hidden_grad(vec![rows_grad])?.remove(0);
                let hidden_grad = super::products::input_gradients(vec![rows_grad], &[&hidden], 1.0 / boost)?.remove(0);
                (stats, hidden_grad, None)
            }
        };
        let Some(hidden_grad) = hidden_grad else { bail!("linear cross-entropy: no hidden-state gradient") };
        let stats = selection.scatter(&stats)?;
        let call = LossCall::Tokens(TokenCall { node: stats, labels, labels_shape, vocab, weights });
        let loss = self.settings.loss(&call, num_label_tokens)?;
        Ok((MicroBatchGrads { loss, hidden_grad: hidden_grad.reshape(hidden.shape())? }, sums))
    }

    /// No tokens: a zero loss and zero gradients (the accumulator unchanged).
    fn no_tokens(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        acc: Option<&mut LinearGradAccumulator>,
    ) -> Result<(MicroBatchGrads, Option<WeightGrads>)> {
        let loss = Tensor::zeros((), compute_dtype(hidden.dtype()), hidden.device())?;
        let sums = match acc {
            Some(_) => None,
            None => Some((weight.zeros_like()?, bias.map(Tensor::zeros_like).transpose()?)),
        };
        Ok((MicroBatchGrads { loss, hidden_grad: hidden.zeros_like()? }, sums))
    }

    /// On a device the kernels do not cover: the loss recorded op by op and
    /// differentiated by candle's autograd, on copies of the inputs, whose
    /// graph is dropped once the gradients are read.
    #[allow(clippy::too_many_arguments)]
    fn recorded(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        labels: &Tensor,
        mask: Option<&Tensor>,
        num_label_tokens: Option<usize>,
        acc: Option<&mut LinearGradAccumulator>,
    ) -> Result<(MicroBatchGrads, Option<WeightGrads>)> {
        let (h, w) = (Var::from_tensor(hidden)?, Var::from_tensor(weight)?);
        let b = bias.map(Var::from_tensor).transpose()?;
        let out = self.forward_with_outputs(
            h.as_tensor(),
            w.as_tensor(),
            b.as_ref().map(Var::as_tensor),
            labels,
            mask,
            None,
            num_label_tokens,
        )?;
        let grads = out.loss.backward()?;
        let grad = |v: &Var| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        };
        let (hidden_grad, weight_grad) = (grad(&h)?, grad(&w)?);
        let bias_grad = b.as_ref().map(grad).transpose()?;
        let loss = out.loss.detach();
        let grads = MicroBatchGrads { loss, hidden_grad };
        match acc {
            None => Ok((grads, Some((weight_grad, bias_grad)))),
            Some(acc) => {
                acc.add_dense(&weight_grad, bias_grad.as_ref())?;
                Ok((grads, None))
            }
        }
    }
}

impl LinearGradAccumulator {
    /// Multiplies the sums by `factor` in place (a power of two: exact).
    fn scale(&mut self, factor: f64) -> Result<()> {
        if factor == 1.0 {
            return Ok(());
        }
        self.sum()?.scale(factor)?;
        if let Some(bias) = &mut self.bias {
            *bias = bias.affine(factor, 0.0)?;
        }
        Ok(())
    }

    /// The sums, for a pass to add into (see [`GradientSums::into_accumulator`]).
    fn take(&mut self) -> Result<(ProductSum, Option<Tensor>)> {
        match self.weight.take() {
            Some(weight) => Ok((weight, self.bias.take())),
            None => bail!("linear gradient accumulator: a failed call left it without its sum"),
        }
    }

    /// The sums back from a pass.
    fn put_back(&mut self, weight: Option<ProductSum>, bias: Option<Tensor>) -> Result<()> {
        if weight.is_none() {
            bail!("linear gradient accumulator: the pass kept the weight's sum")
        }
        (self.weight, self.bias) = (weight, bias);
        Ok(())
    }

    /// Adds dense gradients (the recorded path's).
    fn add_dense(&mut self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        match &mut self.weight {
            Some(sum) => sum.add_dense(weight)?,
            None => bail!("linear gradient accumulator: a failed call left it without its sum"),
        }
        if let (Some(sum), Some(b)) = (&mut self.bias, bias) {
            *sum = (&*sum + b.to_dtype(sum.dtype())?)?;
        }
        Ok(())
    }
}
