//! Every bad input gets a `candle::Error` that names the problem, never a
//! panic, on both engines (and the path of devices our kernels do not cover)
//! where the setting applies; the caller's labels are
//! left as they were.

mod common;

use candle::{DType, Device, Tensor};
use candle_chunked_ce::{compute_cross_entropy, ChunkedCrossEntropy, LinearCrossEntropy, Reduction};
use common::Rng;

/// Both engines at a small chunk length, and candle's autograd as on a device
/// our kernels do not cover.
fn engines() -> [ChunkedCrossEntropy; 3] {
    let fused = ChunkedCrossEntropy::new(2, true, -100);
    [fused.clone(), ChunkedCrossEntropy::new(2, false, -100), fused.force_autograd(true)]
}

/// Asserts that `result` is an error whose message contains every one of
/// `words`, naming `what` on failure; returns the message.
fn expect_err<T: std::fmt::Debug>(result: candle::Result<T>, words: &[&str], what: &str) -> String {
    let message = match result {
        Ok(value) => panic!("{what}: expected an error, got Ok({value:?})"),
        Err(err) => err.to_string(),
    };
    for word in words {
        assert!(message.contains(word), "{what}: error message lacks {word:?}: {message}");
    }
    message
}

/// A label >= V names its row, its value and the valid range, on both engines,
/// in forward and through backward's entry point, for every label dtype.
fn label_too_large(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(20);
    let logits = common::logits(&mut rng, &[4, 5], 3.0, DType::F32, device)?;
    for dtype in common::LABEL_DTYPES {
        // u8 / u32 cannot hold -100: use a valid label there instead.
        let values = if matches!(dtype, DType::U8 | DType::U32) { [1, 0, 7, 9] } else { [1, -100, 7, 9] };
        let labels = common::labels_as(&values, &[4], dtype, device)?;
        for ce in engines() {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let what = format!("{dtype:?} {reduction:?} {ce:?}");
                let ce = ce.clone().reduction(reduction);
                // The first bad row is the one reported.
                expect_err(ce.forward(&logits, &labels, None), &["label 7", "row 2", "[0, 5)", "ignore_index"], &what);
                expect_err(
                    common::loss_and_grad(&ce, &logits, &labels, None, None),
                    &["label 7", "row 2"],
                    &format!("{what} loss_and_grad"),
                );
            }
        }
    }
    // Exactly V is already out of range; the row of [B, S] labels is the flattened index.
    let logits3 = common::logits(&mut rng, &[2, 3, 5], 3.0, DType::F32, device)?;
    let labels3 = Tensor::new(&[[0i64, 1, 2], [3, 4, 5]], device)?;
    for ce in engines() {
        expect_err(ce.forward(&logits3, &labels3, None), &["label 5", "row 5", "[0, 5)"], &format!("[B, S] {ce:?}"));
    }
    Ok(())
}

/// A negative label other than `ignore_index` is out of range too, whatever
/// `ignore_index` is.
fn negative_label(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(21);
    let logits = common::logits(&mut rng, &[3, 6], 3.0, DType::F32, device)?;
    for (labels, ignore_index, words) in [
        (vec![2i64, -1, -100], -100, ["label -1", "row 1"]),
        (vec![-100i64, 0, 3], -1, ["label -100", "row 0"]),
        (vec![0i64, 1, i64::MIN], -100, ["label -9223372036854775808", "row 2"]),
    ] {
        let labels = Tensor::new(labels.as_slice(), device)?;
        for ce in engines() {
            let ce = ce.ignore_index(ignore_index);
            let what = format!("ignore_index={ignore_index} {ce:?}");
            let message = expect_err(ce.forward(&logits, &labels, None), &words, &what);
            assert!(message.contains(&format!("({ignore_index})")), "{what}: ignore_index not named: {message}");
        }
    }
    Ok(())
}

