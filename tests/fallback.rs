//! The path of devices our kernels do not cover (Metal, or CUDA without this
//! crate's `cuda` feature), forced with `force_autograd` on the CPU (and on
//! CUDA when present): candle's primitive ops differentiated by candle's
//! autograd give the engines' outputs and gradients for every option,
//! reduction, mask and ignored row, with NaN and infinite logits, and for the
//! linear loss. parity.rs, gradcheck.rs and errors.rs run it as a third engine
//! as well.

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{ChunkedCrossEntropy, CrossEntropyOutput, LinearCrossEntropy, Reduction};
use common::{assert_close, assert_close_nonfinite, backward_of, max_abs, Rng};

/// `(label_smoothing, z_loss, logit_softcap)`: none, each, all, and a
/// smoothing of 1 (the loss without its `ce` term).
const OPTIONS: [(f64, f64, Option<f64>); 5] =
    [(0.0, 0.0, None), (0.1, 0.0, None), (0.0, 1e-3, Some(30.0)), (0.2, 1e-4, Some(3.0)), (1.0, 0.0, None)];

/// The reductions, with `num_label_tokens` for `Mean`.
const REDUCTIONS: [(Reduction, Option<usize>); 5] = [
    (Reduction::Mean, None),
    (Reduction::Mean, Some(40)),
    (Reduction::Mean, Some(0)),
    (Reduction::Sum, None),
    (Reduction::None, None),
];

fn with_options(ce: ChunkedCrossEntropy, (smoothing, z_loss, softcap): (f64, f64, Option<f64>)) -> ChunkedCrossEntropy {
    ce.label_smoothing(smoothing).z_loss(z_loss).logit_softcap(softcap)
}

/// Every output of `ce` on `logits` narrowed to `[.., ..S-1, V]` (strided, as a
/// shift for next-token prediction), and the gradient of the full logits
/// from `backward_of(loss)`.
fn outputs_and_grad(
    ce: &ChunkedCrossEntropy,
    logits: &Tensor,
    labels: &Tensor,
    mask: Option<&Tensor>,
    num_label_tokens: Option<usize>,
) -> anyhow::Result<(CrossEntropyOutput, Tensor)> {
    let var = Var::from_tensor(logits)?;
    let shifted = var.as_tensor().narrow(1, 0, logits.dim(1)? - 1)?;
    let out = ce.forward_with_outputs(&shifted, labels, mask, None, num_label_tokens)?;
    let grads = backward_of(&out.loss)?.backward()?;
    let grad = grads.get(var.as_tensor()).expect("logits without gradient").clone();
    Ok((out, grad))
}

/// Every output and the gradient against the fused engine's, in f32, bf16 and
/// f64, with a mask and ignored labels, whatever `compile`, `chunk_len` and
/// `inplace_grad` say (they do not apply to this path).
fn every_option_and_output(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(51);
    let vocab = 301;
    let exact = common::logits(&mut rng, &[3, 8, vocab], 12.0, DType::F64, device)?;
    let labels = common::labels(&mut rng, &[3, 7], vocab, 0.2, -100, device)?;
    let mask = common::mask(&mut rng, &[3, 7], 0.8, device)?;
    // (dtype, outputs' rtol, gradient's rtol): the gradient is rounded once to the logits' dtype.
    for (dtype, rtol, grad_rtol) in
        [(DType::F32, 2e-6, 1e-5), (DType::BF16, 2e-6, 1.0 / 128.0), (DType::F64, 1e-12, 1e-12)]
    {
        let logits = exact.to_dtype(dtype)?;
        for options in OPTIONS {
            for (reduction, num_label_tokens) in REDUCTIONS {
                let engine = with_options(ChunkedCrossEntropy::default(), options).reduction(reduction);
                let (want, want_grad) = outputs_and_grad(&engine, &logits, &labels, Some(&mask), num_label_tokens)?;
                for fallback in
                    [engine.clone(), engine.clone().compile(false).chunk_len(4), engine.clone().inplace_grad(true)]
                {
                    let fallback = fallback.force_autograd(true);
                    let (got, grad) = outputs_and_grad(&fallback, &logits, &labels, Some(&mask), num_label_tokens)?;
                    let what = format!("{dtype:?} {num_label_tokens:?} {fallback:?}");
                    assert_eq!(grad.dtype(), dtype, "{what}: gradient dtype");
                    let atol = 1e-3 * rtol;
                    assert_close(&got.loss, &want.loss, rtol, atol, &format!("{what}: loss"))?;
                    assert_close(&got.z_loss, &want.z_loss, rtol, atol, &format!("{what}: z_loss"))?;
                    assert_close(&got.token_losses, &want.token_losses, rtol, atol, &format!("{what}: token losses"))?;
                    assert_close(&got.lse, &want.lse, rtol, atol, &format!("{what}: lse"))?;
                    assert_close(&got.token_accuracy, &want.token_accuracy, 0.0, 0.0, &format!("{what}: accuracy"))?;
                    // Relative to the largest element: the soft-cap's slope `1 - tanh²` is
                    // exact to about 1e-7 absolute, and smoothing's `p_j - ε / V` cancels.
                    let grad_atol = grad_rtol * 0.1 * max_abs(&want_grad)?;
                    assert_close(&grad, &want_grad, grad_rtol, grad_atol, &format!("{what}: gradient"))?;
                }
            }
        }
    }
    Ok(())
}

