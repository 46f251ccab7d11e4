//! `LinearCrossEntropy`: the same loss and gradients as the loss over the full
//! logits `hidden @ weight^T`, whatever the chunking; tied weights get the sum
//! of both gradients; clear errors.

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{ChunkedCrossEntropy, CrossEntropyOutput, LinearCrossEntropy, Reduction};
use common::{assert_close, backward_of, Rng};

/// Loss and the gradients of `hidden` and `weight`, through
/// `LinearCrossEntropy` or through the logits materialised by a matmul.
fn loss_and_grads(
    linear: Option<&LinearCrossEntropy>,
    full: &ChunkedCrossEntropy,
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let (h, w) = (Var::from_tensor(hidden)?, Var::from_tensor(weight)?);
    let loss = match linear {
        Some(ce) => ce.forward(h.as_tensor(), w.as_tensor(), labels, None)?,
        None => full.forward(&h.as_tensor().broadcast_matmul(&w.as_tensor().t()?)?, labels, None)?,
    };
    let grads = backward_of(&loss)?.backward()?;
    let grad = |v: &Var| grads.get(v.as_tensor()).expect("no gradient").clone();
    Ok((loss, grad(&h), grad(&w)))
}

/// `1e-5` of the largest element: gradient elements are sums of many f32 terms
/// that partly cancel, so their error scales with the largest, not their own size.
fn atol(t: &Tensor) -> anyhow::Result<f64> {
    Ok(1e-5 * t.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn matches_full_logits(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(31);
    let hidden = common::logits(&mut rng, &[3, 13, 24], 1.0, DType::F32, device)?;
    let weight = common::logits(&mut rng, &[257, 24], 0.5, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[3, 13], 257, 0.2, -100, device)?;
    for compile in [true, false] {
        for reduction in [Reduction::Mean, Reduction::None] {
            let full = ChunkedCrossEntropy::default().compile(compile).reduction(reduction);
            let want = loss_and_grads(None, &full, &hidden, &weight, &labels)?;
            for chunk_len in [None, Some(1), Some(5), Some(39), Some(100)] {
                let ce = LinearCrossEntropy::default().compile(compile).reduction(reduction).chunk_len(chunk_len);
                let got = loss_and_grads(Some(&ce), &full, &hidden, &weight, &labels)?;
                let what = format!("compile={compile} {reduction:?} chunk_len={chunk_len:?}");
                assert_close(&got.0, &want.0, 1e-5, 1e-7, &format!("{what} loss"))?;
                assert_close(&got.1, &want.1, 1e-4, atol(&want.1)?, &format!("{what} hidden grad"))?;
                assert_close(&got.2, &want.2, 1e-4, atol(&want.2)?, &format!("{what} weight grad"))?;
            }
        }
    }
    Ok(())
}

/// A weight used both as the token embedding and as the output layer gets the
/// sum of both gradients, as through materialised logits.
fn tied_weights(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(33);
    let table = common::logits(&mut rng, &[50, 8], 0.5, DType::F32, device)?;
    let tokens = Tensor::new(&[3u32, 17, 17, 42, 0, 9], device)?;
    let labels = Tensor::new(&[17i64, 17, 42, 0, 9, -100], device)?;
    let grad_of = |fused: bool| -> anyhow::Result<Tensor> {
        let wte = Var::from_tensor(&table)?;
        let hidden = wte.as_tensor().index_select(&tokens, 0)?.tanh()?;
        let loss = if fused {
            LinearCrossEntropy::default().chunk_len(Some(4)).forward(&hidden, wte.as_tensor(), &labels, None)?
        } else {
            ChunkedCrossEntropy::default().forward(&hidden.matmul(&wte.as_tensor().t()?)?, &labels, None)?
        };
        Ok(loss.backward()?.get(wte.as_tensor()).expect("no gradient").clone())
    };
    let want = grad_of(false)?;
    assert_close(&grad_of(true)?, &want, 1e-4, atol(&want)?, "tied weight gradient")?;
    Ok(())
}

/// bf16 hidden states and weight: the loss in f32, the gradients in bf16,
/// against the f32 computation of the same rounded values, to bf16
/// tolerances: the weight's gradient accumulated over 16-row chunks in f32,
/// or, in one chunk (the automatic one here: 64 rows), summed straight into
/// bf16 (`plan_chunks`), through autograd and `loss_and_grads`, with and
/// without the upstream gradient scaled by 0.3 (a second rounding).
fn bf16_inputs(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(32);
    let hidden = common::logits(&mut rng, &[64, 32], 1.0, DType::BF16, device)?;
    let weight = common::logits(&mut rng, &[500, 32], 0.5, DType::BF16, device)?;
    let labels = common::labels(&mut rng, &[64], 500, 0.1, -100, device)?;
    let f32s = |t: &Tensor| t.to_dtype(DType::F32);
    let full = ChunkedCrossEntropy::default();
    let (want, want_h, want_w) = loss_and_grads(None, &full, &f32s(&hidden)?, &f32s(&weight)?, &labels)?;
    for chunk_len in [Some(16), None] {
        let ce = LinearCrossEntropy::default().chunk_len(chunk_len);
        let what = format!("bf16, chunk_len {chunk_len:?}");
        let (loss, h_grad, w_grad) = loss_and_grads(Some(&ce), &full, &hidden, &weight, &labels)?;
        assert_eq!((loss.dtype(), h_grad.dtype(), w_grad.dtype()), (DType::F32, DType::BF16, DType::BF16));
        assert_close(&loss, &want, 1e-2, 0.0, &format!("{what}: loss"))?;
        assert_close(&h_grad, &want_h, 5e-2, 1e-4, &format!("{what}: hidden grad"))?;
        assert_close(&w_grad, &want_w, 5e-2, 1e-4, &format!("{what}: weight grad"))?;
        let direct = ce.loss_and_grads(&hidden, &weight, None, &labels, None)?;
        assert_eq!(direct.weight_grad.dtype(), DType::BF16, "{what}: loss_and_grads' weight grad dtype");
        assert_close(&direct.weight_grad, &want_w, 5e-2, 1e-4, &format!("{what}: loss_and_grads' weight grad"))?;
        let (h, w) = (Var::from_tensor(&hidden)?, Var::from_tensor(&weight)?);
        let grads = ce.forward(h.as_tensor(), w.as_tensor(), &labels, None)?.affine(0.3, 0.0)?.backward()?;
        let scaled = grads.get(w.as_tensor()).expect("no gradient");
        assert_close(scaled, &(&want_w * 0.3)?, 5e-2, 1e-4, &format!("{what}: weight grad of loss * 0.3"))?;
    }
    Ok(())
}

fn bad_inputs(device: &Device) -> anyhow::Result<()> {
    let hidden = Tensor::zeros((4, 8), DType::F32, device)?;
    let weight = Tensor::zeros((10, 8), DType::F32, device)?;
    let labels = Tensor::new(&[1i64, 2, 12, 3], device)?;
    let good = Tensor::new(&[1i64, 2, 3, 4], device)?;
    let message = |r: candle::Result<Tensor>| r.expect_err("should fail").to_string();
    for ce in [LinearCrossEntropy::default(), LinearCrossEntropy::default().force_autograd(true)] {
        let err = message(ce.forward(&hidden, &weight, &labels, None));
        assert!(err.contains("label 12") && err.contains("row 2"), "{err}");
        let err = message(ce.forward(&hidden, &Tensor::zeros((10, 7), DType::F32, device)?, &good, None));
        assert!(err.contains("must be [V, 8]"), "{err}");
        let err = message(ce.forward(&hidden, &weight.to_dtype(DType::F64)?, &good, None));
        assert!(err.contains("share dtype"), "{err}");
        let sum = ce.clone().reduction(Reduction::Sum);
        let err = message(sum.forward_with_num_label_tokens(&hidden, &weight, &good, None, Some(3)));
        assert!(err.contains("num_label_tokens"), "{err}");
        let err = message(ce.clone().chunk_len(Some(0)).forward(&hidden, &weight, &good, None));
        assert!(err.contains("chunk_len"), "{err}");
        let ignored = Tensor::full(-100i64, 4, device)?;
        let err = message(ce.forward(&hidden, &Tensor::zeros((0, 8), DType::F32, device)?, &ignored, None));
        assert!(err.contains("empty vocabulary"), "{err}");
        let (no_features, no_columns) =
            (Tensor::zeros((4, 0), DType::F32, device)?, Tensor::zeros((10, 0), DType::F32, device)?);
        let err = message(ce.forward(&no_features, &no_columns, &good, None));
        assert!(err.contains("has no features (H = 0)"), "{err}");
    }
    Ok(())
}

/// No valid token (all ignored or masked, `num_label_tokens = 0`, or no rows:
/// `[0, H]`, `[B, 0, H]`): a loss of exactly 0 and exactly zero gradients,
/// still connected to every input, through every entry point and reduction,
/// with a bias and per-token loss weights too, in f32 and in bf16 (whose
/// automatic plan on CUDA is one chunk of all the valid rows: of none here).
/// On CUDA no kernel and no matrix product may run over an empty problem.
fn nothing_to_learn_is_exactly_zero(device: &Device) -> anyhow::Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        nothing_to_learn_in(dtype, device)?;
    }
    Ok(())
}

