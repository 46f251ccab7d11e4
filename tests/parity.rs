//! Losses and gradients against independently computed values and against the
//! slow autograd reference, over dtypes, shapes, strides, chunk lengths, both
//! engines and the path of devices our kernels do not cover.

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{compute_cross_entropy, ChunkedCrossEntropy, Reduction};
use common::{assert_close, loss_and_grad, slow_loss_and_grad, Rng};

/// Both engines at a given chunk length, and candle's autograd as on a device
/// our kernels do not cover.
fn engines(chunk_len: usize) -> [ChunkedCrossEntropy; 3] {
    let fused = ChunkedCrossEntropy::new(chunk_len, true, -100);
    [fused.clone(), ChunkedCrossEntropy::new(chunk_len, false, -100), fused.force_autograd(true)]
}

/// The 4 x 6 logits `x[i, j] = 3 sin(0.37 i + 1.3 j)` with labels `[2, -100, 5, 0]`.
/// Expected values from NumPy in f64 (not from this crate):
/// ```python
/// import numpy as np
/// N, V = 4, 6
/// x = np.array([[np.sin(0.37 * i + 1.3 * j) * 3.0 for j in range(V)] for i in range(N)])
/// y = np.array([2, -100, 5, 0]); valid = y != -100
/// lse = np.log(np.exp(x).sum(1))
/// per_tok = np.where(valid, lse - x[np.arange(N), np.where(valid, y, 0)], 0.0)
/// p = np.exp(x - lse[:, None]); onehot = np.zeros_like(x); onehot[np.arange(N)[valid], y[valid]] = 1
/// grad_mean = (p - onehot) * valid[:, None] / valid.sum()
/// ```
fn literal_case(device: &Device, dtype: DType) -> candle::Result<(Tensor, Tensor)> {
    let x: Vec<f64> =
        (0..4).flat_map(|i| (0..6).map(move |j| (0.37 * i as f64 + 1.3 * j as f64).sin() * 3.0)).collect();
    let logits = Tensor::from_vec(x, (4, 6), device)?.to_dtype(dtype)?;
    let labels = Tensor::new(&[2i64, -100, 5, 0], device)?;
    Ok((logits, labels))
}

const LITERAL_PER_TOKEN: [f64; 4] = [1.704056885439032, 0.0, 1.0936311107108, 1.046429156255147];
const LITERAL_SUM: f64 = 3.8441171524049786;
const LITERAL_MEAN: f64 = 1.2813723841349929;
#[rustfmt::skip]
const LITERAL_GRAD_MEAN: [f64; 24] = [
    0.012917487188835, 0.232585185149171, -0.272685366924978, 0.001640963405699, 0.000912304030442, 0.024629427150831,
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    0.072696546487044, 0.139660726283043, 0.005323365020819, 0.000482529586851, 0.003504209883482, -0.221667377261239,
    -0.216270148064477, 0.059132728760822, 0.001585256544798, 0.000452710927742, 0.008636973357265, 0.146462478473850,
];

fn literal_values(device: &Device) -> anyhow::Result<()> {
    for (dtype, rtol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
        let (logits, labels) = literal_case(device, dtype)?;
        for ce in engines(3) {
            let (mean, grad) = loss_and_grad(&ce, &logits, &labels, None, None)?;
            assert_close(&mean, &Tensor::new(LITERAL_MEAN, device)?, rtol, 0.0, "literal mean")?;
            let expected_grad = Tensor::new(&LITERAL_GRAD_MEAN, device)?.reshape((4, 6))?;
            assert_close(&grad, &expected_grad, rtol, 1e-7 * rtol, "literal mean gradient")?;
            let sum = ce.clone().reduction(Reduction::Sum).forward(&logits, &labels, None)?;
            assert_close(&sum, &Tensor::new(LITERAL_SUM, device)?, rtol, 0.0, "literal sum")?;
            let per_token = ce.clone().reduction(Reduction::None).forward(&logits, &labels, None)?;
            assert_close(&per_token, &Tensor::new(&LITERAL_PER_TOKEN, device)?, rtol, 0.0, "literal per-token")?;
        }
        let nemo = compute_cross_entropy(&logits, &labels, -100)?;
        assert_close(&nemo, &Tensor::new(LITERAL_SUM, device)?, rtol, 0.0, "compute_cross_entropy")?;
    }
    Ok(())
}

