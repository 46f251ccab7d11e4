//! Central finite differences in f64 against the hand-written backward (and
//! candle's autograd on the path of devices our kernels do not cover), for
//! every reduction and engine, with ignored rows, masks, `num_label_tokens`,
//! scaled and summed losses, and through an `lm_head`-style matmul.

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{ChunkedCrossEntropy, LinearCrossEntropy, Reduction};
use common::{backward_of, Rng};

/// Step of the central difference; with f64 maths the truncation error is
/// O(h^2) ~ 1e-10 and the rounding error O(eps / h) ~ 1e-10.
const STEP: f64 = 1e-5;
const TOLERANCE: f64 = 1e-8;

/// Checks `d f / d inputs` from candle's backward (through our op) against
/// central finite differences, element by element. `f` maps the inputs to a
/// scalar.
fn gradcheck(what: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> candle::Result<Tensor>) -> anyhow::Result<()> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<candle::Result<_>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&tensors)?.backward()?;
    for (k, input) in inputs.iter().enumerate() {
        let analytic: Vec<f64> = grads.get(&tensors[k]).expect("input without gradient").flatten_all()?.to_vec1()?;
        let base: Vec<f64> = input.flatten_all()?.to_vec1()?;
        for i in 0..base.len() {
            let value_at = |delta: f64| -> candle::Result<f64> {
                let mut moved = base.clone();
                moved[i] += delta;
                let mut args = inputs.to_vec();
                args[k] = Tensor::from_vec(moved, input.shape(), input.device())?;
                f(&args)?.to_scalar::<f64>()
            };
            let numeric = (value_at(STEP)? - value_at(-STEP)?) / (2.0 * STEP);
            let diff = (numeric - analytic[i]).abs();
            assert!(diff <= TOLERANCE, "{what}: input {k} element {i}: analytic {} vs numeric {numeric}", analytic[i]);
        }
    }
    Ok(())
}

/// Both engines, and candle's autograd as on a device our kernels do not cover.
fn engines() -> [ChunkedCrossEntropy; 3] {
    let fused = ChunkedCrossEntropy::new(2, true, -100);
    [fused.clone(), ChunkedCrossEntropy::new(2, false, -100), fused.force_autograd(true)]
}

/// Every engine of [`engines`], and the fused one writing its gradient in place.
fn engines_and_in_place() -> [ChunkedCrossEntropy; 4] {
    let [fused, primitive, autograd] = engines();
    [fused.clone(), primitive, autograd, fused.inplace_grad(true)]
}

/// The linear loss's engines in chunks of 2 rows, and candle's autograd.
fn linear_engines() -> [LinearCrossEntropy; 3] {
    let fused = LinearCrossEntropy::default().chunk_len(Some(2));
    [fused.clone(), fused.clone().compile(false), fused.force_autograd(true)]
}

/// Every reduction (`None` through a weighted sum), with ignored rows.
fn reductions_with_ignored_rows(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(21);
    let logits = common::logits(&mut rng, &[5, 7], 3.0, DType::F64, device)?;
    let labels = Tensor::new(&[3i64, -100, 0, 6, -100], device)?;
    for ce in engines() {
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let ce = ce.clone().reduction(reduction);
            gradcheck(&format!("{ce:?}"), std::slice::from_ref(&logits), |x| {
                backward_of(&ce.forward(&x[0], &labels, None)?)
            })?;
        }
    }
    Ok(())
}

/// `[B, S, V]` logits with a mask, and `num_label_tokens` for accumulation.
fn mask_and_num_label_tokens(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(22);
    let logits = common::logits(&mut rng, &[2, 3, 5], 3.0, DType::F64, device)?;
    let labels = common::labels(&mut rng, &[2, 3], 5, 0.0, -100, device)?;
    let mask = Tensor::new(&[[1u8, 0, 1], [1, 1, 0]], device)?;
    for ce in engines() {
        for num_label_tokens in [None, Some(11)] {
            gradcheck(&format!("{ce:?} num_label_tokens={num_label_tokens:?}"), std::slice::from_ref(&logits), |x| {
                ce.forward_with_num_label_tokens(&x[0], &labels, Some(&mask), num_label_tokens)
            })?;
        }
    }
    Ok(())
}

