//! `forward_linear`: the same loss and gradients as the loss over the full
//! logits `hidden @ weight^T`, whatever the chunking, and clear errors.

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{ChunkedCrossEntropy, Reduction};
use common::{assert_close, backward_of, Rng};

/// Loss and the gradients of `hidden` and `weight`, through `forward_linear`
/// or through the logits materialised by a matmul.
fn loss_and_grads(
    ce: &ChunkedCrossEntropy,
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    fused: bool,
) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let (h, w) = (Var::from_tensor(hidden)?, Var::from_tensor(weight)?);
    let loss = if fused {
        ce.forward_linear(h.as_tensor(), w.as_tensor(), labels, None, None)?
    } else {
        ce.forward(&h.as_tensor().broadcast_matmul(&w.as_tensor().t()?)?, labels, None)?
    };
    let grads = backward_of(&loss)?.backward()?;
    let grad = |v: &Var| grads.get(v.as_tensor()).expect("no gradient").clone();
    Ok((loss, grad(&h), grad(&w)))
}

fn matches_full_logits(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(31);
    let hidden = common::logits(&mut rng, &[3, 13, 24], 1.0, DType::F32, device)?;
    let weight = common::logits(&mut rng, &[257, 24], 0.5, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[3, 13], 257, 0.2, -100, device)?;
    for compile in [true, false] {
        for reduction in [Reduction::Mean, Reduction::None] {
            for chunk_len in [1, 5, 39, 100] {
                let ce = ChunkedCrossEntropy::new(chunk_len, compile, -100).reduction(reduction);
                let want = loss_and_grads(&ce, &hidden, &weight, &labels, false)?;
                let got = loss_and_grads(&ce, &hidden, &weight, &labels, true)?;
                let what = format!("compile={compile} {reduction:?} chunk_len={chunk_len}");
                assert_close(&got.0, &want.0, 1e-5, 1e-7, &format!("{what} loss"))?;
                // Gradient elements are sums of many f32 terms that partly cancel: bound
                // the error by the largest element, not each element's own size.
                let atol = |t: &Tensor| -> anyhow::Result<f64> {
                    Ok(1e-5 * t.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
                };
                assert_close(&got.1, &want.1, 1e-4, atol(&want.1)?, &format!("{what} hidden grad"))?;
                assert_close(&got.2, &want.2, 1e-4, atol(&want.2)?, &format!("{what} weight grad"))?;
            }
        }
    }
    Ok(())
}

/// bf16 hidden states and weight: the loss in f32, the gradients in bf16 (the
/// weight's accumulated over chunks in f32), against the f32 computation of the
/// same rounded values, to bf16 tolerances.
fn bf16_inputs(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(32);
    let hidden = common::logits(&mut rng, &[64, 32], 1.0, DType::BF16, device)?;
    let weight = common::logits(&mut rng, &[500, 32], 0.5, DType::BF16, device)?;
    let labels = common::labels(&mut rng, &[64], 500, 0.1, -100, device)?;
    let ce = ChunkedCrossEntropy::default().chunk_len(16);
    let (loss, h_grad, w_grad) = loss_and_grads(&ce, &hidden, &weight, &labels, true)?;
    let f32s = |t: &Tensor| t.to_dtype(DType::F32);
    let (want, want_h, want_w) = loss_and_grads(&ce, &f32s(&hidden)?, &f32s(&weight)?, &labels, false)?;
    assert_eq!((loss.dtype(), h_grad.dtype(), w_grad.dtype()), (DType::F32, DType::BF16, DType::BF16));
    assert_close(&loss, &want, 1e-2, 0.0, "bf16 loss")?;
    assert_close(&h_grad, &want_h, 5e-2, 1e-4, "bf16 hidden grad")?;
    assert_close(&w_grad, &want_w, 5e-2, 1e-4, "bf16 weight grad")?;
    Ok(())
}

fn bad_inputs(device: &Device) -> anyhow::Result<()> {
    let hidden = Tensor::zeros((4, 8), DType::F32, device)?;
    let weight = Tensor::zeros((10, 8), DType::F32, device)?;
    let labels = Tensor::new(&[1i64, 2, 12, 3], device)?;
    let ce = ChunkedCrossEntropy::default();
    let message = |r: candle::Result<Tensor>| r.expect_err("should fail").to_string();
    let err = message(ce.forward_linear(&hidden, &weight, &labels, None, None));
    assert!(err.contains("label 12") && err.contains("row 2"), "{err}");
    let good = Tensor::new(&[1i64, 2, 3, 4], device)?;
    let err = message(ce.forward_linear(&hidden, &Tensor::zeros((10, 7), DType::F32, device)?, &good, None, None));
    assert!(err.contains("must be [V, 8]"), "{err}");
    let err = message(ce.forward_linear(&hidden, &weight.to_dtype(DType::F64)?, &good, None, None));
    assert!(err.contains("share dtype"), "{err}");
    let err = message(ce.clone().reduction(Reduction::Sum).forward_linear(&hidden, &weight, &good, None, Some(3)));
    assert!(err.contains("num_label_tokens"), "{err}");
    Ok(())
}

device_tests!(matches_full_logits, bf16_inputs, bad_inputs);