/// Logits of rank 1 or 4 are refused, naming the accepted shapes.
fn logits_rank(device: &Device) -> anyhow::Result<()> {
    let cases = [
        (Tensor::zeros(5, DType::F32, device)?, Tensor::zeros((), DType::I64, device)?, "[5]"),
        (Tensor::zeros(5, DType::F32, device)?, Tensor::zeros(5, DType::I64, device)?, "[5]"),
        (
            Tensor::zeros((2, 3, 4, 5), DType::F32, device)?,
            Tensor::zeros((2, 3, 4), DType::I64, device)?,
            "[2, 3, 4, 5]",
        ),
        (Tensor::zeros((), DType::F32, device)?, Tensor::zeros((), DType::I64, device)?, "[]"),
    ];
    for (logits, labels, shape) in &cases {
        for ce in engines() {
            let what = format!("logits {shape} {ce:?}");
            expect_err(ce.forward(logits, labels, None), &["logits", "[N, V] or [B, S, V]", shape], &what);
        }
    }
    Ok(())
}

/// Integer logits are refused, naming the dtype.
fn integer_logits(device: &Device) -> anyhow::Result<()> {
    let labels = Tensor::new(&[0i64, 1, 2], device)?;
    for (dtype, name) in [(DType::U32, "U32"), (DType::I64, "I64"), (DType::U8, "U8")] {
        let logits = Tensor::zeros((3, 4), dtype, device)?;
        for ce in engines() {
            let what = format!("{dtype:?} logits {ce:?}");
            expect_err(ce.forward(&logits, &labels, None), &["logits must be f32, f64, bf16 or f16", name], &what);
        }
        expect_err(compute_cross_entropy(&logits, &labels, -100), &["logits must be", name], "compute_cross_entropy");
    }
    Ok(())
}

/// Float labels are refused, naming the dtype.
fn float_labels(device: &Device) -> anyhow::Result<()> {
    let logits = Tensor::zeros((3, 4), DType::F32, device)?;
    for dtype in [DType::F32, DType::F64, DType::BF16] {
        let labels = Tensor::new(&[0f32, 1.0, 2.0], device)?.to_dtype(dtype)?;
        for ce in engines() {
            let what = format!("{dtype:?} labels {ce:?}");
            let words = ["labels must be an integer dtype", &format!("{dtype:?}")];
            expect_err(ce.forward(&logits, &labels, None), &words, &what);
        }
    }
    Ok(())
}

/// Labels not shaped like the logits without `V`: both shapes are named.
fn labels_shape_mismatch(device: &Device) -> anyhow::Result<()> {
    let logits2 = Tensor::zeros((4, 6), DType::F32, device)?;
    let logits3 = Tensor::zeros((2, 2, 6), DType::F32, device)?;
    let cases = [
        (&logits2, Tensor::zeros(5, DType::I64, device)?, "[5]", "[4, 6]"),
        (&logits2, Tensor::zeros(3, DType::I64, device)?, "[3]", "[4, 6]"),
        (&logits2, Tensor::zeros((2, 2), DType::I64, device)?, "[2, 2]", "[4, 6]"),
        (&logits2, Tensor::zeros((4, 6), DType::I64, device)?, "[4, 6]", "[4, 6]"),
        (&logits3, Tensor::zeros(4, DType::I64, device)?, "[4]", "[2, 2, 6]"),
        (&logits3, Tensor::zeros((2, 3), DType::I64, device)?, "[2, 3]", "[2, 2, 6]"),
    ];
    for (logits, labels, labels_shape, logits_shape) in &cases {
        for ce in engines() {
            let what = format!("labels {labels_shape} vs logits {logits_shape} {ce:?}");
            let words = ["labels", *labels_shape, "must have the logits' shape", *logits_shape];
            expect_err(ce.forward(logits, labels, None), &words, &what);
        }
    }
    Ok(())
}

