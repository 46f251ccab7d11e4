//! The inputs: strides, batched shapes, masks and ignored labels of every
//! dtype, no valid token at all, and the gradient written over the logits.

use super::engines;
use crate::common::{self, assert_all_zero, assert_close, loss_and_grad, slow_loss_and_grad, Rng};
use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{compute_cross_entropy, ChunkedCrossEntropy, Reduction};

/// Transposed, narrowed and permuted logits give the same answer as their contiguous copies.
fn non_contiguous_logits(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(7);
    let labels2 = common::labels(&mut rng, &[9], 13, 0.2, -100, device)?;
    let labels3 = common::labels(&mut rng, &[2, 5], 13, 0.2, -100, device)?;
    let transposed = common::logits(&mut rng, &[13, 9], 4.0, DType::F32, device)?.t()?;
    let shifted = common::logits(&mut rng, &[2, 6, 13], 4.0, DType::F32, device)?.narrow(1, 0, 5)?;
    let permuted = common::logits(&mut rng, &[5, 2, 13], 4.0, DType::F32, device)?.transpose(0, 1)?;
    let vocab_slice = common::logits(&mut rng, &[9, 20], 4.0, DType::F32, device)?.narrow(1, 4, 13)?;
    let cases = [(transposed, &labels2), (shifted, &labels3), (permuted, &labels3), (vocab_slice, &labels2)];
    for (logits, labels) in cases {
        assert!(!logits.is_contiguous());
        for ce in engines(2) {
            let ce = ce.reduction(Reduction::None);
            let (loss, grad) = loss_and_grad(&ce, &logits, labels, None, None)?;
            let (want_loss, want_grad) = loss_and_grad(&ce, &logits.contiguous()?, labels, None, None)?;
            let what = format!("{:?} strides {:?}", logits.shape(), logits.stride());
            assert_close(&loss, &want_loss, 1e-6, 0.0, &format!("{what} loss"))?;
            assert_close(&grad, &want_grad, 1e-6, 1e-12, &format!("{what} grad"))?;
        }
    }
    Ok(())
}

/// `[B, S, V]` logits with `[B, S]` labels: per-token losses come back `[B, S]`
/// and equal those of the flattened `[B*S, V]` problem.
fn batched_shapes(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(8);
    let logits = common::logits(&mut rng, &[3, 4, 19], 5.0, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[3, 4], 19, 0.2, -100, device)?;
    for ce in engines(5) {
        let ce = ce.reduction(Reduction::None);
        let (loss, grad) = loss_and_grad(&ce, &logits, &labels, None, None)?;
        assert_eq!(loss.dims(), &[3, 4]);
        assert_eq!(grad.dims(), &[3, 4, 19]);
        let (flat_loss, flat_grad) =
            loss_and_grad(&ce, &logits.reshape((12, 19))?, &labels.flatten_all()?, None, None)?;
        assert_close(&loss.flatten_all()?, &flat_loss, 1e-6, 0.0, "batched loss")?;
        assert_close(&grad.reshape((12, 19))?, &flat_grad, 1e-6, 1e-12, "batched grad")?;
    }
    Ok(())
}

/// A mask zeroes exactly the tokens it marks, as if their labels were
/// `ignore_index`, and leaves the caller's labels untouched.
fn mask_equals_ignore_index(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(9);
    let logits = common::logits(&mut rng, &[2, 8, 23], 5.0, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[2, 8], 23, 0.0, -100, device)?;
    let mask = common::mask(&mut rng, &[2, 8], 0.6, device)?;
    let ignored = Tensor::full(-100i64, (2, 8), device)?;
    let masked_labels = mask.ne(0u8)?.where_cond(&labels, &ignored)?;
    let before: Vec<Vec<i64>> = labels.to_vec2()?;
    for ce in engines(4) {
        let via_mask = loss_and_grad(&ce, &logits, &labels, Some(&mask), None)?;
        let via_labels = loss_and_grad(&ce, &logits, &masked_labels, None, None)?;
        assert_close(&via_mask.0, &via_labels.0, 0.0, 0.0, "masked loss")?;
        assert_close(&via_mask.1, &via_labels.1, 0.0, 0.0, "masked grad")?;
    }
    assert_eq!(labels.to_vec2::<i64>()?, before, "labels were modified");
    Ok(())
}

