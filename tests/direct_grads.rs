//! `LinearCrossEntropy::loss_and_grads` and `accumulate_grads`: the loss and
//! gradients the autograd path gives (`forward_with_outputs` on variables, then
//! `backward`), to within rounding, with ignored rows, a mask, a bias and the
//! options; micro-batches accumulated with `num_label_tokens` give one big
//! batch's gradients; nothing is recorded in candle's graph.

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{LinearCrossEntropy, LinearGradAccumulator, Reduction};
use common::{assert_close, Rng};

/// The inputs of one case: `[2, 7, 16]` hidden states, a `[61, 16]` weight
/// and a `[61]` bias in `dtype`, labels with ignored tokens, and a mask.
struct Case {
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    mask: Tensor,
}

impl Case {
    fn new(seed: u64, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let mut rng = Rng::new(seed);
        Ok(Self {
            hidden: common::logits(&mut rng, &[2, 7, 16], 1.0, dtype, device)?,
            weight: common::logits(&mut rng, &[61, 16], 0.5, dtype, device)?,
            bias: common::logits(&mut rng, &[61], 0.5, dtype, device)?,
            labels: common::labels(&mut rng, &[2, 7], 61, 0.25, -100, device)?,
            mask: common::mask(&mut rng, &[2, 7], 0.8, device)?,
        })
    }
}

/// The loss and the gradients of hidden, weight and bias through candle's
/// autograd over the loss's own node.
fn through_autograd(ce: &LinearCrossEntropy, case: &Case, bias: bool) -> anyhow::Result<[Option<Tensor>; 4]> {
    let (h, w, b) = (Var::from_tensor(&case.hidden)?, Var::from_tensor(&case.weight)?, Var::from_tensor(&case.bias)?);
    let bias_input = bias.then(|| b.as_tensor());
    let out =
        ce.forward_with_outputs(h.as_tensor(), w.as_tensor(), bias_input, &case.labels, Some(&case.mask), None, None)?;
    let grads = out.loss.backward()?;
    let grad = |v: &Var| grads.get(v.as_tensor()).cloned();
    Ok([Some(out.loss.clone()), grad(&h), grad(&w), if bias { grad(&b) } else { None }])
}

/// Per-dtype tolerance (relative, absolute floor against the largest value):
/// the two paths form the same gradients, rounded the same way, up to the
/// order of a few f32 sums.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F64 => 1e-12,
        _ => 1.0 / 128.0,
    }
}

fn close(got: &Tensor, want: &Tensor, dtype: DType, what: &str) -> anyhow::Result<()> {
    let tol = tolerance(dtype);
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_close(got, want, tol, tol * common::max_abs(want)?, what)?;
    Ok(())
}

/// `loss_and_grads` against the autograd path: f32, bf16 and f16, with and
/// without a bias, `Mean` and `Sum`, with options, on both engines and the
/// path of devices the kernels do not cover.
fn loss_and_grads_match_autograd(device: &Device) -> anyhow::Result<()> {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let case = Case::new(40, dtype, device)?;
        let plain = LinearCrossEntropy::default().chunk_len(Some(4));
        let options = plain.clone().label_smoothing(0.1).z_loss(1e-3).logit_softcap(Some(15.0));
        for ce in [plain.clone(), options, plain.clone().compile(false), plain.force_autograd(true)] {
            for reduction in [Reduction::Mean, Reduction::Sum] {
                let ce = ce.clone().reduction(reduction);
                for bias in [false, true] {
                    let what = format!("{dtype:?} bias {bias} {ce:?}");
                    let [loss, hidden_grad, weight_grad, bias_grad] = through_autograd(&ce, &case, bias)?;
                    let bias_input = bias.then_some(&case.bias);
                    let got =
                        ce.loss_and_grads(&case.hidden, &case.weight, bias_input, &case.labels, Some(&case.mask))?;
                    close(&got.loss, &loss.expect("a loss"), dtype, &format!("{what}: loss"))?;
                    close(&got.hidden_grad, &hidden_grad.expect("hidden grad"), dtype, &format!("{what}: hidden"))?;
                    close(&got.weight_grad, &weight_grad.expect("weight grad"), dtype, &format!("{what}: weight"))?;
                    assert_eq!(got.bias_grad.is_some(), bias, "{what}: bias gradient exactly when a bias is given");
                    if let (Some(got), Some(want)) = (&got.bias_grad, &bias_grad) {
                        close(got, want, dtype, &format!("{what}: bias"))?;
                    }
                    assert!(!got.loss.track_op() && !got.weight_grad.track_op(), "{what}: recorded in a graph");
                }
            }
        }
    }
    Ok(())
}

/// Variables passed in are read, not recorded: the inputs' graph is ignored,
/// and every gradient is computed even for inputs that want none.
fn inputs_graph_is_ignored(device: &Device) -> anyhow::Result<()> {
    let case = Case::new(41, DType::F32, device)?;
    let ce = LinearCrossEntropy::default();
    let plain = ce.loss_and_grads(&case.hidden, &case.weight, None, &case.labels, None)?;
    let h = Var::from_tensor(&case.hidden)?;
    let tracked = ce.loss_and_grads(&h.as_tensor().affine(1.0, 0.0)?, &case.weight, None, &case.labels, None)?;
    assert!(!tracked.loss.track_op() && !tracked.hidden_grad.track_op(), "the outputs joined the inputs' graph");
    assert_close(&tracked.weight_grad, &plain.weight_grad, 0.0, 0.0, "weight gradient")?;
    assert_close(&tracked.hidden_grad, &plain.hidden_grad, 0.0, 0.0, "hidden gradient")?;
    Ok(())
}