/// Every reduction, dtype and engine against the slow reference on the same
/// (already rounded) logits: the loss to f32 rounding, the gradient to one
/// rounding of the logits' dtype.
fn matches_slow_reference(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(1);
    for (dtype, grad_rtol) in
        [(DType::F32, 1e-5), (DType::F64, 1e-12), (DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)]
    {
        let logits = common::logits(&mut rng, &[37, 101], 8.0, dtype, device)?;
        let labels = common::labels(&mut rng, &[37], 101, 0.2, -100, device)?;
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let (slow_loss, slow_grad) = slow_loss_and_grad(&logits, &labels, None, -100, reduction, None)?;
            for ce in engines(5) {
                let ce = ce.reduction(reduction);
                let (loss, grad) = loss_and_grad(&ce, &logits, &labels, None, None)?;
                let what = format!("{dtype:?} {reduction:?} {ce:?}");
                assert_eq!(grad.dtype(), dtype, "{what}: gradient dtype");
                let loss_rtol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
                assert_close(&loss, &slow_loss, loss_rtol, 1e-6 * loss_rtol, &format!("{what} loss"))?;
                let slow_grad = slow_grad.to_dtype(dtype)?;
                assert_close(&grad, &slow_grad, grad_rtol, 1e-7, &format!("{what} grad"))?;
            }
        }
    }
    Ok(())
}

/// bf16 and f16 logits against the f32 loss of the unrounded logits, to the
/// tolerances PyTorch's own bf16/f16 cross-entropy tests use (rtol 1e-2).
fn half_precision_against_f32(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(2);
    let logits = common::logits(&mut rng, &[64, 1000], 6.0, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[64], 1000, 0.1, -100, device)?;
    let (want_loss, want_grad) = slow_loss_and_grad(&logits, &labels, None, -100, Reduction::Mean, None)?;
    for dtype in [DType::BF16, DType::F16] {
        let (loss, grad) =
            loss_and_grad(&ChunkedCrossEntropy::default(), &logits.to_dtype(dtype)?, &labels, None, None)?;
        assert_eq!(loss.dtype(), DType::F32, "{dtype:?}: the loss is f32");
        assert_close(&loss, &want_loss, 1e-2, 0.0, &format!("{dtype:?} loss"))?;
        assert_close(&grad, &want_grad, 5e-2, 1e-5, &format!("{dtype:?} grad"))?;
    }
    Ok(())
}

/// The odd sizes: V = 1, 2, 3, 17, 50257 and N = 1, 7, 423.
fn odd_sizes(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(3);
    for vocab in [1usize, 2, 3, 17, 50257] {
        for rows in [1usize, 7, 423] {
            if vocab == 50257 && rows == 423 {
                continue; // covered by `large_vocab_many_rows` below with the fused engine only
            }
            let logits = common::logits(&mut rng, &[rows, vocab], 10.0, DType::F32, device)?;
            let labels = common::labels(&mut rng, &[rows], vocab, 0.25, -100, device)?;
            let (slow_loss, slow_grad) = slow_loss_and_grad(&logits, &labels, None, -100, Reduction::Mean, None)?;
            for ce in engines(32) {
                let (loss, grad) = loss_and_grad(&ce, &logits, &labels, None, None)?;
                let what = format!("N={rows} V={vocab} {ce:?}");
                assert_close(&loss, &slow_loss, 1e-6, 1e-7, &format!("{what} loss"))?;
                assert_close(&grad, &slow_grad, 1e-5, 1e-9, &format!("{what} grad"))?;
            }
        }
    }
    Ok(())
}

