//! The values: against NumPy's, the slow autograd reference and f32, over
//! dtypes, odd sizes, chunk lengths and both engines, and the precision of
//! confident tokens.

use super::engines;
use crate::common::{self, assert_close, loss_and_grad, slow_loss_and_grad, Rng};
use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{compute_cross_entropy, ChunkedCrossEntropy, Reduction};

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

/// The fused kernels and candle's primitive ops agree, per token and in the
/// gradient, to within what their arithmetic differs by (see
/// [`engine_grad_tolerance`]).
fn compile_on_off_parity(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(6);
    for dtype in [DType::F32, DType::BF16] {
        let logits = common::logits(&mut rng, &[3, 11, 257], 12.0, dtype, device)?;
        let labels = common::labels(&mut rng, &[3, 11], 257, 0.2, -100, device)?;
        let mask = common::mask(&mut rng, &[3, 11], 0.8, device)?;
        let ce = ChunkedCrossEntropy::default().reduction(Reduction::None);
        let fused = loss_and_grad(&ce, &logits, &labels, Some(&mask), None)?;
        let primitive = loss_and_grad(&ce.clone().compile(false), &logits, &labels, Some(&mask), None)?;
        assert_close(&fused.0, &primitive.0, 1e-6, 1e-7, &format!("{dtype:?} per-token"))?;
        let lse = ce.compile(false).forward_with_outputs(&logits, &labels, Some(&mask), None, None)?.lse;
        let what = format!("{dtype:?} grad");
        if dtype == DType::BF16 {
            // Both round an f32 gradient to bf16 once: one bf16 ulp (2^-7 relative) apart at most.
            assert_close(&fused.1, &primitive.1, 1.0 / 128.0, 1e-9, &what)?;
        } else {
            let (fused, primitive) =
                (fused.1.flatten_all()?.to_vec1::<f32>()?, primitive.1.flatten_all()?.to_vec1::<f32>()?);
            let tolerance = engine_grad_tolerance(&logits, &labels, &lse)?;
            for (i, ((a, b), tol)) in fused.iter().zip(&primitive).zip(&tolerance).enumerate() {
                let diff = (a - b).abs() as f64;
                assert!(diff <= *tol, "{what}: element {i}: {a} vs {b} (diff {diff:e} > {tol:e})");
            }
        }
    }
    Ok(())
}

/// How far the f32 gradients of the two engines can be apart, per element of
/// `[N, V]` logits `x` with `labels` (`[N]`-shaped, any shape) and each row's
/// log-sum-exp `lse`, for the weighted sum of per-token losses that
/// [`common::backward_of`] starts from (row `r`'s weight `w = r + 0.5`; 0 on
/// ignored rows, whose gradients are exact zeros in both). In units of
/// `u = 2^-24` relative to `w p_j`:
///
/// - the fused kernels form `p_j = exp2(fma(x_j, log2 e, -(lse log2 e)))`:
///   rounding `lse log2 e` and the FMA put `u (|lse| + 2 |x_j - lse|)` into
///   the exponent (times `ln 2 log2 e = 1`), `exp2f` adds 2 ulp (`4u`);
/// - the primitive engine forms `exp(x_j - lse)`: rounding the difference
///   puts `u |x_j - lse|` into the exponent, `expf` adds 2 ulp (`4u`);
/// - each engine's own `lse` (a max, a sum of `V` exponentials, a log)
///   differs from the exact one by `u (|lse| + log2 V + 2)` at most: `2u
///   (|lse| + log2 V + 2)` between them, again in the exponent;
/// - multiplying by the row's factor rounds once in each (`2u`).
///
/// The target's gradient `w (p_y - 1)` is formed as `w expm1(-ce)` by the
/// kernels and as `-w Σ_{j≠y} p_j` by the primitive engine: both carry the
/// row's exponent error, so its bound is the row's largest relative bound
/// times `w`.
fn engine_grad_tolerance(logits: &Tensor, labels: &Tensor, lse: &Tensor) -> anyhow::Result<Vec<f64>> {
    let vocab = logits.dim(candle::D::Minus1)?;
    let x: Vec<f64> = logits.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let lse: Vec<f64> = lse.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let labels: Vec<i64> = labels.flatten_all()?.to_vec1()?;
    let u = f64::powi(2.0, -24);
    let mut tolerance = Vec::with_capacity(x.len());
    for (r, row) in x.chunks(vocab).enumerate() {
        let (w, lse) = (r as f64 + 0.5, lse[r]);
        let relative = |x: f64| u * (3.0 * lse.abs() + 3.0 * (x - lse).abs() + 2.0 * (vocab as f64).log2() + 14.0);
        let row_bound = row.iter().map(|&x| relative(x)).fold(0.0, f64::max);
        for (j, &x) in row.iter().enumerate() {
            let p = (x - lse).exp();
            tolerance.push(if labels[r] == j as i64 { w * row_bound } else { w * p * relative(x) });
        }
    }
    Ok(tolerance)
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
);