/// Ignored and masked rows get an exact zero gradient whatever they hold; in
/// valid rows NaN, `+inf` and `-inf` give what the primitive engine (the same
/// maths in its node) gives, NaN where it gives NaN, with and without the
/// soft-cap that makes infinities finite. The fused engine's token accuracy
/// agrees too: a row of `-inf` with label 0 counts, as `argmax` picks class 0.
fn non_finite_logits(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(52);
    let (rows, vocab) = (9, 11);
    let mut values: Vec<f64> =
        common::logits(&mut rng, &[rows, vocab], 4.0, DType::F64, device)?.flatten_all()?.to_vec1()?;
    let labels = [1i64, 2, 3, 2, 0, -100, 4, 5, 6];
    let mut set = |row: usize, col: usize, value: f64| values[row * vocab + col] = value;
    set(0, 3, f64::NAN);
    set(1, 5, f64::INFINITY);
    set(2, 7, f64::NEG_INFINITY);
    set(3, 2, f64::NEG_INFINITY); // the target itself: an infinite loss, a finite gradient
    for col in 0..vocab {
        set(4, col, f64::NEG_INFINITY);
    }
    set(5, 0, f64::NAN); // ignored by its label
    set(6, 1, f64::INFINITY); // masked
    set(7, 0, f64::INFINITY); // both infinities in one row
    set(7, 1, f64::NEG_INFINITY);
    set(8, 6, f64::INFINITY); // +inf at the target
    let mask = Tensor::new(&[1u8, 1, 1, 1, 1, 1, 0, 1, 1], device)?;
    let labels = Tensor::new(&labels, device)?;
    // Two copies of each row along dim 1, for `outputs_and_grad`'s narrowing.
    let logits = Tensor::from_vec(values, (rows, 1, vocab), device)?.repeat((1, 2, 1))?;
    let labels = labels.unsqueeze(1)?;
    let mask = mask.unsqueeze(1)?;
    for dtype in [DType::F32, DType::BF16] {
        let logits = logits.to_dtype(dtype)?;
        for options in [(0.0, 0.0, None), (0.1, 1e-3, None), (0.0, 0.0, Some(5.0)), (0.1, 1e-3, Some(5.0))] {
            for reduction in [Reduction::Sum, Reduction::None] {
                let engine = with_options(ChunkedCrossEntropy::default(), options).reduction(reduction).compile(false);
                let (want, want_grad) = outputs_and_grad(&engine, &logits, &labels, Some(&mask), None)?;
                let fallback = engine.force_autograd(true);
                let (got, grad) = outputs_and_grad(&fallback, &logits, &labels, Some(&mask), None)?;
                let what = format!("{dtype:?} {fallback:?}");
                assert_close_nonfinite(&got.loss, &want.loss, 1e-6, 1e-7, &format!("{what}: loss"))?;
                let (got_losses, want_losses) = (&got.token_losses, &want.token_losses);
                assert_close_nonfinite(got_losses, want_losses, 1e-6, 1e-7, &format!("{what}: token losses"))?;
                assert_close_nonfinite(&got.lse, &want.lse, 1e-6, 1e-7, &format!("{what}: lse"))?;
                assert_close(&got.token_accuracy, &want.token_accuracy, 0.0, 0.0, &format!("{what}: accuracy"))?;
                let fused = with_options(ChunkedCrossEntropy::default(), options).reduction(reduction);
                let (fused, _) = outputs_and_grad(&fused, &logits, &labels, Some(&mask), None)?;
                let what_fused = format!("{what}: fused accuracy");
                assert_close(&fused.token_accuracy, &want.token_accuracy, 0.0, 0.0, &what_fused)?;
                let grad_rtol = if dtype == DType::BF16 { 1.0 / 128.0 } else { 1e-5 };
                assert_close_nonfinite(&grad, &want_grad, grad_rtol, 1e-7, &format!("{what}: gradient"))?;
                let grad_rows: Vec<Vec<f32>> = grad.to_dtype(DType::F32)?.narrow(1, 0, 1)?.squeeze(1)?.to_vec2()?;
                for row in [5, 6] {
                    assert!(grad_rows[row].iter().all(|&g| g == 0.0), "{what}: row {row}: {:?}", grad_rows[row]);
                }
            }
        }
    }
    Ok(())
}