fn large_vocab_many_rows(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(4);
    let logits = common::logits(&mut rng, &[423, 50257], 10.0, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[423], 50257, 0.25, -100, device)?;
    let (slow_loss, slow_grad) = slow_loss_and_grad(&logits, &labels, None, -100, Reduction::Mean, None)?;
    let (loss, grad) = loss_and_grad(&ChunkedCrossEntropy::default(), &logits, &labels, None, None)?;
    assert_close(&loss, &slow_loss, 1e-6, 0.0, "423 x 50257 loss")?;
    assert_close(&grad, &slow_grad, 1e-5, 1e-10, "423 x 50257 grad")?;
    Ok(())
}

/// `chunk_len` changes how rows are scheduled, never the result.
fn chunk_invariance(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(5);
    let rows = 29;
    let logits = common::logits(&mut rng, &[rows, 33], 5.0, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[rows], 33, 0.3, -100, device)?;
    for compile in [true, false] {
        let reference = loss_and_grad(&ChunkedCrossEntropy::new(1, compile, -100), &logits, &labels, None, None)?;
        for chunk_len in [3, rows, rows + 10] {
            let (loss, grad) =
                loss_and_grad(&ChunkedCrossEntropy::new(chunk_len, compile, -100), &logits, &labels, None, None)?;
            let what = format!("compile={compile} chunk_len={chunk_len}");
            assert_close(&loss, &reference.0, 1e-6, 0.0, &format!("{what} loss"))?;
            assert_close(&grad, &reference.1, 1e-6, 1e-12, &format!("{what} grad"))?;
        }
    }
    Ok(())
}

/// The fused kernels and candle's primitive ops agree, per token and in the gradient.
fn compile_on_off_parity(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(6);
    for dtype in [DType::F32, DType::BF16] {
        let logits = common::logits(&mut rng, &[3, 11, 257], 12.0, dtype, device)?;
        let labels = common::labels(&mut rng, &[3, 11], 257, 0.2, -100, device)?;
        let mask = common::mask(&mut rng, &[3, 11], 0.8, device)?;
        let ce = ChunkedCrossEntropy::default().reduction(Reduction::None);
        let fused = loss_and_grad(&ce, &logits, &labels, Some(&mask), None)?;
        let primitive = loss_and_grad(&ce.compile(false), &logits, &labels, Some(&mask), None)?;
        assert_close(&fused.0, &primitive.0, 1e-6, 1e-7, &format!("{dtype:?} per-token"))?;
        let grad_rtol = if dtype == DType::BF16 { 1.0 / 128.0 } else { 1e-6 };
        assert_close(&fused.1, &primitive.1, grad_rtol, 1e-9, &format!("{dtype:?} grad"))?;
    }
    Ok(())
}

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

/// Unusual ignore values (as in Liger's tests) and every label dtype.
fn ignore_values_and_label_dtypes(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(10);
    let logits = common::logits(&mut rng, &[12, 7], 5.0, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[12], 7, 0.0, -100, device)?;
    for ignore_index in [2i64, -123, -100] {
        let (want, want_grad) = slow_loss_and_grad(&logits, &labels, None, ignore_index, Reduction::Mean, None)?;
        for dtype in [DType::U8, DType::U32, DType::I32, DType::I64] {
            for ce in engines(5) {
                let ce = ce.ignore_index(ignore_index);
                let (loss, grad) = loss_and_grad(&ce, &logits, &labels.to_dtype(dtype)?, None, None)?;
                let what = format!("ignore_index={ignore_index} labels {dtype:?}");
                assert_close(&loss, &want, 1e-6, 0.0, &format!("{what} loss"))?;
                assert_close(&grad, &want_grad, 1e-5, 1e-9, &format!("{what} grad"))?;
            }
        }
    }
    Ok(())
}