fn nothing_to_learn_in(dtype: DType, device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(34);
    let hidden = common::logits(&mut rng, &[5, 6], 1.0, dtype, device)?;
    let weight = common::logits(&mut rng, &[11, 6], 1.0, dtype, device)?;
    let bias = common::logits(&mut rng, &[11], 1.0, dtype, device)?;
    let labels = common::labels(&mut rng, &[5], 11, 0.0, -100, device)?;
    let none_kept = Tensor::zeros(5, DType::U8, device)?;
    let ignored = Tensor::full(-100i64, 5, device)?;
    let no_rows = Tensor::zeros((0, 6), dtype, device)?;
    let no_positions = Tensor::zeros((2, 0, 6), dtype, device)?;
    let (no_labels, no_position_labels) =
        (Tensor::zeros(0, DType::I64, device)?, Tensor::zeros((2, 0), DType::U8, device)?);
    type Case<'a> = (&'a Tensor, &'a Tensor, Option<&'a Tensor>, Option<usize>);
    let cases: [Case; 5] = [
        (&hidden, &ignored, None, None),
        (&hidden, &labels, Some(&none_kept), None),
        (&hidden, &labels, None, Some(0)),
        (&no_rows, &no_labels, None, None),
        (&no_positions, &no_position_labels, None, None),
    ];
    for linear in [LinearCrossEntropy::default(), LinearCrossEntropy::default().force_autograd(true)] {
        for (hidden, labels, mask, num_label_tokens) in cases {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                if reduction != Reduction::Mean && num_label_tokens.is_some() {
                    continue;
                }
                let ce = linear.clone().reduction(reduction);
                let what = format!("{dtype:?} {ce:?} {:?} {num_label_tokens:?}", hidden.shape());
                let (h, w, b) = (Var::from_tensor(hidden)?, Var::from_tensor(&weight)?, Var::from_tensor(&bias)?);
                let loss_weights = match labels.elem_count() {
                    0 => Tensor::zeros(labels.dims(), DType::F32, device)?,
                    _ => Tensor::ones(labels.dims(), DType::F32, device)?,
                };
                let weights = num_label_tokens.is_none().then_some(&loss_weights);
                let out = ce.forward_with_outputs(
                    h.as_tensor(),
                    w.as_tensor(),
                    Some(b.as_tensor()),
                    labels,
                    mask,
                    weights,
                    num_label_tokens,
                )?;
                common::assert_all_zero(&out.loss, &format!("{what}: loss"))?;
                common::assert_all_zero(&out.z_loss, &format!("{what}: z_loss"))?;
                // With `num_label_tokens = 0` the tokens are valid: only the reduced loss is 0.
                if num_label_tokens.is_none() {
                    common::assert_all_zero(&out.token_losses, &format!("{what}: token_losses"))?;
                }
                assert_eq!(out.token_losses.dims(), labels.dims(), "{what}: token_losses shape");
                // candle cannot start a backward pass from an empty tensor on CUDA: empty
                // per-token losses are only checked forward.
                if reduction == Reduction::None && labels.elem_count() == 0 {
                    continue;
                }
                let grads = common::backward_of(&out.loss)?.backward()?;
                for (name, v) in [("hidden", &h), ("weight", &w), ("bias", &b)] {
                    let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{what}: no {name} gradient"));
                    assert_eq!(g.dims(), v.dims(), "{what}: {name} gradient shape");
                    common::assert_all_zero(g, &format!("{what}: {name} gradient"))?;
                }
                let loss =
                    ce.forward_with_num_label_tokens(h.as_tensor(), w.as_tensor(), labels, mask, num_label_tokens)?;
                common::assert_all_zero(&loss, &format!("{what}: forward_with_num_label_tokens"))?;
            }
        }
    }
    Ok(())
}