/// Three micro-batches accumulated with `num_label_tokens` (the valid tokens
/// of all three) give the one big batch's weight and bias gradients and, per
/// micro-batch, its rows' hidden gradients; their losses sum to its loss. In
/// f32, bf16 and f16 (whose chunk gradients are formed scaled up: the
/// accumulator is scaled around each call), with a micro-batch that has no
/// valid token.
fn accumulated_micro_batches_equal_one_batch(device: &Device) -> anyhow::Result<()> {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut case = Case::new(42, dtype, device)?;
        // The third micro-batch (the last 4 tokens of the second sequence) is all ignored.
        let mut labels: Vec<i64> = case.labels.flatten_all()?.to_vec1()?;
        labels[10..].iter_mut().for_each(|l| *l = -100);
        case.labels = Tensor::from_vec(labels, (2, 7), device)?;
        let ce = LinearCrossEntropy::default().chunk_len(Some(3));
        let whole = ce.loss_and_grads(&case.hidden, &case.weight, Some(&case.bias), &case.labels, Some(&case.mask))?;
        let hidden = case.hidden.reshape((14, 16))?;
        let (labels, mask) = (case.labels.flatten_all()?, case.mask.flatten_all()?);
        let valid: Vec<i64> = labels.to_vec1()?;
        let kept: Vec<u8> = mask.to_vec1()?;
        let n = valid.iter().zip(&kept).filter(|(l, k)| **l != -100 && **k != 0).count();
        let mut acc = LinearGradAccumulator::new(&case.weight, Some(&case.bias))?;
        let (mut total, mut hidden_grads) = (0f64, Vec::new());
        for (start, len) in [(0, 6), (6, 4), (10, 4)] {
            let step = ce.accumulate_grads(
                &hidden.narrow(0, start, len)?,
                &case.weight,
                Some(&case.bias),
                &labels.narrow(0, start, len)?,
                Some(&mask.narrow(0, start, len)?),
                Some(n),
                &mut acc,
            )?;
            total += step.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            hidden_grads.push(step.hidden_grad);
        }
        let what = format!("{dtype:?}");
        let tol = tolerance(dtype);
        let whole_loss = whole.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        assert!((total - whole_loss).abs() <= 1e-5 * whole_loss.abs(), "{what}: losses {total} vs {whole_loss}");
        let hidden_grad = Tensor::cat(&hidden_grads, 0)?.reshape((2, 7, 16))?;
        close(&hidden_grad, &whole.hidden_grad, dtype, &format!("{what}: hidden"))?;
        // The accumulator holds f32: compare it with the whole batch's f32 sums, rounded alike.
        let weight_grad = acc.weight_grad()?;
        assert_eq!((weight_grad.dims(), weight_grad.dtype()), (&[61, 16][..], DType::F32), "{what}: accumulator");
        let want = whole.weight_grad.to_dtype(DType::F32)?;
        assert_close(
            &weight_grad.to_dtype(dtype)?.to_dtype(DType::F32)?,
            &want,
            tol,
            tol * common::max_abs(&want)?,
            &what,
        )?;
        let bias_grad = acc.bias_grad().expect("a bias sum");
        let want = whole.bias_grad.expect("a bias gradient").to_dtype(DType::F32)?;
        assert_close(
            &bias_grad.to_dtype(dtype)?.to_dtype(DType::F32)?,
            &want,
            tol,
            tol * common::max_abs(&want)?,
            &what,
        )?;
        // A call with no valid token adds nothing.
        let before = acc.weight_grad()?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let nothing = ce.accumulate_grads(
            &hidden.narrow(0, 10, 4)?,
            &case.weight,
            Some(&case.bias),
            &labels.narrow(0, 10, 4)?,
            None,
            Some(n),
            &mut acc,
        )?;
        assert_eq!(nothing.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, 0.0, "{what}: an all-ignored micro-batch");
        let after = acc.weight_grad()?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(before, after, "{what}: an all-ignored micro-batch changed the accumulator");
        acc.zero()?;
        assert_eq!(common::max_abs(&acc.weight_grad()?)?, 0.0, "{what}: zero");
    }
    Ok(())
}

/// Bad calls are errors naming the problem.
fn bad_calls_are_errors(device: &Device) -> anyhow::Result<()> {
    let case = Case::new(43, DType::F32, device)?;
    let message = |r: candle::Result<_>| match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    let per_token = LinearCrossEntropy::default().reduction(Reduction::None);
    let err = message(per_token.loss_and_grads(&case.hidden, &case.weight, None, &case.labels, None).map(|_| ()));
    assert!(err.contains("scalar loss"), "{err}");
    let ce = LinearCrossEntropy::default();
    let mut acc = LinearGradAccumulator::new(&case.weight, None)?;
    let other = case.weight.narrow(0, 0, 60)?;
    let err = message(ce.accumulate_grads(&case.hidden, &other, None, &case.labels, None, None, &mut acc).map(|_| ()));
    assert!(err.contains("accumulator"), "{err}");
    let err = message(
        ce.accumulate_grads(&case.hidden, &case.weight, Some(&case.bias), &case.labels, None, None, &mut acc)
            .map(|_| ()),
    );
    assert!(err.contains("bias"), "{err}");
    let sum = LinearCrossEntropy::default().reduction(Reduction::Sum);
    let err = message(
        sum.accumulate_grads(&case.hidden, &case.weight, None, &case.labels, None, Some(3), &mut acc).map(|_| ()),
    );
    assert!(err.contains("num_label_tokens"), "{err}");
    assert!(LinearGradAccumulator::new(&case.bias, None).is_err(), "a [V] weight");
    Ok(())
}

device_tests!(
    loss_and_grads_match_autograd,
    inputs_graph_is_ignored,
    accumulated_micro_batches_equal_one_batch,
    bad_calls_are_errors,
);