/// A mask of another shape than the labels is refused, naming it.
fn mask_shape_mismatch(device: &Device) -> anyhow::Result<()> {
    let logits = Tensor::zeros((2, 3, 6), DType::F32, device)?;
    let labels = Tensor::zeros((2, 3), DType::I64, device)?;
    let masks = [
        (Tensor::ones(6, DType::U8, device)?, "[6]"),
        (Tensor::ones((3, 2), DType::U8, device)?, "[3, 2]"),
        (Tensor::ones((2, 4), DType::F32, device)?, "[2, 4]"),
        (Tensor::ones((2, 3, 6), DType::U8, device)?, "[2, 3, 6]"),
    ];
    for (mask, shape) in &masks {
        for ce in engines() {
            let what = format!("mask {shape} {ce:?}");
            expect_err(ce.forward(&logits, &labels, Some(mask)), &["mask", shape, "[2, 3]"], &what);
        }
    }
    Ok(())
}

/// `chunk_len = 0` is refused on both engines.
fn zero_chunk_len(device: &Device) -> anyhow::Result<()> {
    let logits = Tensor::zeros((3, 4), DType::F32, device)?;
    let labels = Tensor::new(&[0i64, 1, 2], device)?;
    for compile in [true, false] {
        let ce = ChunkedCrossEntropy::new(0, compile, -100);
        expect_err(ce.forward(&logits, &labels, None), &["chunk_len", "at least 1"], &format!("compile={compile}"));
        let ce = ChunkedCrossEntropy::default().compile(compile).chunk_len(0);
        expect_err(ce.forward(&logits, &labels, None), &["chunk_len", "0"], &format!("builder compile={compile}"));
    }
    Ok(())
}

/// `inplace_grad` needs the fused kernels.
fn inplace_grad_without_compile(device: &Device) -> anyhow::Result<()> {
    let logits = Tensor::zeros((3, 4), DType::F32, device)?;
    let labels = Tensor::new(&[0i64, 1, 2], device)?;
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let ce = ChunkedCrossEntropy::default().compile(false).inplace_grad(true).reduction(reduction);
        expect_err(ce.forward(&logits, &labels, None), &["inplace_grad", "compile = true"], &format!("{reduction:?}"));
    }
    // The same settings with the fused kernels are fine.
    ChunkedCrossEntropy::default().inplace_grad(true).forward(&logits, &labels, None)?;
    Ok(())
}

/// `num_label_tokens` only makes sense for `Reduction::Mean`.
fn num_label_tokens_without_mean(device: &Device) -> anyhow::Result<()> {
    let logits = Tensor::zeros((3, 4), DType::F32, device)?;
    let labels = Tensor::new(&[0i64, 1, 2], device)?;
    for ce in engines() {
        for (reduction, name) in [(Reduction::Sum, "Sum"), (Reduction::None, "None")] {
            let ce = ce.clone().reduction(reduction);
            for n in [0, 3, 100] {
                let what = format!("{reduction:?} num_label_tokens={n} {ce:?}");
                let result = ce.forward_with_num_label_tokens(&logits, &labels, None, Some(n));
                expect_err(result, &["num_label_tokens", "Reduction::Mean", name], &what);
            }
            // Without it, the same call is fine.
            ce.forward_with_num_label_tokens(&logits, &labels, None, None)?;
        }
    }
    Ok(())
}

/// A bad label is reported as one with class weights too: their per-token
/// gather must not meet it first (candle's CUDA gather does not check its
/// indices), on both losses and every engine.
fn bad_label_with_class_weights(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(24);
    let logits = common::logits(&mut rng, &[4, 5], 3.0, DType::F32, device)?;
    let labels = Tensor::new(&[1i64, -100, 7, -3], device)?;
    let class = Tensor::new(&[1f32, 2.0, 0.5, 1.0, 3.0], device)?;
    for ce in engines() {
        for smoothing in [0.0, 0.1] {
            let ce = ce.clone().class_weights(Some(class.clone())).label_smoothing(smoothing);
            let what = format!("{ce:?}");
            expect_err(ce.forward(&logits, &labels, None), &["label 7", "row 2"], &what);
        }
    }
    let hidden = common::logits(&mut rng, &[4, 3], 1.0, DType::F32, device)?;
    let weight = common::logits(&mut rng, &[5, 3], 1.0, DType::F32, device)?;
    for linear in [LinearCrossEntropy::default(), LinearCrossEntropy::default().force_autograd(true)] {
        let linear = linear.class_weights(Some(class.clone()));
        expect_err(linear.forward(&hidden, &weight, &labels, None), &["label 7", "row 2"], &format!("{linear:?}"));
    }
    Ok(())
}

