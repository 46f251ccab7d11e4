//! A linear-loss call's plan: its inputs validated (shapes, dtypes, devices,
//! labels checked on the host), and what it computes settled: nothing (no
//! token), the whole logits recorded for candle's autograd (a device the
//! kernels do not cover), or the chunk pass over the valid rows, its chunks
//! and the dtype the weight's gradient is summed in (`chunks::plan_chunks`).

use super::chunks::{self, ChunkDevice, ChunkPlan, WeightGrad};
use super::products::Projection;
use super::rows::RowSelection;
use super::LinearCrossEntropy;
use crate::call::{checked_labels, checked_logits, CallWeights, LossCall, TokenCall};
use crate::candle_limits::check_cuda_elements;
use crate::config::{Engine, OpConfig};
use crate::op::{self, RowWeights};
use crate::primitive;
use candle::{bail, DType, Result, Tensor};

impl LinearCrossEntropy {
    /// Validates the inputs and settles what the call computes (see [`Plan`]),
    /// the weight's gradient going where `weight_grad` says.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn plan(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        labels: &Tensor,
        mask: Option<&Tensor>,
        loss_weights: Option<&Tensor>,
        num_label_tokens: Option<usize>,
        weight_grad: WeightGrad,
    ) -> Result<Plan> {
        let labels_shape = labels.shape().clone();
        let ignore_index = self.settings.ignore_index;
        self.settings.check_num_label_tokens(num_label_tokens)?;
        if self.chunk_len == Some(0) {
            bail!("linear cross-entropy: chunk_len must be at least 1, got 0")
        }
        if self.low_memory && weight.dtype() == DType::F16 {
            bail!(
                "linear cross-entropy: low_memory sums the weight's gradient in the weight's dtype, and f16's \
                 range (65504) cannot hold those sums safely: use bf16 or f32 weights, or low_memory(false)"
            )
        }
        let hidden = checked_logits(hidden)?;
        let vocab = checked_projection(&hidden, weight, bias)?;
        let call_labels = checked_labels(&hidden, vocab, labels, mask, ignore_index)?;
        let labels = call_labels.tensor.clone();
        let width = hidden.dim(candle::D::Minus1)?;
        let rows = hidden.reshape(((), width))?;
        let weights = self.settings.call_weights(&rows, vocab, &labels, &labels_shape, loss_weights)?;
        let cfg = OpConfig { sum_weights: weights.sum_weights.clone(), ..self.settings.op_config(hidden.device())? };
        check_candle_counts(&hidden, weight, weight_grad, cfg.engine)?;
        let inputs: Vec<&Tensor> = [&hidden, weight].into_iter().chain(bias).collect();
        if let Some(call) = self.settings.empty_call(&inputs, &labels, &labels_shape)? {
            return Ok(Plan::Empty(call));
        }
        // The labels on the host, to check them before any product runs (candle's `gather` on
        // the recorded path does not check its indices on every device) and to count the valid
        // ones, which the precomputed gradients' scale needs on the host: the caller's, when
        // they came from the CPU, else the call's one intended device->host read (a sync on
        // CUDA). Everything after it only queues work on the device (scalar operands are
        // host->device copies, and `Tensor::full` is a fill kernel): `labels_checked` below
        // tells the fused CUDA forward not to read its bad-label flag back after every chunk.
        let row_labels = op::row_labels(&call_labels.host_values()?, vocab, ignore_index)?;
        if cfg.engine == Engine::Autograd {
            let logits = Projection { weight: weight.clone(), bias: bias.cloned() }.logits(&rows)?;
            let node = primitive::row_stats_recorded(&logits, &labels, &cfg)?;
            return Ok(Plan::Recorded(TokenCall { node, labels, labels_shape, vocab, weights }));
        }
        let valid = row_labels.iter().flatten().count();
        let device = match (hidden.device().is_cuda(), cfg.engine == Engine::Fused && bias.is_none()) {
            (false, _) => ChunkDevice::Cpu,
            (true, true) => ChunkDevice::CudaLean,
            (true, false) => ChunkDevice::Cuda,
        };
        let ChunkPlan { chunk_len, weight_sum } = chunks::plan_chunks(
            (valid, width, vocab),
            weight.dtype(),
            weight_grad,
            device,
            self.low_memory,
            self.chunk_len,
        );
        // Each chunk's logits are a temporary: its gradient always overwrites it.
        let cfg = OpConfig { chunk_len, inplace_grad: true, labels_checked: true, ..cfg };
        let row_weights = weights.row_weights()?;
        let denominator = match row_weights {
            None => valid as f64,
            // A weighted mean's denominator: one more device->host read.
            Some(_) => weights.host_denominator(&labels, ignore_index)?,
        };
        let selection = RowSelection::of(&row_labels, hidden.device())?;
        Ok(Plan::Chunks(ChunkedCall {
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
        }))
    }
}

