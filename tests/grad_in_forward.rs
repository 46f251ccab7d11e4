//! `grad_in_forward`: the logits loss's gradient formed in its forward pass.
//! Values against the slow f64 reference and against the same loss without
//! the option (itself held against PyTorch's numbers in `options.rs` and
//! `weights.rs`, which run this option too); where the gradient lives (over
//! the logits, or in a buffer of its own with the logits kept); upstream
//! gradients other than 1; and every use the precomputed gradient cannot
//! serve, which must recompute or fail with an error, never be wrong.

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{ChunkedCrossEntropy, Reduction};
use common::{assert_close, loss_and_grad, slow_loss_and_grad, Rng};

const DTYPES: [DType; 4] = [DType::F32, DType::BF16, DType::F16, DType::F64];

/// Relative tolerance of a gradient in `dtype` against an f64 truth: a few
/// roundings to the dtype.
fn rtol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

/// The loss and the logits' gradient of `ce` on a copy of `logits` that is in
/// the graph (the option may overwrite its input), from `scale * loss`.
fn scaled_loss_and_grad(
    ce: &ChunkedCrossEntropy,
    logits: &Tensor,
    labels: &Tensor,
    scale: f64,
) -> anyhow::Result<(Tensor, Tensor)> {
    let var = Var::from_tensor(logits)?;
    let input = (var.as_tensor() * 1.0)?;
    let loss = ce.forward(&input, labels, None)?;
    let grads = loss.affine(scale, 0.0)?.backward()?;
    Ok((loss, grads.get(var.as_tensor()).expect("logits without gradient").clone()))
}

/// Mean and sum, in place or not, every dtype: the loss and gradient of the
/// slow f64 reference.
fn matches_the_slow_reference(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(71);
    for dtype in DTYPES {
        let logits = common::logits(&mut rng, &[3, 5, 37], 6.0, dtype, device)?;
        let labels = common::labels(&mut rng, &[3, 5], 37, 0.3, -100, device)?;
        for reduction in [Reduction::Mean, Reduction::Sum] {
            let (want_loss, want_grad) = slow_loss_and_grad(&logits, &labels, None, -100, reduction, None)?;
            for inplace in [false, true] {
                let ce = ChunkedCrossEntropy::new(4, true, -100)
                    .reduction(reduction)
                    .grad_in_forward(true)
                    .inplace_grad(inplace);
                let (loss, grad) = scaled_loss_and_grad(&ce, &logits, &labels, 1.0)?;
                let what = format!("{dtype:?} {reduction:?} inplace={inplace}");
                assert_close(&loss.to_dtype(DType::F64)?, &want_loss, 1e-6, 1e-6, &format!("{what}: loss"))?;
                let atol = rtol(dtype) * 1e-2;
                assert_close(&grad.to_dtype(DType::F64)?, &want_grad, rtol(dtype), atol, &format!("{what}: grad"))?;
            }
        }
    }
    Ok(())
}

