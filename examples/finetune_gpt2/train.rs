//! Data, batches, the loss (ours or candle-nn's), gradient accumulation with
//! the global token count, clipping and the learning-rate schedule.

use crate::gpt2::{Gpt2, Phase, TopLoss};
use crate::rng::Rng;
use crate::sum_squares::sum_of_squares;
use candle::backprop::GradStore;
use candle::{DType, Device, Result, Tensor};
use candle_chunked_ce::{ChunkedCrossEntropy, LinearCrossEntropy, LinearGradAccumulator};

/// Which cross-entropy the training uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LossKind {
    /// `candle_chunked_ce::ChunkedCrossEntropy` with the mask and the global token count.
    Chunked,
    /// `candle_nn::loss::cross_entropy` on the unmasked rows, rescaled to the global count.
    CandleNn,
    /// `candle_chunked_ce::LinearCrossEntropy` on the hidden states and the
    /// `lm_head` weight: the logits are never materialised.
    Linear,
}

/// Token sequences with a loss mask each (0: no loss on this token's prediction).
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub sequences: Vec<(Vec<u32>, Vec<u8>)>,
    /// Prompt/completion records, one sequence each (else plain text, one sequence).
    pub records: bool,
}

impl Dataset {
    /// Plain text: one sequence, every token trained on.
    pub fn from_tokens(tokens: Vec<u32>) -> Self {
        let mask = vec![1; tokens.len()];
        Self { sequences: vec![(tokens, mask)], records: false }
    }

    /// JSONL records `{"prompt": .., "completion": ..}`, one sequence each:
    /// the prompt's tokens, the completion's, then `end_of_text`; the prompt is
    /// masked out of the loss, the completion and its end are trained on
    /// (all but a sequence's first token, which is no token's label: with an
    /// empty prompt, the completion's first).
    /// Blank lines are skipped; `source` names the text in errors.
    pub fn from_jsonl(text: &str, source: &str, encode: impl Fn(&str) -> Vec<u32>, end_of_text: u32) -> Result<Self> {
        let mut data = Self { sequences: Vec::new(), records: true };
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let at = || format!("{source} line {}", i + 1);
            let record: serde_json::Value =
                serde_json::from_str(line).map_err(|e| candle::Error::Msg(format!("{}: not JSON: {e}", at())))?;
            let field = |name: &str| {
                record[name].as_str().ok_or_else(|| candle::Error::Msg(format!("{}: no string \"{name}\"", at())))
            };
            let (prompt, completion) = (encode(field("prompt")?), encode(field("completion")?));
            let mask = [vec![0u8; prompt.len()], vec![1u8; completion.len() + 1]].concat();
            data.sequences.push(([prompt, completion, vec![end_of_text]].concat(), mask));
        }
        Ok(data)
    }

    /// Total tokens.
    pub fn len(&self) -> usize {
        self.sequences.iter().map(|(t, _)| t.len()).sum()
    }

    /// Splits off the last `fraction` of the tokens (of plain text) or of the
    /// records (at least one) as validation data.
    ///
    /// # Errors
    /// Records of which fewer than two hold a token to train on: none would be
    /// left to train on or to validate with.
    pub fn split(self, fraction: f64) -> Result<(Self, Self)> {
        let records = self.records;
        if !records {
            let mut train = self;
            let mut val = Self::default();
            for (tokens, mask) in &mut train.sequences {
                let cut = ((tokens.len() as f64) * (1.0 - fraction)) as usize;
                val.sequences.push((tokens.split_off(cut), mask.split_off(cut)));
            }
            return Ok((train, val));
        }
        let mut train: Vec<(Vec<u32>, Vec<u8>)> =
            self.sequences.into_iter().filter(|(tokens, mask)| first_label(tokens, mask).is_some()).collect();
        if train.len() < 2 {
            candle::bail!(
                "{} record(s) with a token to train on: at least 2 are needed, one to train on and one to validate",
                train.len()
            )
        }
        let cut = (((train.len() as f64) * (1.0 - fraction)).ceil() as usize).clamp(1, train.len() - 1);
        let val = train.split_off(cut);
        Ok((Self { sequences: train, records }, Self { sequences: val, records }))
    }

    /// `batch` windows of `seq + 1` tokens at random places (records shorter
    /// than that are padded, with mask 0). Inputs are the first `seq` tokens,
    /// labels the next `seq`, and the mask is that of the labels. Each window
    /// reaches its sequence's first label trained on. A record is one
    /// example: where its completion and end fit in a window, the window ends
    /// with the record (a prompt too long for it is cut from its start); a
    /// longer completion is windowed at random from its first token on.
    ///
    /// # Errors
    /// No sequence with a label to train on.
    pub fn batch(&self, rng: &mut Rng, batch: usize, seq: usize, device: &Device) -> Result<Batch> {
        let (mut inputs, mut labels, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        // Stops at the first sequence with a label to train on (the first, after `split`).
        if !self.sequences.iter().any(|(tokens, mask)| first_label(tokens, mask).is_some()) {
            candle::bail!("the data has no token to train on (a sequence of at least two tokens, not all masked)")
        }
        for _ in 0..batch {
            // Uniform over the sequences with a label to train on: drawn again past one without.
            let (tokens, keep, first) = loop {
                let (tokens, keep) = &self.sequences[rng.below(self.sequences.len())];
                if let Some(first) = first_label(tokens, keep) {
                    break (tokens, keep, first);
                }
            };
            // Window starts from the first whose labels reach `first` to the last that fits.
            let (earliest, latest) = (first.saturating_sub(seq), tokens.len().saturating_sub(seq + 1));
            let drawn = earliest.min(latest) + rng.below(latest.saturating_sub(earliest) + 1);
            // A record whose trained tokens fit in a window ends it: its prompt is cut from the start.
            let start = if self.records && tokens.len() - first <= seq { latest } else { drawn };
            for i in 0..seq {
                let (x, y) = (start + i, start + i + 1);
                inputs.push(tokens.get(x).copied().unwrap_or(0));
                labels.push(tokens.get(y).copied().unwrap_or(0));
                mask.push(if y < tokens.len() { keep[y] } else { 0 });
            }
        }
        // Counted here, on the host: a count read back from the device would wait for
        // everything queued before it (the previous step's optimizer, on a GPU). The labels
        // and mask stay on the host too: the losses check and count them there, and copy
        // them to the device themselves, without a read back.
        let valid = mask.iter().filter(|&&keep| keep != 0).count();
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (batch, seq), device)?,
            labels: Tensor::from_vec(labels, (batch, seq), &Device::Cpu)?,
            mask: Tensor::from_vec(mask, (batch, seq), &Device::Cpu)?,
            valid,
        })
    }
}