/// Unusual ignore values (as in Liger's tests) and every label dtype, whole
/// and as a strided view (the labels that follow each token: `[B, S]` of a
/// `[B, S + 1]` tensor), through every entry point of the loss.
fn ignore_values_and_label_dtypes(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(10);
    let logits = common::logits(&mut rng, &[3, 4, 7], 5.0, DType::F32, device)?;
    let values: Vec<i64> = (0..15).map(|_| rng.below(7) as i64).collect();
    for ignore_index in [2i64, -123, -100] {
        let wide = Tensor::from_vec(values.clone(), (3, 5), device)?;
        let want_labels = wide.narrow(1, 1, 4)?;
        let (want, want_grad) = slow_loss_and_grad(&logits, &want_labels, None, ignore_index, Reduction::Mean, None)?;
        for dtype in common::LABEL_DTYPES {
            let wide = common::labels_as(&values, &[3, 5], dtype, device)?;
            let shifted = wide.narrow(1, 1, 4)?;
            let whole = shifted.copy()?;
            for (labels, layout) in [(&whole, "contiguous"), (&shifted, "strided")] {
                for ce in engines(5) {
                    let ce = ce.ignore_index(ignore_index);
                    let what = format!("ignore_index={ignore_index} labels {dtype:?} {layout} {ce:?}");
                    let (loss, grad) = loss_and_grad(&ce, &logits, labels, None, None)?;
                    assert_close(&loss, &want, 1e-6, 0.0, &format!("{what} loss"))?;
                    assert_close(&grad, &want_grad, 1e-5, 1e-9, &format!("{what} grad"))?;
                    let out = ce.clone().forward_with_outputs(&logits, labels, None, None, None)?;
                    assert_close(&out.loss, &want, 1e-6, 0.0, &format!("{what} forward_with_outputs"))?;
                    let weights = Tensor::ones((3, 4), DType::F32, device)?;
                    let weighted = ce.clone().forward_weighted(&logits, labels, None, &weights)?;
                    assert_close(&weighted, &want, 1e-6, 0.0, &format!("{what} forward_weighted"))?;
                }
                let sum = compute_cross_entropy(&logits, labels, ignore_index)?;
                let valid = values.chunks(5).flat_map(|row| &row[1..]).filter(|&&v| v != ignore_index).count();
                let want_sum = (&want * valid as f64)?;
                assert_close(&sum, &want_sum, 1e-6, 0.0, &format!("{dtype:?} {layout} compute_cross_entropy"))?;
            }
        }
    }
    Ok(())
}

/// A mask of every integer and float dtype, strided, ignores exactly the
/// tokens where it is 0 (a float mask's -0.0 too; NaN is not 0), as
/// `ignore_index` labels do.
fn mask_dtypes(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(13);
    let logits = common::logits(&mut rng, &[2, 6, 11], 5.0, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[2, 6], 11, 0.0, -100, device)?;
    // Columns 1..7 of a [2, 8] mask: 0 at tokens 1, 4, 7 and 11 (-0.0 at 4 for floats; NaN, not 0, at 5).
    let keep: [f64; 16] = [9.0, 1.0, 0.0, 2.0, 1.0, -0.0, 3.0, 7.0, 5.0, 1.0, 0.0, 4.0, 1.0, 8.0, 0.0, 2.0];
    let mut ignored: Vec<i64> = labels.flatten_all()?.to_vec1()?;
    for token in [1, 4, 7, 11] {
        ignored[token] = -100;
    }
    let ignored = Tensor::from_vec(ignored, (2, 6), device)?;
    let float = |k: f64, nan: f64| if k == 3.0 { nan } else { k };
    let masks = [
        Tensor::from_vec(keep.map(|k| k.abs() as u8).to_vec(), (2, 8), device)?,
        Tensor::from_vec(keep.map(|k| k.abs() as u32).to_vec(), (2, 8), device)?,
        Tensor::from_vec(keep.map(|k| -(k.abs() as i16)).to_vec(), (2, 8), device)?,
        Tensor::from_vec(keep.map(|k| k.abs() as i32 * 65536).to_vec(), (2, 8), device)?,
        Tensor::from_vec(keep.map(|k| k.abs() as i64 * (1 << 40)).to_vec(), (2, 8), device)?,
        Tensor::from_vec(keep.map(|k| half::bf16::from_f64(float(k, f64::NAN))).to_vec(), (2, 8), device)?,
        Tensor::from_vec(keep.map(|k| half::f16::from_f64(float(k, f64::NAN))).to_vec(), (2, 8), device)?,
        Tensor::from_vec(keep.map(|k| float(k, f64::NAN) as f32).to_vec(), (2, 8), device)?,
        Tensor::from_vec(keep.map(|k| float(k, f64::NAN)).to_vec(), (2, 8), device)?,
    ];
    for ce in engines(4) {
        let ce = ce.reduction(Reduction::None);
        let want = loss_and_grad(&ce, &logits, &ignored, None, None)?;
        for mask in &masks {
            let mask = mask.narrow(1, 1, 6)?;
            let what = format!("mask {:?} {ce:?}", mask.dtype());
            let got = loss_and_grad(&ce, &logits, &labels, Some(&mask), None)?;
            assert_close(&got.0, &want.0, 0.0, 0.0, &format!("{what} per-token"))?;
            assert_close(&got.1, &want.1, 0.0, 0.0, &format!("{what} grad"))?;
        }
    }
    Ok(())
}