/// In place, the logits hold the gradient as soon as the forward pass
/// returns, and backward hands that gradient out; out of place, the logits
/// are never written.
fn where_the_gradient_lives(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(72);
    for dtype in DTYPES {
        let logits = common::logits(&mut rng, &[9, 41], 5.0, dtype, device)?;
        let labels = common::labels(&mut rng, &[9], 41, 0.2, -100, device)?;
        let (_, want_grad) = loss_and_grad(&ChunkedCrossEntropy::default(), &logits, &labels, None, None)?;

        let var = Var::from_tensor(&logits)?;
        let ce = ChunkedCrossEntropy::default().grad_in_forward(true).inplace_grad(true);
        let loss = ce.forward(var.as_tensor(), &labels, None)?;
        let tol = rtol(dtype);
        // f16's gradient is formed times the power of two nearest the valid count
        // (see `grad_in_forward`), and divided back in backward.
        let valid = labels.to_vec1::<i64>()?.iter().filter(|&&l| l != -100).count() as f64;
        let boost = if dtype == DType::F16 { 2f64.powi(valid.log2().round() as i32) } else { 1.0 };
        let held = (var.as_tensor().to_dtype(DType::F64)? / boost)?;
        let want_held = want_grad.to_dtype(DType::F64)?;
        assert_close(&held, &want_held, tol, tol * 1e-2, &format!("{dtype:?}: logits after forward"))?;
        let grads = loss.backward()?;
        let grad = grads.get(var.as_tensor()).expect("no gradient");
        assert_close(
            &(grad.to_dtype(DType::F64)? * boost)?,
            &var.as_tensor().to_dtype(DType::F64)?,
            0.0,
            // Dividing f16's boost out rounds where the result is subnormal.
            if dtype == DType::F16 { boost * 2f64.powi(-24) } else { 0.0 },
            &format!("{dtype:?}: backward hands out the logits' storage"),
        )?;

        let var = Var::from_tensor(&logits)?;
        let loss = ChunkedCrossEntropy::default().grad_in_forward(true).forward(var.as_tensor(), &labels, None)?;
        assert_close(var.as_tensor(), &logits, 0.0, 0.0, &format!("{dtype:?}: out of place, logits after forward"))?;
        let grads = loss.backward()?;
        assert_close(var.as_tensor(), &logits, 0.0, 0.0, &format!("{dtype:?}: out of place, logits after backward"))?;
        let grad = grads.get(var.as_tensor()).expect("no gradient");
        assert_close(grad, &want_grad, tol, tol * 1e-2, &format!("{dtype:?}: out of place, gradient"))?;
    }
    Ok(())
}

/// Every option that changes the per-row factors (label smoothing, z-loss,
/// soft-cap, class weights, loss weights, `num_label_tokens`, a mask): the
/// gradient of the same loss without the option.
fn every_option(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(73);
    let (rows, vocab) = (12, 29);
    let class_weights = common::logits(&mut rng, &[vocab], 1.0, DType::F32, device)?.abs()?;
    let loss_weights = common::logits(&mut rng, &[rows], 2.0, DType::F32, device)?.abs()?;
    let mask = common::mask(&mut rng, &[rows], 0.7, device)?;
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let logits = common::logits(&mut rng, &[rows, vocab], 8.0, dtype, device)?;
        let labels = common::labels(&mut rng, &[rows], vocab, 0.2, -100, device)?;
        let settings: [(&str, ChunkedCrossEntropy); 5] = [
            ("smoothing + z-loss", ChunkedCrossEntropy::default().label_smoothing(0.2).z_loss(1e-3)),
            ("soft-cap", ChunkedCrossEntropy::default().logit_softcap(Some(4.0))),
            ("class weights", ChunkedCrossEntropy::default().class_weights(Some(class_weights.to_dtype(dtype)?))),
            ("smoothing + class weights, sum", {
                let weights = Some(class_weights.to_dtype(dtype)?);
                ChunkedCrossEntropy::default().label_smoothing(0.1).class_weights(weights).reduction(Reduction::Sum)
            }),
            ("plain", ChunkedCrossEntropy::default().chunk_len(5)),
        ];
        for (name, ce) in settings {
            for (weighted, num_label_tokens) in [(false, None), (true, None), (false, Some(40))] {
                // `num_label_tokens` goes with a mean only.
                if num_label_tokens.is_some() && name.ends_with("sum") {
                    continue;
                }
                let run = |ce: &ChunkedCrossEntropy| -> anyhow::Result<(Tensor, Tensor)> {
                    let var = Var::from_tensor(&logits)?;
                    let input = (var.as_tensor() * 1.0)?;
                    let weights = weighted.then(|| loss_weights.to_dtype(dtype)).transpose()?;
                    let out =
                        ce.forward_with_outputs(&input, &labels, Some(&mask), weights.as_ref(), num_label_tokens)?;
                    let grads = out.loss.backward()?;
                    Ok((out.loss, grads.get(var.as_tensor()).expect("no gradient").clone()))
                };
                let (want_loss, want_grad) = run(&ce)?;
                for inplace in [false, true] {
                    let (loss, grad) = run(&ce.clone().grad_in_forward(true).inplace_grad(inplace))?;
                    let what =
                        format!("{dtype:?} {name}, weighted={weighted}, n={num_label_tokens:?}, inplace={inplace}");
                    // The same statistics, from kernels that may order their sums differently.
                    assert_close(&loss, &want_loss, 1e-6, 0.0, &format!("{what}: loss"))?;
                    let tol = rtol(dtype);
                    assert_close(&grad, &want_grad, tol, tol * 1e-3, &format!("{what}: grad"))?;
                }
            }
        }
    }
    Ok(())
}