/// The loss scaled, and added to a second loss over the same logits (two
/// gradients accumulate into one).
fn scaled_and_summed_losses(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(23);
    let logits = common::logits(&mut rng, &[4, 6], 3.0, DType::F64, device)?;
    let labels_a = common::labels(&mut rng, &[4], 6, 0.25, -100, device)?;
    let labels_b = common::labels(&mut rng, &[4], 6, 0.25, -100, device)?;
    for ce in engines() {
        let sum = ce.clone().reduction(Reduction::Sum);
        gradcheck(&format!("{ce:?} scaled + summed"), std::slice::from_ref(&logits), |x| {
            let a = (ce.forward(&x[0], &labels_a, None)? * 3.0)?;
            let b = (sum.forward(&x[0], &labels_b, None)? * -0.5)?;
            let c = x[0].sqr()?.sum_all()?; // a non-loss term sharing the logits
            a + b + c
        })?;
    }
    Ok(())
}

/// Gradients reach the hidden states and the weight of an `lm_head` matmul,
/// also with the gradient written over the logits.
fn through_lm_head(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(24);
    let hidden = common::logits(&mut rng, &[2, 3, 4], 1.0, DType::F64, device)?;
    let weight = common::logits(&mut rng, &[4, 9], 1.0, DType::F64, device)?;
    let labels = common::labels(&mut rng, &[2, 3], 9, 0.2, -100, device)?;
    let configs = engines_and_in_place();
    for ce in configs {
        gradcheck(&format!("{ce:?} lm_head"), &[hidden.clone(), weight.clone()], |x| {
            let logits = x[0].broadcast_matmul(&x[1])?;
            ce.forward(&logits, &labels, None)
        })?;
    }
    Ok(())
}

/// Confident tokens (`p_y` close to 1), where `softmax - 1` cancels.
fn confident_tokens(device: &Device) -> anyhow::Result<()> {
    let logits = Tensor::new(&[[9.0f64, -2.0, 0.5], [0.1, 12.0, -1.0]], device)?;
    let labels = Tensor::new(&[0i64, 1], device)?;
    for ce in engines() {
        gradcheck(&format!("{ce:?} confident"), std::slice::from_ref(&logits), |x| ce.forward(&x[0], &labels, None))?;
    }
    Ok(())
}

/// The fused linear loss: gradients reach `hidden` and `weight` directly, for
/// every reduction, with a mask and `num_label_tokens`, and chunks of 2 rows.
fn linear_cross_entropy(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(25);
    let hidden = common::logits(&mut rng, &[2, 3, 4], 1.0, DType::F64, device)?;
    let weight = common::logits(&mut rng, &[9, 4], 1.0, DType::F64, device)?;
    let labels = common::labels(&mut rng, &[2, 3], 9, 0.2, -100, device)?;
    let mask = Tensor::new(&[[1u8, 1, 0], [1, 0, 1]], device)?;
    for ce in linear_engines() {
        for (reduction, num_label_tokens) in
            [(Reduction::Mean, None), (Reduction::Mean, Some(7)), (Reduction::Sum, None), (Reduction::None, None)]
        {
            let ce = ce.clone().reduction(reduction);
            gradcheck(&format!("linear {ce:?} {num_label_tokens:?}"), &[hidden.clone(), weight.clone()], |x| {
                backward_of(&ce.forward_with_num_label_tokens(&x[0], &x[1], &labels, Some(&mask), num_label_tokens)?)
            })?;
        }
    }
    Ok(())
}

/// `(label_smoothing, z_loss, logit_softcap)` settings: each option alone, and
/// all together.
const OPTIONS: [(f64, f64, Option<f64>); 4] =
    [(0.1, 0.0, None), (0.0, 0.05, None), (0.0, 0.0, Some(1.5)), (0.3, 0.02, Some(2.5))];