/// `inplace_grad` does not apply to candle's autograd: the logits are left as
/// they were, and the gradient is the engines'.
fn inplace_grad_leaves_logits_alone(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(53);
    let logits = common::logits(&mut rng, &[6, 17], 5.0, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[6], 17, 0.2, -100, device)?;
    let (_, want_grad) = common::loss_and_grad(&ChunkedCrossEntropy::default(), &logits, &labels, None, None)?;
    let var = Var::from_tensor(&logits)?;
    let ce = ChunkedCrossEntropy::default().inplace_grad(true).force_autograd(true);
    let grads = ce.forward(var.as_tensor(), &labels, None)?.backward()?;
    assert_close(var.as_tensor(), &logits, 0.0, 0.0, "logits after backward")?;
    assert_close(grads.get(var.as_tensor()).expect("no gradient"), &want_grad, 1e-5, 1e-9, "gradient")?;
    Ok(())
}

/// The linear loss: every output and the gradients of hidden, weight and bias
/// against the chunked engine's, with every option and reduction, a mask, in
/// f32 and bf16.
fn linear_every_option(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(54);
    let hidden = common::logits(&mut rng, &[2, 9, 16], 1.0, DType::F32, device)?;
    let weight = common::logits(&mut rng, &[97, 16], 0.5, DType::F32, device)?;
    let bias = common::logits(&mut rng, &[97], 0.5, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[2, 9], 97, 0.2, -100, device)?;
    let mask = common::mask(&mut rng, &[2, 9], 0.8, device)?;
    // bf16: both paths round the logits alike, but the gradients of weight and hidden
    // are bf16 matmuls here and f32 sums rounded once there.
    for (dtype, rtol, grad_rtol) in [(DType::F32, 1e-5, 1e-4), (DType::BF16, 1e-3, 1.0 / 32.0)] {
        let (hidden, weight, bias) = (hidden.to_dtype(dtype)?, weight.to_dtype(dtype)?, bias.to_dtype(dtype)?);
        for (smoothing, z_loss, softcap) in OPTIONS {
            for (reduction, num_label_tokens) in REDUCTIONS {
                let engine = LinearCrossEntropy::default()
                    .chunk_len(Some(4))
                    .reduction(reduction)
                    .label_smoothing(smoothing)
                    .z_loss(z_loss)
                    .logit_softcap(softcap);
                let run = |ce: &LinearCrossEntropy| -> anyhow::Result<(CrossEntropyOutput, Vec<Tensor>)> {
                    let (h, w, b) = (Var::from_tensor(&hidden)?, Var::from_tensor(&weight)?, Var::from_tensor(&bias)?);
                    let out =
                        ce.forward_with_outputs(&h, &w, Some(&b), &labels, Some(&mask), None, num_label_tokens)?;
                    let grads = backward_of(&out.loss)?.backward()?;
                    let grads = [&h, &w, &b].map(|v| grads.get(v).expect("no gradient").clone());
                    Ok((out, grads.to_vec()))
                };
                let (want, want_grads) = run(&engine)?;
                let fallback = engine.force_autograd(true);
                let (got, grads) = run(&fallback)?;
                let what = format!("{dtype:?} {num_label_tokens:?} {fallback:?}");
                assert_close(&got.loss, &want.loss, rtol, 1e-3 * rtol, &format!("{what}: loss"))?;
                assert_close(&got.z_loss, &want.z_loss, rtol, 1e-3 * rtol, &format!("{what}: z_loss"))?;
                let (got_losses, want_losses) = (&got.token_losses, &want.token_losses);
                assert_close(got_losses, want_losses, rtol, 1e-3 * rtol, &format!("{what}: token losses"))?;
                assert_close(&got.lse, &want.lse, rtol, 1e-3 * rtol, &format!("{what}: lse"))?;
                assert_close(&got.token_accuracy, &want.token_accuracy, 0.0, 0.0, &format!("{what}: accuracy"))?;
                for ((got, want), name) in grads.iter().zip(&want_grads).zip(["hidden", "weight", "bias"]) {
                    assert_eq!(got.dtype(), dtype, "{what}: {name} gradient dtype");
                    let atol = grad_rtol * 0.1 * max_abs(want)?;
                    assert_close(got, want, grad_rtol, atol, &format!("{what}: {name} gradient"))?;
                }
            }
        }
    }
    Ok(())
}

device_tests!(every_option_and_output, non_finite_logits, inplace_grad_leaves_logits_alone, linear_every_option);