/// `V = 0` with tokens present has no class to predict; with no tokens it is
/// an empty (zero) loss.
fn empty_vocabulary(device: &Device) -> anyhow::Result<()> {
    let cases = [
        (Tensor::zeros((3, 0), DType::F32, device)?, Tensor::new(&[0i64, 1, 2], device)?),
        (Tensor::zeros((3, 0), DType::F32, device)?, Tensor::full(-100i64, 3, device)?),
        (Tensor::zeros((2, 2, 0), DType::F32, device)?, Tensor::zeros((2, 2), DType::I64, device)?),
    ];
    for (logits, labels) in &cases {
        for ce in engines() {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let ce = ce.clone().reduction(reduction);
                let what = format!("{:?} {reduction:?} {ce:?}", logits.shape());
                expect_err(ce.forward(logits, labels, None), &["empty vocabulary"], &what);
            }
        }
        expect_err(compute_cross_entropy(logits, labels, -100), &["empty vocabulary"], "compute_cross_entropy");
    }
    for ce in engines() {
        let loss =
            ce.forward(&Tensor::zeros((0, 0), DType::F32, device)?, &Tensor::zeros(0, DType::I64, device)?, None)?;
        assert_eq!(loss.to_scalar::<f32>()?, 0.0, "N = 0, V = 0: {ce:?}");
    }
    Ok(())
}

/// NeMo's `compute_cross_entropy` validates its targets like the loss does.
fn compute_cross_entropy_bad_target(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(22);
    let logits = common::logits(&mut rng, &[2, 3, 7], 3.0, DType::F32, device)?;
    let targets = Tensor::new(&[[0i64, -100, 6], [7, 1, 2]], device)?;
    expect_err(compute_cross_entropy(&logits, &targets, -100), &["label 7", "row 3", "[0, 7)"], "target = V");
    let targets = Tensor::new(&[[0i64, -100, 6], [-3, 1, 2]], device)?;
    expect_err(compute_cross_entropy(&logits, &targets, -100), &["label -3", "row 3"], "negative target");
    // -100 is only ignored when it is the ignore_index.
    let targets = Tensor::new(&[[0i64, -100, 6], [1, 1, 2]], device)?;
    expect_err(compute_cross_entropy(&logits, &targets, -1), &["label -100", "row 1"], "ignore_index = -1");
    let bad_shape = Tensor::new(&[0i64, 1, 2], device)?;
    expect_err(compute_cross_entropy(&logits, &bad_shape, -100), &["labels", "[3]", "[2, 3, 7]"], "target shape");
    Ok(())
}