/// Label smoothing, z-loss and soft-capping on the logits path, for every
/// reduction and engine (and in place), with ignored rows and a mask.
fn loss_options(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(26);
    let logits = common::logits(&mut rng, &[2, 3, 7], 3.0, DType::F64, device)?;
    let labels = Tensor::new(&[[3i64, -100, 0], [6, 2, 1]], device)?;
    let mask = Tensor::new(&[[1u8, 1, 1], [1, 0, 1]], device)?;
    let configs = engines_and_in_place();
    for (smoothing, z_loss, softcap) in OPTIONS {
        for ce in &configs {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let ce =
                    ce.clone().reduction(reduction).label_smoothing(smoothing).z_loss(z_loss).logit_softcap(softcap);
                gradcheck(&format!("{ce:?}"), std::slice::from_ref(&logits), |x| {
                    // `inplace_grad` overwrites its input: give it a fresh one.
                    let logits = (&x[0] * 1.0)?;
                    backward_of(&ce.forward(&logits, &labels, Some(&mask))?)
                })?;
            }
        }
    }
    Ok(())
}

/// The options and a bias on the linear path: gradients of hidden, weight and
/// bias, both engines, chunks of 2 rows.
fn linear_options_and_bias(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(27);
    let hidden = common::logits(&mut rng, &[5, 4], 1.0, DType::F64, device)?;
    let weight = common::logits(&mut rng, &[8, 4], 1.0, DType::F64, device)?;
    let bias = common::logits(&mut rng, &[8], 1.0, DType::F64, device)?;
    let labels = Tensor::new(&[7i64, -100, 0, 3, 3], device)?;
    for (smoothing, z_loss, softcap) in [(0.0, 0.0, None)].into_iter().chain(OPTIONS) {
        for ce in linear_engines() {
            let ce = ce.label_smoothing(smoothing).z_loss(z_loss).logit_softcap(softcap);
            gradcheck(&format!("linear {ce:?}"), &[hidden.clone(), weight.clone(), bias.clone()], |x| {
                Ok(ce.forward_with_outputs(&x[0], &x[1], Some(&x[2]), &labels, None, None, None)?.loss)
            })?;
        }
    }
    Ok(())
}

/// Class weights (one of them 0) and per-token loss weights with every
/// option, for every reduction and engine on the logits path, and for the
/// linear loss's engines with a bias.
fn weighted_losses(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(28);
    let logits = common::logits(&mut rng, &[2, 3, 7], 3.0, DType::F64, device)?;
    let labels = Tensor::new(&[[3i64, -100, 0], [6, 2, 1]], device)?;
    let class_weights = Tensor::new(&[0.5f64, 2.0, 1.0, 0.0, 1.5, 0.25, 3.0], device)?;
    let loss_weights = Tensor::new(&[[1.0f64, 0.5, 2.0], [0.0, 1.5, 0.75]], device)?;
    for (smoothing, z_loss, softcap) in [(0.0, 0.0, None)].into_iter().chain(OPTIONS) {
        for ce in engines_and_in_place() {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let ce = ce
                    .clone()
                    .reduction(reduction)
                    .label_smoothing(smoothing)
                    .z_loss(z_loss)
                    .logit_softcap(softcap)
                    .class_weights(Some(class_weights.clone()));
                gradcheck(&format!("weighted {ce:?}"), std::slice::from_ref(&logits), |x| {
                    let logits = (&x[0] * 1.0)?;
                    backward_of(&ce.forward_weighted(&logits, &labels, None, &loss_weights)?)
                })?;
            }
        }
        let hidden = common::logits(&mut rng, &[6, 4], 1.0, DType::F64, device)?;
        let weight = common::logits(&mut rng, &[7, 4], 1.0, DType::F64, device)?;
        let bias = common::logits(&mut rng, &[7], 1.0, DType::F64, device)?;
        for ce in linear_engines() {
            let ce = ce
                .label_smoothing(smoothing)
                .z_loss(z_loss)
                .logit_softcap(softcap)
                .class_weights(Some(class_weights.clone()));
            gradcheck(&format!("weighted linear {ce:?}"), &[hidden.clone(), weight.clone(), bias.clone()], |x| {
                let out = ce.forward_with_outputs(
                    &x[0],
                    &x[1],
                    Some(&x[2]),
                    &labels.flatten_all()?,
                    None,
                    Some(&loss_weights.flatten_all()?),
                    None,
                )?;
                Ok(out.loss)
            })?;
        }
    }
    Ok(())
}

device_tests!(
    weighted_losses,
    loss_options,
    linear_options_and_bias,
    linear_cross_entropy,
    reductions_with_ignored_rows,
    mask_and_num_label_tokens,
    scaled_and_summed_losses,
    through_lm_head,
    confident_tokens,
);