/// The position of the first token trained on as a label (never the first
/// token, which is no token's label), if any.
fn first_label(tokens: &[u32], mask: &[u8]) -> Option<usize> {
    (1..tokens.len()).find(|&i| mask[i] != 0)
}

/// Inputs and labels `[B, T]` (u32) and the labels' loss mask `[B, T]` (u8);
/// from [`Dataset::batch`] the inputs on the model's device, the labels and
/// mask on the CPU.
#[derive(Debug, Clone)]
pub struct Batch {
    pub inputs: Tensor,
    pub labels: Tensor,
    pub mask: Tensor,
    /// The mask's non-zero elements.
    valid: usize,
}

impl Batch {
    /// A batch of these tensors; counts the mask's valid tokens (a read from
    /// its device).
    #[allow(dead_code)] // the tests' constructor; the example's batches come from `Dataset::batch`
    pub fn new(inputs: Tensor, labels: Tensor, mask: Tensor) -> Result<Self> {
        let valid = mask.ne(&mask.zeros_like()?)?.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize;
        Ok(Self { inputs, labels, mask, valid })
    }

    /// Tokens that count in the loss.
    pub fn valid_tokens(&self) -> usize {
        self.valid
    }
}

/// This batch's share of a loss whose sum is divided by `num_label_tokens`,
/// the valid tokens of all micro-batches of the step, through candle's graph.
#[allow(dead_code)] // the tests' whole-graph reference; training takes the linear loss's gradients directly
pub fn batch_loss(model: &Gpt2, batch: &Batch, kind: LossKind, num_label_tokens: usize) -> Result<Tensor> {
    hidden_loss(model, &model.hidden(&batch.inputs)?, batch, kind, num_label_tokens)
}

/// [`batch_loss`] from the model's final hidden states `[B, T, C]`.
fn hidden_loss(
    model: &Gpt2,
    hidden: &Tensor,
    batch: &Batch,
    kind: LossKind,
    num_label_tokens: usize,
) -> Result<Tensor> {
    let (labels, mask, n) = (&batch.labels, Some(&batch.mask), Some(num_label_tokens));
    match kind {
        LossKind::Linear => {
            LinearCrossEntropy::default().forward_with_num_label_tokens(hidden, model.lm_head(), labels, mask, n)
        }
        LossKind::Chunked => {
            // The logits are the head's fresh product, read by nothing but the loss: their
            // gradient may be formed in the forward pass, over them.
            let ce = ChunkedCrossEntropy::default().inplace_grad(true).grad_in_forward(true);
            ce.forward_with_num_label_tokens(&model.head(hidden)?, labels, mask, n)
        }
        LossKind::CandleNn => candle_nn_loss(&model.head(hidden)?, batch, num_label_tokens),
    }
}

