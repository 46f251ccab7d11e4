//! `LinearCrossEntropy::low_memory`: the weight's gradient summed chunk by
//! chunk in the weight's dtype (rounded once per chunk), the loss and the
//! hidden states' gradient unchanged, smaller automatic chunks, f16 refused;
//! through `loss_and_grads` and through candle's autograd alike.

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{LinearCrossEntropy, LinearGrads, Reduction};
use common::{assert_close, Rng};
use half::bf16;

/// The gradients through candle's autograd, as `loss_and_grads` returns them.
fn through_autograd(
    ce: &LinearCrossEntropy,
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
) -> anyhow::Result<LinearGrads> {
    let (h, w) = (Var::from_tensor(hidden)?, Var::from_tensor(weight)?);
    // Summed, for Reduction::None's per-token losses (whose backward recomputes the logits).
    let loss = ce.forward(h.as_tensor(), w.as_tensor(), labels, None)?.sum_all()?;
    let grads = loss.backward()?;
    let grad = |v: &Var| grads.get(v.as_tensor()).cloned().ok_or_else(|| anyhow::anyhow!("no gradient"));
    Ok(LinearGrads { loss, hidden_grad: grad(&h)?, weight_grad: grad(&w)?, bias_grad: None })
}

fn values(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Weight gradients whose increments after the first chunk are too small for
/// a bf16 sum: 17 rows with `W = 0` (so p = (1/2, 1/2) and every row's logits
/// gradient is g = -1/34 on its label 0 and +1/34 on class 1, rounded to
/// bf16), hidden 256 in the first row and 1/4 in the other 16, one row per
/// chunk. The weight's own dtype stalls at 256 g (each 1/4 g is under half
/// an ulp of it); an f32 sum reaches 260 g, rounded once. Both exactly, for
/// `Mean` and for `None` (whose backward recomputes the chunks).
fn weight_gradient_is_summed_in_the_weight_dtype(device: &Device) -> anyhow::Result<()> {
    let mut rows = vec![0.25f32; 17];
    rows[0] = 256.0;
    let hidden = Tensor::from_vec(rows, (17, 1), device)?.to_dtype(DType::BF16)?;
    let weight = Tensor::zeros((2, 1), DType::BF16, device)?;
    let labels = Tensor::zeros(17, DType::U32, device)?;
    // Mean: g = -1/34; None (the per-token losses summed; backward recomputes): g = -1/2.
    for (reduction, g) in [(Reduction::Mean, -1.0 / 34.0), (Reduction::None, -0.5)] {
        let g = f64::from(bf16::from_f64(g));
        let stalled = [bf16::from_f64(256.0 * g), bf16::from_f64(-256.0 * g)].map(f32::from);
        let exact = [bf16::from_f64(260.0 * g), bf16::from_f64(-260.0 * g)].map(f32::from);
        assert_ne!(stalled, exact, "the case must tell the two sums apart");
        for (low_memory, want) in [(true, stalled), (false, exact)] {
            let ce = LinearCrossEntropy::default().chunk_len(Some(1)).low_memory(low_memory).reduction(reduction);
            let mut paths = vec![("autograd", through_autograd(&ce, &hidden, &weight, &labels)?)];
            if reduction == Reduction::Mean {
                paths.push(("loss_and_grads", ce.loss_and_grads(&hidden, &weight, None, &labels, None)?));
            }
            for (path, grads) in paths {
                let what = format!("{reduction:?}, low_memory {low_memory}, {path}");
                assert_eq!(grads.weight_grad.dtype(), DType::BF16, "{what}: dtype");
                assert_eq!(values(&grads.weight_grad)?, want, "{what}: weight gradient");
            }
        }
    }
    Ok(())
}

/// Against the default on random inputs with ignored rows, in chunks of 4:
/// the loss and the hidden states' gradient are the same numbers; the
/// weight's gradient is the same in f32, and in bf16 within a rounding per
/// chunk of the default's (rounded once). `Mean` (gradients formed in the
/// forward pass) and `None` (a backward that recomputes the logits).
fn only_the_weight_sum_changes(device: &Device) -> anyhow::Result<()> {
    for (dtype, reduction) in
        [DType::F32, DType::BF16].into_iter().flat_map(|d| [(d, Reduction::Mean), (d, Reduction::None)])
    {
        let mut rng = Rng::new(50);
        let hidden = common::logits(&mut rng, &[3, 9, 16], 1.0, dtype, device)?;
        let weight = common::logits(&mut rng, &[61, 16], 0.5, dtype, device)?;
        let labels = common::labels(&mut rng, &[3, 9], 61, 0.2, -100, device)?;
        let valid = labels.flatten_all()?.to_vec1::<i64>()?.iter().filter(|&&l| l != -100).count();
        let chunks = valid.div_ceil(4) as f64;
        let default = LinearCrossEntropy::default().chunk_len(Some(4)).reduction(reduction);
        let lean = default.clone().low_memory(true);
        let want = through_autograd(&default, &hidden, &weight, &labels)?;
        let mut paths = vec![("autograd", through_autograd(&lean, &hidden, &weight, &labels)?)];
        if reduction == Reduction::Mean {
            let direct = default.loss_and_grads(&hidden, &weight, None, &labels, None)?;
            assert_close(&direct.weight_grad, &want.weight_grad, 0.0, 0.0, &format!("{dtype:?}: the two defaults"))?;
            paths.push(("loss_and_grads", lean.loss_and_grads(&hidden, &weight, None, &labels, None)?));
        }
        for (path, got) in paths {
            let what = format!("{dtype:?} {reduction:?} {path}");
            assert_close(&got.loss, &want.loss, 0.0, 0.0, &format!("{what}: loss"))?;
            assert_close(&got.hidden_grad, &want.hidden_grad, 0.0, 0.0, &format!("{what}: hidden"))?;
            assert_eq!(got.weight_grad.dtype(), dtype, "{what}: weight gradient dtype");
            let tol = match dtype {
                DType::F32 => 1e-5 * common::max_abs(&want.weight_grad)?,
                _ => chunks * 2f64.powi(-8) * common::max_abs(&want.weight_grad)?,
            };
            assert_close(&got.weight_grad, &want.weight_grad, 0.0, tol, &format!("{what}: weight"))?;
        }
    }
    Ok(())
}

/// Without a `chunk_len`, a chunk holds about `N * H / V` valid rows rounded
/// down to a multiple of 64 (the default's are at least 1024 rows, 2048 on CUDA):
/// 1000 rows, H = 64, V = 256 make chunks of 192 rows, 6 of them.
fn automatic_chunks_are_smaller(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(51);
    let hidden = common::logits(&mut rng, &[1000, 64], 1.0, DType::F32, device)?;
    let weight = common::logits(&mut rng, &[256, 64], 0.5, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[1000], 256, 0.0, -100, device)?;
    for (low_memory, chunks) in [(false, 1), (true, 6)] {
        let ce = LinearCrossEntropy::default().low_memory(low_memory);
        let before = candle_chunked_ce::linear_products();
        ce.loss_and_grads(&hidden, &weight, None, &labels, None)?;
        let after = candle_chunked_ce::linear_products();
        assert_eq!(after.logits - before.logits, chunks, "low_memory {low_memory}: chunks");
        assert_eq!(after.logits_rows - before.logits_rows, 1000, "low_memory {low_memory}: rows");
    }
    Ok(())
}

/// An f16 weight's sums could pass 65504: refused, naming the setting.
fn f16_is_refused(device: &Device) -> anyhow::Result<()> {
    let hidden = Tensor::zeros((4, 8), DType::F16, device)?;
    let weight = Tensor::zeros((10, 8), DType::F16, device)?;
    let labels = Tensor::zeros(4, DType::U32, device)?;
    let ce = LinearCrossEntropy::default().low_memory(true);
    for result in [
        ce.loss_and_grads(&hidden, &weight, None, &labels, None).map(|_| ()),
        ce.forward(&hidden, &weight, &labels, None).map(|_| ()),
    ] {
        let err = result.expect_err("an f16 low_memory call").to_string();
        assert!(err.contains("low_memory") && err.contains("f16"), "{err}");
    }
    Ok(())
}

/// A loss that receives `s` instead of 1 (a loss scale, a `1 / k`): the bf16
/// weight gradient, summed in bf16, is scaled after the sum: by a power of two
/// exactly; by 1/3 within one rounding of each element, and with no bias on
/// the whole (bf16's own rounding of 1/3 in the factor, 0.333984375, would
/// scale every element by 1.002: inside one rounding, not in the sum).
fn scaled_upstream(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(51);
    let hidden = common::logits(&mut rng, &[64, 32], 1.0, DType::BF16, device)?;
    let weight = common::logits(&mut rng, &[97, 32], 0.5, DType::BF16, device)?;
    let labels = common::labels(&mut rng, &[64], 97, 0.1, -100, device)?;
    let ce = LinearCrossEntropy::default().chunk_len(Some(16)).low_memory(true);
    let weight_grad = |scale: f64| -> anyhow::Result<Tensor> {
        let (h, w) = (Var::from_tensor(&hidden)?, Var::from_tensor(&weight)?);
        let grads = ce.forward(h.as_tensor(), w.as_tensor(), &labels, None)?.affine(scale, 0.0)?.backward()?;
        Ok(grads.get(w.as_tensor()).ok_or_else(|| anyhow::anyhow!("no weight gradient"))?.clone())
    };
    let unit = weight_grad(1.0)?.to_dtype(DType::F64)?;
    let scaled = weight_grad(4.0)?;
    assert_eq!(scaled.dtype(), DType::BF16);
    assert_close(&scaled, &(&unit * 4.0)?, 0.0, 0.0, "x4")?;
    let third = weight_grad(1.0 / 3.0)?.to_dtype(DType::F64)?;
    let want = (&unit / 3.0)?;
    assert_close(&third, &want, 2f64.powi(-8), 0.0, "x1/3")?;
    let positive = |t: &Tensor| t.relu()?.sum_all()?.to_scalar::<f64>();
    let bias = positive(&third)? / positive(&want)? - 1.0;
    assert!(bias.abs() < 5e-4, "x1/3: the weight gradient is scaled by {} on the whole", 1.0 + bias);
    Ok(())
}

device_tests!(
    weight_gradient_is_summed_in_the_weight_dtype,
    only_the_weight_sum_changes,
    automatic_chunks_are_smaller,
    f16_is_refused,
    scaled_upstream,
);