/// A scalar loss takes the gradients computed in forward (scaled by whatever
/// reaches the loss); any other use of the outputs makes backward recompute.
/// Both give the full-logits path's gradients, with every option on.
fn gradients_from_forward_or_recomputed(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(35);
    let hidden = common::logits(&mut rng, &[2, 9, 16], 1.0, DType::F32, device)?;
    let weight = common::logits(&mut rng, &[97, 16], 0.5, DType::F32, device)?;
    let bias = common::logits(&mut rng, &[97], 0.5, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[2, 9], 97, 0.2, -100, device)?;
    type Objective = fn(&CrossEntropyOutput) -> candle::Result<Tensor>;
    // (what the backward starts from, whether it can use the forward's gradients)
    let objectives: [(&str, Objective, bool); 4] = [
        ("loss", |o| Ok(o.loss.clone()), true),
        ("loss * -2.5", |o| o.loss.affine(-2.5, 0.0), true),
        ("loss + z_loss", |o| &o.loss + &o.z_loss, false),
        ("loss + weighted token losses", |o| &o.loss + backward_of(&o.token_losses)?, false),
    ];
    for (reduction, num_label_tokens) in [(Reduction::Mean, None), (Reduction::Mean, Some(40)), (Reduction::Sum, None)]
    {
        for (name, objective, from_forward) in objectives {
            let linear = LinearCrossEntropy::default()
                .chunk_len(Some(4))
                .reduction(reduction)
                .label_smoothing(0.1)
                .z_loss(1e-3)
                .logit_softcap(Some(3.0));
            let full = ChunkedCrossEntropy::default()
                .reduction(reduction)
                .label_smoothing(0.1)
                .z_loss(1e-3)
                .logit_softcap(Some(3.0));
            let (h, w, b) = (Var::from_tensor(&hidden)?, Var::from_tensor(&weight)?, Var::from_tensor(&bias)?);
            let before = candle_chunked_ce::recomputed_backwards();
            let out = linear.forward_with_outputs(&h, &w, Some(&b), &labels, None, None, num_label_tokens)?;
            let grads = objective(&out)?.backward()?;
            let recomputed = candle_chunked_ce::recomputed_backwards() - before;
            let what = format!("{reduction:?} {num_label_tokens:?} {name}");
            assert_eq!(recomputed, usize::from(!from_forward), "{what}: recomputed backward passes");
            let (fh, fw, fb) = (Var::from_tensor(&hidden)?, Var::from_tensor(&weight)?, Var::from_tensor(&bias)?);
            let logits = fh.as_tensor().broadcast_matmul(&fw.as_tensor().t()?)?.broadcast_add(&fb)?;
            let want =
                objective(&full.forward_with_outputs(&logits, &labels, None, None, num_label_tokens)?)?.backward()?;
            for (got, expected, var) in [(&h, &fh, "hidden"), (&w, &fw, "weight"), (&b, &fb, "bias")] {
                let got = grads.get(got).expect("no gradient");
                let expected = want.get(expected).expect("no gradient");
                assert_close(got, expected, 1e-4, atol(expected)?, &format!("{what}: {var} gradient"))?;
            }
        }
    }
    Ok(())
}