/// An upstream gradient other than 1 (a loss scale, a `1 / k`): the gradient
/// is scaled by the exact factor (a power of two in the dtype, any other in
/// the compute dtype), element by element and on the whole. In f16, a mean over ~3700 tokens times a
/// loss scale of 2^16: the gradient is formed times 2^12 (the power of two
/// nearest the count), so that it loses only values below f16's smallest
/// subnormal (2^-24) at that scale, 2^-24 * 2^16 / 2^12 = 2^-20 once scaled;
/// formed as `p / n` it would lose everything below 2^-24 * 2^16 = 2^-8.
fn scaled_upstream(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(74);
    for (dtype, rows, scale) in [(DType::F32, 6, 2.5), (DType::BF16, 512, 1.0 / 3.0), (DType::F16, 4096, 65536.0)] {
        let vocab = 23;
        let logits = common::logits(&mut rng, &[rows, vocab], 9.0, dtype, device)?;
        let labels = common::labels(&mut rng, &[rows], vocab, 0.1, -100, device)?;
        let (_, want_grad) = scaled_loss_and_grad(&ChunkedCrossEntropy::default(), &logits, &labels, scale)?;
        for inplace in [false, true] {
            let ce = ChunkedCrossEntropy::default().grad_in_forward(true).inplace_grad(inplace);
            let (_, grad) = scaled_loss_and_grad(&ce, &logits, &labels, scale)?;
            let what = format!("{dtype:?} x{scale} inplace={inplace}");
            // Two roundings to the dtype where the plain loss makes one.
            let tol = 2.0 * rtol(dtype);
            let atol = if dtype == DType::F16 { 2f64.powi(-20) } else { 0.0 };
            assert_close(&grad, &want_grad, tol, atol, &what)?;
            // No bias: bf16's own rounding of 1/3 (0.333984375) would scale every element by
            // 1.002, inside the elementwise tolerance but not in the sum of the off-target
            // gradients (spread over many binades, where roundings cancel; measured: 1.0018
            // with the factor rounded, within 5e-5 of 1 without, at four shapes).
            let total = |t: &Tensor| t.to_dtype(DType::F64)?.relu()?.sum_all()?.to_scalar::<f64>();
            let bias = total(&grad)? / total(&want_grad)? - 1.0;
            assert!(bias.abs() < 5e-4, "{what}: the gradient is scaled by {} on the whole", 1.0 + bias);
        }
    }
    // A factor f16 cannot hold: a sum's gradient (no boost) times a loss scale of 2^16, where
    // f16 tops out at 65504. The plain loss forms it in f32 and overflows only where the value
    // does (a target's gradient near -65536).
    let logits = common::logits(&mut rng, &[8, 23], 3.0, DType::F16, device)?;
    let labels = common::labels(&mut rng, &[8], 23, 0.1, -100, device)?;
    let sum = ChunkedCrossEntropy::default().reduction(Reduction::Sum);
    let (_, want_grad) = scaled_loss_and_grad(&sum, &logits, &labels, 65536.0)?;
    for inplace in [false, true] {
        let ce = sum.clone().grad_in_forward(true).inplace_grad(inplace);
        let (_, grad) = scaled_loss_and_grad(&ce, &logits, &labels, 65536.0)?;
        let what = format!("F16 sum x65536 inplace={inplace}");
        common::assert_close_nonfinite(&grad, &want_grad, 2.0 * rtol(DType::F16), 0.0, &what)?;
    }
    Ok(())
}