/// Refuses, on CUDA, what candle's own kernels would walk past their 32-bit
/// counts (see `candle_limits`): hidden states whose gradient candle's
/// backward adds, a weight whose gradient the call hands out (candle adds it,
/// or casts it from its f32 sum), and the `[N, V]` logits a recorded call
/// (`force_autograd`) forms with candle's ops.
fn check_candle_counts(hidden: &Tensor, weight: &Tensor, weight_grad: WeightGrad, engine: Engine) -> Result<()> {
    let device = hidden.device();
    let (width, vocab) = (hidden.dim(candle::D::Minus1)?, weight.dim(0)?);
    let rows = hidden.elem_count() / width.max(1);
    if hidden.track_op() {
        check_cuda_elements(device, hidden.elem_count(), || {
            format!("linear cross-entropy: hidden states {:?} whose gradient candle's backward adds", hidden.shape())
        })?;
    }
    if weight_grad == WeightGrad::Fresh {
        check_cuda_elements(device, weight.elem_count(), || {
            format!("linear cross-entropy: a weight {:?} whose gradient candle adds or casts", weight.shape())
        })?;
    }
    if engine == Engine::Autograd {
        check_cuda_elements(device, rows.saturating_mul(vocab), || {
            format!("linear cross-entropy: the [{rows}, {vocab}] logits that force_autograd forms with candle's ops")
        })?;
    }
    Ok(())
}

/// What a linear-loss call computes, once its inputs are validated.
pub(super) enum Plan {
    /// No token: nothing (see `EmptyCall`).
    Empty(LossCall),
    /// A device the kernels do not cover: the whole logits, recorded op by op
    /// for candle's autograd.
    Recorded(TokenCall),
    /// The chunk pass over the valid rows.
    Chunks(ChunkedCall),
}

/// A call for the chunk pass: its `[N, H]` rows (as given: the node attaches
/// to them), the checked `[N]` labels and their shape, `V`, the weights, the
/// engines' settings (`chunk_len` settled), the rows' weights and a `Mean`'s
/// denominator on the host, and the valid rows the products run on.
pub(super) struct ChunkedCall {
    pub(super) rows: Tensor,
    pub(super) labels: Tensor,
    pub(super) labels_shape: candle::Shape,
    pub(super) vocab: usize,
    pub(super) weights: CallWeights,
    pub(super) cfg: OpConfig,
    pub(super) row_weights: Option<RowWeights>,
    pub(super) denominator: f64,
    pub(super) selection: RowSelection,
    /// The dtype the weight's gradient is summed in (see [`LinearCrossEntropy::low_memory`]).
    pub(super) weight_sum: DType,
}

/// Checks `hidden`'s `H` (at least 1), `weight` (`[V, H]`) and `bias`
/// (`[V]`) against `hidden`'s dtype and device, and returns `V`.
fn checked_projection(hidden: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<usize> {
    let width = hidden.dim(candle::D::Minus1)?;
    if width == 0 {
        bail!("linear cross-entropy: hidden {:?} has no features (H = 0): nothing to project", hidden.shape())
    }
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