/// Only the products some input wants a gradient from run (candle's
/// `track_op`): evaluation computes the logits alone, a frozen head (a plain
/// weight tensor) no weight gradient, constant hidden states no hidden
/// gradient; whether the gradients come from the forward pass (`Mean`) or a
/// recomputing backward (`None`). The wanted gradients match those of the
/// materialised logits; the others are absent.
fn gradients_only_where_wanted(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(41);
    let (rows, chunk) = (40, 10);
    let hidden = common::logits(&mut rng, &[rows, 12], 1.0, DType::F32, device)?;
    let weight = common::logits(&mut rng, &[97, 12], 0.5, DType::F32, device)?;
    let labels = common::labels(&mut rng, &[rows], 97, 0.2, -100, device)?;
    // Ignored rows are left out of the products.
    let valid = labels.to_vec1::<i64>()?.iter().filter(|&&l| l != -100).count();
    assert!(valid < rows, "the test needs ignored rows");
    let chunks = valid.div_ceil(chunk);
    for reduction in [Reduction::Mean, Reduction::None] {
        let linear = LinearCrossEntropy::default().chunk_len(Some(chunk)).reduction(reduction);
        let full = ChunkedCrossEntropy::default().reduction(reduction);
        for (hidden_wanted, weight_wanted) in [(false, false), (true, false), (false, true), (true, true)] {
            let what = format!("{reduction:?}, hidden wanted {hidden_wanted}, weight wanted {weight_wanted}");
            let input = |t: &Tensor, wanted: bool| -> candle::Result<Tensor> {
                Ok(if wanted { Var::from_tensor(t)?.as_tensor().clone() } else { t.clone() })
            };
            let (h, w) = (input(&hidden, hidden_wanted)?, input(&weight, weight_wanted)?);
            let before = candle_chunked_ce::linear_products();
            let loss = linear.forward(&h, &w, &labels, None)?.sum_all()?;
            let grads = (hidden_wanted || weight_wanted).then(|| loss.backward()).transpose()?;
            let after = candle_chunked_ce::linear_products();
            // A recomputing backward computes each chunk's logits once more.
            let recomputed = reduction == Reduction::None && (hidden_wanted || weight_wanted);
            let logits = chunks * (1 + usize::from(recomputed));
            assert_eq!(after.logits - before.logits, logits, "{what}: logits products");
            let logits_rows = valid * (1 + usize::from(recomputed));
            assert_eq!(after.logits_rows - before.logits_rows, logits_rows, "{what}: rows multiplied");
            let hidden_grads = after.hidden_grad - before.hidden_grad;
            assert_eq!(hidden_grads, chunks * usize::from(hidden_wanted), "{what}: hidden-gradient products");
            let weight_grads = after.weight_grad - before.weight_grad;
            assert_eq!(weight_grads, chunks * usize::from(weight_wanted), "{what}: weight-gradient products");
            let Some(grads) = grads else { continue };
            let (fh, fw) = (Var::from_tensor(&hidden)?, Var::from_tensor(&weight)?);
            let want = full.forward(&fh.as_tensor().matmul(&fw.as_tensor().t()?)?, &labels, None)?.sum_all()?;
            let want = want.backward()?;
            for (got, expected, wanted, name) in
                [(&h, &fh, hidden_wanted, "hidden"), (&w, &fw, weight_wanted, "weight")]
            {
                match (grads.get(got), wanted) {
                    (Some(got), true) => {
                        let expected = want.get(expected).expect("the reference has every gradient");
                        assert_close(got, expected, 1e-4, atol(expected)?, &format!("{what}: {name} gradient"))?;
                    }
                    (None, false) => {}
                    (got, _) => panic!("{what}: {name} gradient present: {}", got.is_some()),
                }
            }
        }
    }
    Ok(())
}

