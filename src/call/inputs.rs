//! The checks of a call's inputs (logits or hidden states, labels and mask,
//! class and per-token loss weights), and its weights in the loss's dtype.

use super::{ClassWeights, Settings};
use crate::candle_limits::check_cuda_elements;
use crate::config::{compute_dtype, LABEL_DTYPES};
use crate::op::RowWeights;
use candle::{bail, DType, Result, Shape, Tensor};

impl Settings {
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
            // Gathered at class 0 for ignored tokens; clamped into [0, V) for a bad label, which
            // the forward reports (candle's CUDA gather does not check its indices).
            let safe = valid.where_cond(labels, &labels.zeros_like()?)?.clamp(0i64, vocab as i64 - 1)?;
            let class = class.to_dtype(dtype)?;
            weights.target_class = Some((class.gather(&safe, 0)? * valid.to_dtype(dtype)?)?);
            weights.sum_weights = Some(class).filter(|_| self.label_smoothing > 0.0);
        }
        if let Some(token) = token {
            weights.token = Some(token.flatten_all()?.to_dtype(dtype)?);
        }
        Ok(weights)
    }
}

/// The validated weights of one call (see [`crate::ChunkedCrossEntropy`]'s docs), in
/// the loss's dtype on the logits' device; `None` where the call has none.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallWeights {
    /// `t`, `[N]`: the tokens' loss weights.
    pub(super) token: Option<Tensor>,
    /// `c_y`, `[N]`: each token's target-class weight, 0 on ignored tokens.
    pub(super) target_class: Option<Tensor>,
    /// `c`, `[V]`, where the logit sum they weigh is computed (with label
    /// smoothing): [`crate::config::OpConfig::sum_weights`].
    pub sum_weights: Option<Tensor>,
    /// `C / V = Σ_j c_j / V`, 1 without class weights.
    pub(super) mean_class: f64,
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
    pub(super) fn denominator(&self, labels: &Tensor, ignore_index: i64, dtype: DType) -> Result<Tensor> {
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
    /// replaces a zero (see [`Settings::unit_factors`]).
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

/// Checks rank and dtype, and gives the vocabulary dim unit stride (a copy
/// only when it has another stride, e.g. transposed logits; refused on CUDA
/// past what candle's copy can count, see `candle_limits`).
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
        check_cuda_elements(logits.device(), logits.elem_count(), || {
            format!(
                "chunked cross-entropy: {:?} inputs without a unit-stride last dim, which candle copies",
                logits.shape()
            )
        })?;
        logits.contiguous()
    }
}

/// A call's labels: `[N]` contiguous i64 on the logits' device, masked tokens
/// set to `ignore_index`, and the same values on the host when the caller's
/// labels (and mask) were on the CPU, so that checking and counting them needs
/// no read from the device (on CUDA such a read waits for all the work queued
/// before it: the model's forward pass, say).
pub(crate) struct CallLabels {
    pub(crate) tensor: Tensor,
    host: Option<Vec<i64>>,
}

impl CallLabels {
    /// Whether the values are on the host already.
    pub(crate) fn on_host(&self) -> bool {
        self.host.is_some()
    }

    /// The values on the host: the caller's, or read back from the device.
    pub(crate) fn host_values(&self) -> Result<std::borrow::Cow<'_, [i64]>> {
        match &self.host {
            Some(values) => Ok(std::borrow::Cow::Borrowed(values)),
            None => Ok(std::borrow::Cow::Owned(self.tensor.to_vec1::<i64>()?)),
        }
    }
}

/// Checks labels (and mask) against the logits (`[.., V]`, or the linear
/// loss's `[.., H]` hidden states) and the vocabulary size `V`, and returns
/// them as [`CallLabels`]. The labels are on the logits' device or on the CPU
/// (the mask on the labels' device); from the CPU they are converted there and
/// copied to the logits' device. The caller's tensors are not modified.
pub(crate) fn checked_labels(
    logits: &Tensor,
    vocab: usize,
    labels: &Tensor,
    mask: Option<&Tensor>,
    ignore_index: i64,
) -> Result<CallLabels> {
    let expected = &logits.dims()[..logits.rank() - 1];
    if labels.dims() != expected {
        bail!(
            "chunked cross-entropy: labels {:?} must have the logits' shape {:?} without the vocabulary dim, i.e. {expected:?}",
            labels.shape(),
            logits.shape()
        )
    }
    if !LABEL_DTYPES.contains(&labels.dtype()) {
        bail!(
            "chunked cross-entropy: labels must be an integer dtype (u8, u32, i16, i32, i64), got {:?}",
            labels.dtype()
        )
    }
    if !labels.device().same_device(logits.device()) && !labels.device().is_cpu() {
        bail!(
            "chunked cross-entropy: labels are on {:?} but logits on {:?} (labels may be on the logits' device or \
             on the CPU)",
            labels.device(),
            logits.device()
        )
    }
    if let Some(mask) = mask {
        if mask.dims() != expected {
            bail!("chunked cross-entropy: mask {:?} must have the labels' shape {expected:?}", mask.shape())
        }
    }
    if labels.elem_count() > 0 && vocab == 0 {
        bail!("chunked cross-entropy: an empty vocabulary (V = 0) cannot predict {} tokens", labels.elem_count())
    }
    let converted = crate::labels::row_labels(labels, mask, ignore_index)?;
    if !labels.device().is_cpu() {
        return Ok(CallLabels { tensor: converted, host: None });
    }
    let host = converted.to_vec1::<i64>()?;
    let tensor = match (logits.device().is_cpu(), host.len()) {
        (true, _) => converted,
        // Nothing to copy (the CUDA path launches and copies nothing for no tokens).
        (false, 0) => Tensor::zeros(0, DType::I64, logits.device())?,
        // One host-to-device copy of N i64, instead of a read back that would wait for the
        // device's queued work.
        (false, n) => Tensor::from_slice(&host, n, logits.device())?,
    };
    Ok(CallLabels { tensor, host: Some(host) })
}

/// The number of labels that are not `ignore_index`, at least 1, as a scalar
/// of `dtype` on the labels' device (no host round trip).
pub(crate) fn valid_count(labels: &Tensor, ignore_index: i64, dtype: DType) -> Result<Tensor> {
    labels.ne(ignore_index as f64)?.to_dtype(dtype)?.sum_all()?.maximum(1f64)
}