/// candle-nn has no mask: keep the valid rows, take their mean, rescale to the global count.
fn candle_nn_loss(logits: &Tensor, batch: &Batch, num_label_tokens: usize) -> Result<Tensor> {
    let vocab = logits.dim(2)?;
    let keep: Vec<u8> = batch.mask.flatten_all()?.to_vec1()?;
    let rows: Vec<u32> = keep.iter().enumerate().filter(|(_, &k)| k != 0).map(|(i, _)| i as u32).collect();
    if rows.is_empty() || num_label_tokens == 0 {
        // A zero that stays in the graph (candle prunes `affine(0, _)` from backprop).
        return logits.sum_all()?.broadcast_mul(&Tensor::zeros((), DType::F32, logits.device())?);
    }
    let index = Tensor::new(rows.as_slice(), logits.device())?;
    let logits = logits.reshape(((), vocab))?.index_select(&index, 0)?;
    let labels = batch.labels.to_device(logits.device())?.flatten_all()?.index_select(&index, 0)?;
    candle_nn::loss::cross_entropy(&logits, &labels)? * (rows.len() as f64 / num_label_tokens as f64)
}

/// The loss and gradients of one optimizer step over `batches`
/// (micro-batches): their sum equals those of one batch holding them all.
/// Each micro-batch's gradients are those of [`batch_loss`]'s backward,
/// computed with activation checkpointing ([`Gpt2::loss_and_gradients`]):
/// bit for bit, but for the linear loss's output layer, whose gradient the
/// loss forms itself and sums over the micro-batches, in f32
/// (`LinearCrossEntropy::accumulate_grads`): the same gradient summed in
/// another order than candle's.
#[allow(dead_code)] // the tests' entry point; the example passes its --keep-activations
pub fn step_gradients(model: &Gpt2, batches: &[Batch], kind: LossKind) -> Result<(f32, GradStore)> {
    step_gradients_with(model, batches, kind, false)
}

/// [`step_gradients`], or with `keep_activations` every block's
/// activations alive during the backward pass instead of recomputed block
/// by block (faster, and more memory). Either way only the parameters'
/// gradients are kept, detached: those candle's backward returns (the top's,
/// for a loss candle differentiates) each hold the graph that computed them,
/// so that the sum would otherwise hold every micro-batch's graph until the
/// optimizer step.
pub fn step_gradients_with(
    model: &Gpt2,
    batches: &[Batch],
    kind: LossKind,
    keep_activations: bool,
) -> Result<(f32, GradStore)> {
    let (loss, grads) = step_gradients_timed(model, batches, kind, keep_activations, &mut |_| Ok(()))?;
    Ok((loss.to_scalar::<f32>()?, grads))
}