/// f16 hidden states and weight under loss scaling (the loss multiplied by
/// 2^16, as mixed-precision training does): the gradients formed in the
/// forward pass must not underflow f16 before the scale reaches them. They
/// match the f32 gradients of the same values times 2^16, within f16 rounding.
fn f16_under_loss_scaling(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(61);
    let (rows, width, vocab) = (2048, 32, 8192);
    let hidden = common::logits(&mut rng, &[rows, width], 1.0, DType::F16, device)?;
    let weight = common::logits(&mut rng, &[vocab, width], 0.5, DType::F16, device)?;
    let labels = common::labels(&mut rng, &[rows], vocab, 0.1, -100, device)?;
    let loss_scale = 65536.0;
    let linear = LinearCrossEntropy::default().chunk_len(Some(64));
    let gradients = |dtype: DType| -> anyhow::Result<(Tensor, Tensor)> {
        let (h, w) = (Var::from_tensor(&hidden.to_dtype(dtype)?)?, Var::from_tensor(&weight.to_dtype(dtype)?)?);
        let loss = linear.forward(h.as_tensor(), w.as_tensor(), &labels, None)?;
        let grads = loss.affine(if dtype == DType::F16 { loss_scale } else { 1.0 }, 0.0)?.backward()?;
        let grad =
            |v: &Var| -> candle::Result<Tensor> { grads.get(v.as_tensor()).expect("a gradient").to_dtype(DType::F32) };
        Ok((grad(&h)?, grad(&w)?))
    };
    let (want_h, want_w) = gradients(DType::F32)?;
    let (got_h, got_w) = gradients(DType::F16)?;
    for (got, want, name) in [(got_h, want_h, "hidden"), (got_w, want_w, "weight")] {
        let want = want.affine(loss_scale, 0.0)?;
        // f16 keeps 11 significant bits; the products add a few roundings more.
        assert_close(&got, &want, 4e-3, 4e-3 * common::max_abs(&want)?, &format!("f16 x 2^16: {name} gradient"))?;
    }
    Ok(())
}