/// After any of the errors above, the caller's labels (and mask) hold what
/// they held before.
fn labels_unchanged_after_error(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(23);
    let logits = common::logits(&mut rng, &[2, 4, 5], 3.0, DType::F32, device)?;
    let labels = Tensor::new(&[[0i64, -100, 4, 2], [1, 3, 9, -100]], device)?;
    let mask = Tensor::new(&[[1u8, 1, 0, 1], [0, 1, 1, 1]], device)?;
    let labels_before: Vec<Vec<i64>> = labels.to_vec2()?;
    let mask_before: Vec<Vec<u8>> = mask.to_vec2()?;
    for ce in engines() {
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let ce = ce.clone().reduction(reduction);
            let what = format!("{reduction:?} {ce:?}");
            expect_err(ce.forward(&logits, &labels, None), &["label 9", "row 6"], &what);
            expect_err(ce.forward(&logits, &labels, Some(&mask)), &["label 9", "row 6"], &format!("{what} masked"));
            let bad_mask = Tensor::ones(8, DType::U8, device)?;
            expect_err(ce.forward(&logits, &labels, Some(&bad_mask)), &["mask"], &format!("{what} bad mask"));
            expect_err(ce.clone().chunk_len(0).forward(&logits, &labels, None), &["chunk_len"], &what);
            assert_eq!(labels.to_vec2::<i64>()?, labels_before, "{what}: labels were modified");
            assert_eq!(mask.to_vec2::<u8>()?, mask_before, "{what}: mask was modified");
        }
    }
    // Other label dtypes are converted internally; the caller's tensor keeps its dtype and values.
    let labels_u32 = Tensor::new(&[[0u32, 1, 4, 2], [1, 3, 9, 0]], device)?;
    let before: Vec<Vec<u32>> = labels_u32.to_vec2()?;
    for ce in engines() {
        expect_err(ce.forward(&logits, &labels_u32, Some(&mask)), &["label 9", "row 6"], "u32 labels");
    }
    assert_eq!(labels_u32.dtype(), DType::U32);
    assert_eq!(labels_u32.to_vec2::<u32>()?, before, "u32 labels were modified");
    Ok(())
}

/// Class weights and loss weights of the wrong shape or dtype, or holding a
/// negative or non-finite value, on both losses and every engine.
fn bad_weights(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(29);
    let logits = common::logits(&mut rng, &[2, 3, 5], 3.0, DType::F32, device)?;
    let labels = Tensor::new(&[[1i64, -100, 4], [0, 2, 3]], device)?;
    let (hidden, weight) = (
        common::logits(&mut rng, &[2, 3, 4], 1.0, DType::F32, device)?,
        common::logits(&mut rng, &[5, 4], 1.0, DType::F32, device)?,
    );
    let good_class = Tensor::ones(5, DType::F32, device)?;
    let good_tokens = Tensor::ones((2, 3), DType::F32, device)?;
    let bad_class = [
        (Tensor::ones(4, DType::F32, device)?, vec!["class_weights", "[4]", "[5]"]),
        (Tensor::ones((1, 5), DType::F32, device)?, vec!["class_weights", "[1, 5]"]),
        (Tensor::ones(5, DType::U32, device)?, vec!["class_weights", "float", "U32"]),
        (Tensor::new(&[1f32, -0.5, 1.0, 1.0, 1.0], device)?, vec!["class_weights", "-0.5", "index 1"]),
        (Tensor::new(&[1f32, 1.0, 1.0, f32::NAN, 1.0], device)?, vec!["class_weights", "NaN", "index 3"]),
        (Tensor::new(&[1f32, 1.0, 1.0, 1.0, f32::INFINITY], device)?, vec!["class_weights", "inf", "index 4"]),
    ];
    let bad_tokens = [
        (Tensor::ones(6, DType::F32, device)?, vec!["loss_weights", "[6]", "[2, 3]"]),
        (Tensor::ones((2, 3), DType::I64, device)?, vec!["loss_weights", "float", "I64"]),
        (Tensor::new(&[[1f32, 1.0, 1.0], [1.0, -2.0, 1.0]], device)?, vec!["loss_weights", "-2", "index 4"]),
        (Tensor::new(&[[1f32, f32::NAN, 1.0], [1.0, 1.0, 1.0]], device)?, vec!["loss_weights", "NaN", "index 1"]),
    ];
    for ce in engines() {
        let ce = ce.label_smoothing(0.1);
        let linear = LinearCrossEntropy::default().label_smoothing(0.1);
        let linear =
            if format!("{ce:?}").contains("force_autograd: true") { linear.force_autograd(true) } else { linear };
        for (class, words) in &bad_class {
            let what = format!("class {class:?} {ce:?}");
            let ce = ce.clone().class_weights(Some(class.clone()));
            expect_err(ce.forward(&logits, &labels, None), words, &what);
            expect_err(ce.forward_weighted(&logits, &labels, None, &good_tokens), words, &what);
            let linear = linear.clone().class_weights(Some(class.clone()));
            expect_err(linear.forward(&hidden, &weight, &labels, None), words, &format!("linear {what}"));
        }
        for (tokens, words) in &bad_tokens {
            let what = format!("tokens {tokens:?} {ce:?}");
            let ce = ce.clone().class_weights(Some(good_class.clone()));
            expect_err(ce.forward_weighted(&logits, &labels, None, tokens), words, &what);
            expect_err(
                linear.forward_weighted(&hidden, &weight, &labels, None, tokens),
                words,
                &format!("linear {what}"),
            );
        }
    }
    Ok(())
}