/// No valid token: loss and gradient exactly 0 (PyTorch gives NaN), and the
/// loss still reaches the logits in the graph. Every case of it (every token
/// ignored or masked, `num_label_tokens = 0`, no tokens at all: `[0, V]`,
/// `[B, 0, V]`, `[0, 0]`) through every entry point and reduction, with and
/// without every option: on CUDA, where an empty kernel launch is an error,
/// nothing may be launched over an empty problem.
fn nothing_to_learn_is_exactly_zero(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(11);
    let logits = common::logits(&mut rng, &[5, 9], 5.0, DType::F32, device)?;
    let all_ignored = Tensor::full(-100i64, 5, device)?;
    let labels = common::labels(&mut rng, &[5], 9, 0.0, -100, device)?;
    let none_kept = Tensor::zeros(5, DType::U8, device)?;
    let empty_logits = Tensor::zeros((0, 9), DType::F32, device)?;
    let empty_labels = Tensor::zeros(0, DType::I64, device)?;
    let no_positions = Tensor::zeros((2, 0, 9), DType::BF16, device)?;
    let no_position_labels = Tensor::zeros((2, 0), DType::I32, device)?;
    let no_classes = Tensor::zeros((0, 0), DType::F32, device)?;
    type Case<'a> = (&'a Tensor, &'a Tensor, Option<&'a Tensor>, Option<usize>);
    let cases: [Case; 6] = [
        (&logits, &all_ignored, None, None),
        (&logits, &labels, Some(&none_kept), None),
        (&logits, &labels, None, Some(0)),
        (&empty_logits, &empty_labels, None, None),
        (&no_positions, &no_position_labels, None, None),
        (&no_classes, &empty_labels, None, None),
    ];
    let options = |ce: ChunkedCrossEntropy| {
        let vocab_weights = Tensor::ones(9, DType::F32, device)?;
        Ok::<_, candle::Error>(
            ce.label_smoothing(0.1).z_loss(1e-3).logit_softcap(Some(20.0)).class_weights(Some(vocab_weights)),
        )
    };
    for (logits, labels, mask, num_label_tokens) in cases {
        let vocab = logits.dim(candle::D::Minus1)?;
        for ce in engines(2) {
            let with_options = if vocab == 9 { vec![ce.clone(), options(ce.clone())?] } else { vec![ce.clone()] };
            for ce in with_options {
                for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                    if reduction != Reduction::Mean && num_label_tokens.is_some() {
                        continue;
                    }
                    let ce = ce.clone().reduction(reduction);
                    let what =
                        format!("{:?} {reduction:?} num_label_tokens={num_label_tokens:?} {ce:?}", logits.shape());
                    // candle cannot start a backward pass from an empty tensor on CUDA (its
                    // `ones_like` launches an empty grid): empty per-token losses are only
                    // checked forward.
                    let differentiable = reduction != Reduction::None || labels.elem_count() > 0;
                    if differentiable {
                        let (loss, grad) = loss_and_grad(&ce, logits, labels, mask, num_label_tokens)?;
                        assert_all_zero(&loss, &format!("{what}: loss"))?;
                        assert_eq!(grad.dims(), logits.dims(), "{what}: gradient shape");
                        assert_all_zero(&grad, &format!("{what}: gradient"))?;
                    }
                    let var = Var::from_tensor(logits)?;
                    let out = ce.forward_with_outputs(var.as_tensor(), labels, mask, None, num_label_tokens)?;
                    assert_all_zero(&out.loss, &format!("{what}: outputs' loss"))?;
                    assert_all_zero(&out.z_loss, &format!("{what}: outputs' z_loss"))?;
                    assert_eq!(out.token_losses.dims(), labels.dims(), "{what}: token_losses shape");
                    // With `num_label_tokens = 0` the tokens are valid: only the reduced loss is 0.
                    let no_valid_token = num_label_tokens.is_none();
                    if no_valid_token {
                        assert_all_zero(&out.token_losses, &format!("{what}: outputs' token_losses"))?;
                        assert_all_zero(&out.lse, &format!("{what}: outputs' lse"))?;
                        assert_eq!(out.token_accuracy.to_scalar::<f32>()?, 0.0, "{what}: token accuracy");
                    }
                    let objective = if labels.elem_count() > 0 && no_valid_token {
                        Some((common::backward_of(&out.loss)? + common::backward_of(&out.token_losses)?)?)
                    } else {
                        differentiable.then(|| out.loss.clone())
                    };
                    if let Some(objective) = objective {
                        let grads = objective.backward()?;
                        let grad = grads.get(var.as_tensor()).expect("outputs: no gradient");
                        assert_all_zero(grad, &format!("{what}: outputs' gradient"))?;
                    }
                    if num_label_tokens.is_none() {
                        // (Zeros when empty: candle's `ones` launches a fill kernel.)
                        let weights = match labels.elem_count() {
                            0 => Tensor::zeros(labels.dims(), DType::F32, device)?,
                            _ => Tensor::ones(labels.dims(), DType::F32, device)?,
                        };
                        let weighted = ce.forward_weighted(logits, labels, mask, &weights)?;
                        assert_all_zero(&weighted, &format!("{what}: forward_weighted"))?;
                    }
                }
            }
        }
        if mask.is_none() && num_label_tokens.is_none() {
            let sum = compute_cross_entropy(logits, labels, -100)?;
            assert_all_zero(&sum, &format!("{:?}: compute_cross_entropy", logits.shape()))?;
        }
    }
    Ok(())
}