/// Every label dtype, contiguous and strided, with a mask: the same loss and
/// gradients as i64 labels (on CUDA no candle kernel sees the caller's dtype).
fn label_dtypes(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(36);
    let hidden = common::logits(&mut rng, &[2, 5, 8], 1.0, DType::F32, device)?;
    let weight = common::logits(&mut rng, &[40, 8], 0.5, DType::F32, device)?;
    let values: Vec<i64> = (0..12).map(|_| rng.below(40) as i64).collect();
    let mask = common::mask(&mut rng, &[2, 5], 0.7, device)?;
    let ce = LinearCrossEntropy::default().chunk_len(Some(3));
    let run = |labels: &Tensor| -> anyhow::Result<(Tensor, Tensor, Tensor)> {
        let (h, w) = (Var::from_tensor(&hidden)?, Var::from_tensor(&weight)?);
        let loss = ce.forward(h.as_tensor(), w.as_tensor(), labels, Some(&mask))?;
        let grads = loss.backward()?;
        let grad = |v: &Var| grads.get(v.as_tensor()).expect("a gradient").clone();
        Ok((loss, grad(&h), grad(&w)))
    };
    let want = run(&Tensor::from_vec(values.clone(), (2, 6), device)?.narrow(1, 1, 5)?.contiguous()?)?;
    for dtype in common::LABEL_DTYPES {
        let wide = common::labels_as(&values, &[2, 6], dtype, device)?;
        for labels in [wide.narrow(1, 1, 5)?, wide.narrow(1, 1, 5)?.copy()?] {
            let what = format!("{dtype:?} labels, strides {:?}", labels.stride());
            let got = run(&labels)?;
            assert_close(&got.0, &want.0, 0.0, 0.0, &format!("{what}: loss"))?;
            assert_close(&got.1, &want.1, 0.0, 0.0, &format!("{what}: hidden gradient"))?;
            assert_close(&got.2, &want.2, 0.0, 0.0, &format!("{what}: weight gradient"))?;
        }
    }
    Ok(())
}

/// What the linear loss's row scatter (`src/linear/rows.rs`) relies on in
/// candle: `index_select` with a `u32` index of `u32::MAX` gives a zero row
/// (on the CPU and in candle-kernels' CUDA kernel), in the dtypes the scatter
/// meets (the hidden states' gradient, f32 statistics). A candle that
/// dropped it would fail here (an out-of-range index) rather than in the loss.
fn index_select_zeroes_rows_at_the_index_maximum(device: &Device) -> anyhow::Result<()> {
    let places = Tensor::new(&[u32::MAX, 1, u32::MAX, 0, 2], device)?;
    let expected = [[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 2.0], [5.0, 6.0]];
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let rows = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], device)?.to_dtype(dtype)?;
        let scattered = rows.index_select(&places, 0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        assert_eq!(scattered, expected, "{dtype:?}");
    }
    Ok(())
}

device_tests!(
    index_select_zeroes_rows_at_the_index_maximum,
    label_dtypes,
    matches_full_logits,
    tied_weights,
    bf16_inputs,
    bad_inputs,
    nothing_to_learn_is_exactly_zero,
    gradients_from_forward_or_recomputed,
    gradients_only_where_wanted,
    f16_under_loss_scaling,
);