/// No valid token: loss and gradient exactly 0 (PyTorch gives NaN), and the
/// loss still reaches the logits in the graph.
fn nothing_to_learn_is_exactly_zero(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(11);
    let logits = common::logits(&mut rng, &[5, 9], 5.0, DType::F32, device)?;
    let all_ignored = Tensor::full(-100i64, 5, device)?;
    let labels = common::labels(&mut rng, &[5], 9, 0.0, -100, device)?;
    let empty_logits = Tensor::zeros((0, 9), DType::F32, device)?;
    let empty_labels = Tensor::zeros(0, DType::I64, device)?;
    let cases: [(&Tensor, &Tensor, Option<usize>); 3] =
        [(&logits, &all_ignored, None), (&logits, &labels, Some(0)), (&empty_logits, &empty_labels, None)];
    for (logits, labels, num_label_tokens) in cases {
        for ce in engines(2) {
            for reduction in [Reduction::Mean, Reduction::Sum] {
                if reduction == Reduction::Sum && num_label_tokens.is_some() {
                    continue;
                }
                let ce = ce.clone().reduction(reduction);
                let (loss, grad) = loss_and_grad(&ce, logits, labels, None, num_label_tokens)?;
                let what = format!("{:?} {reduction:?} num_label_tokens={num_label_tokens:?}", logits.shape());
                assert_eq!(loss.to_scalar::<f32>()?, 0.0, "{what}: loss");
                assert_eq!(grad.dims(), logits.dims(), "{what}: gradient shape");
                let grad_values: Vec<f32> = grad.flatten_all()?.to_vec1()?;
                assert!(grad_values.iter().all(|&g| g == 0.0), "{what}: gradient not exactly zero");
            }
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

/// Confident tokens (`p_y` close to 1): the per-token loss and the target's
/// gradient keep full f32 relative precision where `lse - x_y` and
/// `softmax - 1` cancel. Expected values from NumPy in f64, via `log1p` and
/// `expm1` (not from this crate):
/// ```python
/// import numpy as np
/// x = np.array([[12.0, -3.0, 1.0, 0.5], [-2.0, 0.25, 16.5, 3.0]])
/// loss = [np.log1p(np.exp(x[0, 1:] - 12).sum()), np.log1p(np.exp(x[1] - 16.5).sum() - 1)]
/// target_grad = [np.expm1(-l) for l in loss]  # Reduction::Sum, upstream 1
/// ```
fn confident_tokens_keep_precision(device: &Device) -> anyhow::Result<()> {
    let logits = Tensor::new(&[[12.0f32, -3.0, 1.0, 0.5], [-2.0, 0.25, 16.5, 3.0]], device)?;
    let labels = Tensor::new(&[0u32, 2], device)?;
    let want_loss = Tensor::new(&[2.713732848874861e-05f64, 1.4678379410573912e-06], device)?;
    let want_target_grad = Tensor::new(&[-2.7136960274780648e-05f64, -1.4678368637838076e-06], device)?;
    for ce in engines(1) {
        let ce = ce.reduction(Reduction::None);
        let var = Var::from_tensor(&logits)?;
        let loss = ce.forward(var.as_tensor(), &labels, None)?;
        let grad = loss.sum_all()?.backward()?.get(var.as_tensor()).expect("no gradient").clone();
        let target_grad = grad.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
        assert_close(&loss, &want_loss, 2e-6, 0.0, &format!("{ce:?} confident loss"))?;
        assert_close(&target_grad, &want_target_grad, 2e-6, 0.0, &format!("{ce:?} confident target grad"))?;
    }
    Ok(())
}

device_tests!(
    confident_tokens_keep_precision,
    literal_values,
    matches_slow_reference,
    half_precision_against_f32,
    odd_sizes,
    large_vocab_many_rows,
    chunk_invariance,
    compile_on_off_parity,
    non_contiguous_logits,
    batched_shapes,
    mask_equals_ignore_index,
    ignore_values_and_label_dtypes,
    nothing_to_learn_is_exactly_zero,
    inplace_grad_reuses_logits,
);