/// `inplace_grad` gives the same gradient, and writes it into the logits' storage.
fn inplace_grad_reuses_logits(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(12);
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let logits = common::logits(&mut rng, &[2, 7, 31], 6.0, dtype, device)?;
        let labels = common::labels(&mut rng, &[2, 7], 31, 0.3, -100, device)?;
        let ce = ChunkedCrossEntropy::default().chunk_len(3);
        let (want_loss, want_grad) = loss_and_grad(&ce, &logits, &labels, None, None)?;

        let var = Var::from_tensor(&logits)?;
        let loss = ce.clone().inplace_grad(true).forward(var.as_tensor(), &labels, None)?;
        let grads = loss.backward()?;
        let grad = grads.get(var.as_tensor()).expect("no gradient");
        assert_close(&loss, &want_loss, 0.0, 0.0, &format!("{dtype:?} in-place loss"))?;
        assert_close(grad, &want_grad, 0.0, 0.0, &format!("{dtype:?} in-place grad"))?;
        // The logits' own storage now holds the gradient.
        assert_close(var.as_tensor(), &want_grad, 0.0, 0.0, &format!("{dtype:?} logits storage"))?;
    }
    Ok(())
}

device_tests!(
    non_contiguous_logits,
    batched_shapes,
    mask_equals_ignore_index,
    ignore_values_and_label_dtypes,
    mask_dtypes,
    nothing_to_learn_is_exactly_zero,
    inplace_grad_reuses_logits,
);