/// [`step_gradients_with`], calling `lap` as each phase of each micro-batch
/// ends, with the loss left on the device (an f32 scalar): nothing here reads
/// from the device (on a GPU a read waits for everything queued before it,
/// and the host stops queueing ahead), with the batches' labels on the host
/// (as [`Dataset::batch`] makes them) not even the losses' checks of them.
pub fn step_gradients_timed(
    model: &Gpt2,
    batches: &[Batch],
    kind: LossKind,
    keep_activations: bool,
    lap: &mut dyn FnMut(Phase) -> Result<()>,
) -> Result<(Tensor, GradStore)> {
    let num_label_tokens = batches.iter().map(Batch::valid_tokens).sum::<usize>();
    let mut total: Option<Tensor> = None;
    let mut sum = GradStore::default();
    // The linear loss takes its gradients directly: the output layer's accumulate
    // here, in f32, with no [V, C] zeros + add in candle's backward.
    let mut lm_head =
        (kind == LossKind::Linear).then(|| LinearGradAccumulator::new(model.lm_head(), None)).transpose()?;
    for batch in batches {
        let top_loss = |hidden: &Tensor| -> Result<TopLoss> {
            match lm_head.as_mut() {
                Some(acc) => {
                    let (labels, mask, n) = (&batch.labels, Some(&batch.mask), Some(num_label_tokens));
                    let step = LinearCrossEntropy::default().accumulate_grads(
                        hidden,
                        model.lm_head(),
                        None,
                        labels,
                        mask,
                        n,
                        acc,
                    )?;
                    Ok(TopLoss::Direct { loss: step.loss, hidden_grad: step.hidden_grad })
                }
                None => Ok(TopLoss::Graph(hidden_loss(model, hidden, batch, kind, num_label_tokens)?)),
            }
        };
        let (loss, mut grads) = model.loss_and_gradients(&batch.inputs, top_loss, keep_activations, lap)?;
        let loss = loss.detach();
        total = Some(match total {
            None => loss,
            Some(total) => (total + loss)?,
        });
        for (_, var) in model.named_vars() {
            if let Some(g) = grads.remove(var.as_tensor()) {
                let g = g.detach();
                let merged = match sum.remove(var.as_tensor()) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                sum.insert(var.as_tensor(), merged);
            }
        }
    }
    if let Some(acc) = lm_head {
        let head = model.lm_head();
        // Contiguous for the in-place AdamW (the CPU's sum is held transposed).
        let g = acc.weight_grad()?.to_dtype(head.dtype())?.contiguous()?;
        let merged = match sum.remove(head) {
            Some(other) => (other + g)?,
            None => g,
        };
        sum.insert(head, merged);
    }
    let total = match total {
        Some(total) => total,
        None => Tensor::zeros((), DType::F32, model.lm_head().device())?,
    };
    Ok((total, sum))
}

/// Names of the parameters without a gradient in `grads`.
pub fn missing_gradients(model: &Gpt2, grads: &GradStore) -> Vec<String> {
    model
        .named_vars()
        .into_iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
        .map(|(n, _)| n.to_string())
        .collect()
}

/// Gradient clipping, measured but not applied: the global L2 norm of the
/// gradients and the factor that brings it to at most `max_norm`.
pub struct Clip {
    /// The norm before clipping, an f64 scalar on the device.
    pub norm: Tensor,
    /// `max_norm / norm` where the norm is larger, else exactly 1 (as
    /// PyTorch's `clip_grad_norm_`): an f64 scalar on the device, for
    /// `AdamW::step_scaled`. `None` for an infinite `max_norm`.
    pub factor: Option<Tensor>,
}

/// The [`Clip`] of `grads`, all on the device: on a GPU nothing waits for it.
///
/// # Errors
/// A `max_norm` that is not positive (or is NaN).
pub fn clip_factor(model: &Gpt2, grads: &GradStore, max_norm: f64) -> Result<Clip> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        candle::bail!("gradient clipping: the largest norm must be positive (inf: no clipping), got {max_norm}")
    }
    let gradients: Vec<&Tensor> =
        model.named_vars().into_iter().filter_map(|(_, var)| grads.get(var.as_tensor())).collect();
    // 0 for no gradient, which then clips nothing.
    let norm = sum_of_squares(&gradients, model.lm_head().device())?.sqrt()?;
    if max_norm.is_infinite() {
        return Ok(Clip { norm, factor: None });
    }
    // max_norm / norm (one f64 division, rounded to each gradient's dtype where
    // it is applied) where the norm is larger, else exactly 1: a NaN norm (a NaN
    // gradient) clips nothing, on every device; an infinite one zeroes every
    // finite gradient.
    let clips = norm.gt(max_norm)?;
    let ceiling = Tensor::full(max_norm, (), norm.device())?;
    let factor = clips.where_cond(&(&ceiling / &norm)?, &norm.ones_like()?)?;
    Ok(Clip { norm, factor: Some(factor) })
}

/// Scales the gradients by their [`clip_factor`] (each rounded to its dtype),
/// for an optimizer that cannot take the factor itself. Returns the norm
/// before clipping, an f64 scalar on the device.
///
/// # Errors
/// Those of [`clip_factor`].
#[allow(dead_code)] // the tests' candle-nn AdamW path; the example's AdamW takes the factor
pub fn clip_grad_norm(model: &Gpt2, grads: &mut GradStore, max_norm: f64) -> Result<Tensor> {
    let Clip { norm, factor } = clip_factor(model, grads, max_norm)?;
    if let Some(factor) = factor {
        for (_, var) in model.named_vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                let clipped = g.broadcast_mul(&factor.to_dtype(g.dtype())?)?;
                grads.insert(var.as_tensor(), clipped);
            }
        }
    }
    Ok(norm)
}

/// Linear warm-up over `warmup` steps, then cosine decay to 10% of `peak`.
pub fn learning_rate(step: usize, steps: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()))
}