device_tests!(
    bad_weights,
    label_too_large,
    negative_label,
    logits_rank,
    integer_logits,
    float_labels,
    labels_shape_mismatch,
    mask_shape_mismatch,
    zero_chunk_len,
    inplace_grad_without_compile,
    num_label_tokens_without_mean,
    empty_vocabulary,
    bad_label_with_class_weights,
    compute_cross_entropy_bad_target,
    labels_unchanged_after_error,
);

/// On CUDA, tensors that candle's own kernels would walk past their 32-bit
/// element counts (`2^32 - 2^24` elements and more: over 100 times their work,
/// or a kernel that never ends) are refused with an error instead of a hung
/// GPU: logits whose gradient candle's backward adds, logits it must copy to
/// a unit-stride vocabulary, and hidden states whose gradient it adds. The
/// same logits detached (only our 64-bit kernels read them) give their loss.
#[cfg(feature = "cuda")]
#[test]
fn candle_cuda_element_limit() -> anyhow::Result<()> {
    use candle::Var;
    let Some(gpu) = common::cuda_or_skip("candle_cuda_element_limit") else { return Ok(()) };
    // 65280 x 65536 = 2^32 - 2^24 elements, 8.6 GB of f16 (a zero fill; nothing else runs over them).
    let (rows, vocab) = (65_280usize, 65_536usize);
    let limit_words = ["elements on CUDA", "32 bits", "2^32 - 2^24"];
    let labels = Tensor::zeros(rows, DType::U32, &gpu)?;
    let ce = ChunkedCrossEntropy::default();
    let logits = Var::from_tensor(&Tensor::zeros((rows, vocab), DType::F16, &gpu)?)?;
    expect_err(
        ce.forward(logits.as_tensor(), &labels, None),
        &[&limit_words[..], &["logits", "LinearCrossEntropy"]].concat(),
        "logits with a gradient",
    );
    // Uniform logits: every token's loss is ln V (to f32 sums over 65280 tokens).
    let loss = ce.forward(&logits.as_tensor().detach(), &labels, None)?.to_scalar::<f32>()? as f64;
    let want = (vocab as f64).ln();
    assert!((loss - want).abs() < 1e-3 * want, "detached logits: loss {loss}, want ln {vocab} = {want}");
    drop(logits);
    let transposed = Tensor::zeros((vocab, rows), DType::F16, &gpu)?.t()?;
    expect_err(
        ce.forward(&transposed, &labels, None),
        &[&limit_words[..], &["unit-stride", "copies"]].concat(),
        "transposed logits",
    );
    drop(transposed);
    let hidden = Var::from_tensor(&Tensor::zeros((rows, vocab), DType::F16, &gpu)?)?;
    let weight = Tensor::zeros((8, vocab), DType::F16, &gpu)?;
    expect_err(
        LinearCrossEntropy::default().forward(hidden.as_tensor(), &weight, &labels, None),
        &[&limit_words[..], &["hidden states"]].concat(),
        "hidden states with a gradient",
    );
    Ok(())
}