/// A backward pass that reaches the statistics other than through the reduced
/// loss times a scalar (per-token losses weighted per token): out of place the
/// backward kernels run on the kept logits and the gradient is right; in place
/// the logits are gone, and it is an error that says so.
fn other_upstream_recomputes_or_fails(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(75);
    let logits = common::logits(&mut rng, &[7, 19], 4.0, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[7], 19, 0.2, -100, device)?;
    let run = |ce: &ChunkedCrossEntropy| -> candle::Result<Tensor> {
        let var = Var::from_tensor(&logits)?;
        let input = (var.as_tensor() * 1.0)?;
        let out = ce.forward_with_outputs(&input, &labels, None, None, None)?;
        let upstream = common::upstream_weights(7, DType::F32, device)?;
        let grads = (out.token_losses * upstream)?.sum_all()?.backward()?;
        Ok(grads.get(var.as_tensor()).expect("no gradient").clone())
    };
    let want = run(&ChunkedCrossEntropy::default())?;
    let grad = run(&ChunkedCrossEntropy::default().grad_in_forward(true))?;
    assert_close(&grad, &want, 1e-6, 1e-8, "out of place, per-token upstream")?;
    let err = run(&ChunkedCrossEntropy::default().grad_in_forward(true).inplace_grad(true))
        .expect_err("in place, a per-token upstream cannot be served");
    let msg = err.to_string();
    assert!(msg.contains("grad_in_forward") && msg.contains("per-token"), "unhelpful error: {msg}");
    Ok(())
}

/// A second backward pass over the same graph gives the same gradient
/// (out of place, the first pass took the buffer: the second recomputes).
fn second_backward(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(76);
    let logits = common::logits(&mut rng, &[5, 17], 4.0, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[5], 17, 0.2, -100, device)?;
    for inplace in [false, true] {
        let var = Var::from_tensor(&logits)?;
        let input = (var.as_tensor() * 1.0)?;
        let loss = ChunkedCrossEntropy::default()
            .grad_in_forward(true)
            .inplace_grad(inplace)
            .forward(&input, &labels, None)?;
        let first = loss.backward()?.get(var.as_tensor()).expect("no gradient").clone();
        let second = loss.backward()?.get(var.as_tensor()).expect("no gradient").clone();
        assert_close(&second, &first, 1e-6, 1e-9, &format!("inplace={inplace}: second backward"))?;
    }
    Ok(())
}

/// Bad input is an error before any logit is overwritten: a per-token
/// reduction (its upstream gradient differs per token), a label out of range.
fn bad_input_is_an_error(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(77);
    let logits = common::logits(&mut rng, &[4, 11], 3.0, DType::F32, device)?;
    let ce = ChunkedCrossEntropy::default().grad_in_forward(true).inplace_grad(true);
    let labels = Tensor::new(&[1i64, 2, 3, 4], device)?;
    let err = ce.clone().reduction(Reduction::None).forward(&logits, &labels, None).expect_err("Reduction::None");
    assert!(err.to_string().contains("grad_in_forward") && err.to_string().contains("Reduction::None"), "{err}");

    let copy = logits.copy()?;
    let bad = Tensor::new(&[1i64, 2, 11, 4], device)?;
    let err = ce.forward(&copy, &bad, None).expect_err("a label out of range");
    assert!(err.to_string().contains("label 11 at row 2"), "{err}");
    assert_close(&copy, &logits, 0.0, 0.0, "logits after a bad label")?;
    Ok(())
}

device_tests!(
    matches_the_slow_reference,
    where_the_gradient_lives,
    every_option,
    scaled_upstream,
    other_upstream_recomputes_or_fails,
    second_backward,
    bad_input_is_an_error,
);
