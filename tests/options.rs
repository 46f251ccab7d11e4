//! Label smoothing, z-loss, logit soft-capping and the extra outputs (per-token
//! losses, log-sum-exp, token accuracy), held against PyTorch's definitions, on
//! the logits path and the linear path, for both engines; the fused kernels
//! against the primitive engine at a real vocabulary size; bad settings.

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{ChunkedCrossEntropy, CrossEntropyOutput, LinearCrossEntropy, Reduction};
use common::{assert_close, max_abs, Rng};

/// One PyTorch reference: the settings and what PyTorch computed for them.
struct Expected {
    smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    loss: f64,
    z_loss_value: f64,
    accuracy: f64,
    token_losses: [f64; 5],
    lse: [f64; 5],
    grad: [f64; 30],
}

/// Five rows of six logits: row 1 is ignored, row 3 ties its target (class 0)
/// with class 3 (argmax picks 0: correct), row 4 ties class 1 with its target
/// (class 3: argmax picks 1, wrong).
const LOGITS: [[f64; 6]; 5] = [
    [1.5, -0.5, 2.0, 0.25, -1.0, 0.75],
    [0.3, 0.1, -0.2, 0.9, 1.1, -2.0],
    [-1.0, 2.5, 0.5, 0.0, 1.0, 2.25],
    [3.0, 1.0, -1.0, 3.0, 0.5, 0.0],
    [0.0, 2.0, 0.5, 2.0, -3.0, 1.0],
];
const LABELS: [i64; 5] = [2, -100, 5, 0, 3];

// The literals below are printed by this PyTorch 2.15 snippet (float64):
//
//   x = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
//   y = torch.tensor(LABELS)
//   for eps, z, cap in [(0.1, 0.0, None), (0.0, 1e-2, None), (0.0, 0.0, 2.0), (0.2, 1e-2, 2.5)]:
//       xc = cap * torch.tanh(x / cap) if cap else x
//       valid = y != -100
//       ce = F.cross_entropy(xc, y, ignore_index=-100, label_smoothing=eps, reduction="none")
//       lse = torch.logsumexp(xc, -1) * valid
//       zl = z * lse ** 2
//       token = ce + zl
//       loss = token.sum() / valid.sum()
//       acc = ((xc.argmax(-1) == y) & valid).sum() / valid.sum()
//       loss.backward()   # x.grad (x re-created for each setting)
//       print(loss, (zl.sum() / valid.sum()), acc, token, lse, x.grad)
const PYTORCH: [Expected; 4] = [
    Expected {
        smoothing: 0.1,
        z_loss: 0.0,
        softcap: None,
        loss: 1.079528129248766,
        z_loss_value: 0.0,
        accuracy: 0.5,
        token_losses: [0.9378578475173646, 0.0, 1.1982295776464973, 1.0182615440874774, 1.1637635477437247],
        lse: [2.7878578475173645, 0.0, 3.310729577646497, 3.8265948774208107, 3.0054302144103913],
        grad: [
            0.06479860511234077,
            0.005166767923035277,
            -0.11546215614500187,
            0.015592214514785659,
            0.0014943475724099645,
            0.02841022102243026,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            -0.0008107285788897648,
            0.10696673985545509,
            0.0108736043820543,
            0.004955718854770883,
            0.020630548128454915,
            -0.1426158826418455,
            -0.11978251205942107,
            0.010636868878702351,
            -0.002163225990730887,
            0.10521748794057895,
            0.004812131513745423,
            0.0012792497171252707,
            0.008212694989890301,
            0.08730513108258382,
            0.016243450214188382,
            -0.1376948689174162,
            -0.0035503345415211513,
            0.029483927172274806,
        ],
    },
    Expected {
        smoothing: 0.0,
        z_loss: 1e-2,
        softcap: None,
        loss: 1.0261744313584198,
        z_loss_value: 0.10602130210965396,
        accuracy: 0.5,
        token_losses: [0.8655793612970061, 0.0, 1.1703388810095305, 0.9730231609798426, 1.0957563221473001],
        lse: [2.7878578475173645, 0.0, 3.310729577646497, 3.8265948774208107, 3.0054302144103913],
        grad: [
            0.0728105792617129,
            0.009853840367005753,
            -0.12995564923921632,
            0.02086058022064982,
            0.005976656298502976,
            0.03439328232893173,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.00357815015753597,
            0.11849205964286977,
            0.016036156453057383,
            0.0097264205527279,
            0.026439152244430827,
            -0.15771829116238942,
            -0.13224446847893256,
            0.015936478211081535,
            0.002156767792490826,
            0.11775553152106742,
            0.009665962642863292,
            0.005862702698533542,
            0.01312346780771156,
            0.09697003984369115,
            0.021636940519922432,
            -0.15302996015630888,
            0.000653378988965997,
            0.0356732840680696,
        ],
    },
    Expected {
        smoothing: 0.0,
        z_loss: 0.0,
        softcap: Some(2.0),
        loss: 1.094084988370663,
        z_loss_value: 0.0,
        accuracy: 0.5,
        token_losses: [1.0016087698594778, 0.0, 1.1571094952612997, 1.0674032367985784, 1.1502184515632956],
        lse: [2.5247970817710073, 0.0, 2.7757116356648615, 2.877699744088311, 2.6734067634748255],
        grad: [
            0.04253935068495003,
            0.011530167990585758,
            -0.0664306926281329,
            0.025274231552859232,
            0.006247619477880706,
            0.03572786732735877,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.004861203075907295,
            0.02382728743147355,
            0.023896380399883402,
            0.015576280590577017,
            0.03086906602026212,
            -0.05913899660180563,
            -0.029640388975113185,
            0.027876010336454145,
            0.004389862236280377,
            0.015536270755798965,
            0.021579394290509007,
            0.014066008944404981,
            0.0172541751933992,
            0.03323756809585518,
            0.0264705255860074,
            -0.07175601730765135,
            0.0005101131603025828,
            0.03419431680579903,
        ],
    },
    Expected {
        smoothing: 0.2,
        z_loss: 1e-2,
        softcap: Some(2.5),
        loss: 1.3613013849604316,
        z_loss_value: 0.08078321907680874,
        accuracy: 0.5,
        token_losses: [1.2531601180784298, 0.0, 1.4201607971458485, 1.3485969472259591, 1.4232876773914902],
        lse: [2.5982847126240927, 0.0, 2.9078086389355247, 3.0766394368599514, 2.7642617238165865],
        grad: [
            0.04738371039746818,
            0.003471949925139251,
            -0.05893321240163015,
            0.016603562216383434,
            -0.0006546191847187429,
            0.029467171261696103,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            -0.002350513027975309,
            0.03721551376007264,
            0.014725780629197988,
            0.00610923836112027,
            0.024818829059129358,
            -0.05928988004200053,
            -0.033542935470536064,
            0.019941699067930474,
            -0.0030801648016773224,
            0.027461063770945742,
            0.011255298063136616,
            0.0039045382504093234,
            0.008293374180458496,
            0.04423229315077461,
            0.01816389234611498,
            -0.06757874039567417,
            -0.001910867851448185,
            0.029650467728531527,
        ],
    },
];

/// Checks every output and the logits' gradient of one call against PyTorch.
fn check(out: &CrossEntropyOutput, grad: &Tensor, want: &Expected, rtol: f64, what: &str) -> anyhow::Result<()> {
    let device = grad.device();
    let scalar = |v: f64| Tensor::new(v, device);
    let atol = rtol * 1e-2;
    assert_close(&out.loss, &scalar(want.loss)?, rtol, atol, &format!("{what}: loss"))?;
    assert_close(&out.z_loss, &scalar(want.z_loss_value)?, rtol, atol, &format!("{what}: z_loss"))?;
    assert_close(&out.token_accuracy, &scalar(want.accuracy)?, 0.0, 0.0, &format!("{what}: accuracy"))?;
    let token_losses = Tensor::new(&want.token_losses, device)?;
    assert_close(&out.token_losses, &token_losses, rtol, atol, &format!("{what}: token losses"))?;
    assert_close(&out.lse, &Tensor::new(&want.lse, device)?, rtol, atol, &format!("{what}: lse"))?;
    let want_grad = Tensor::new(&want.grad, device)?.reshape((5, 6))?;
    assert_close(grad, &want_grad, rtol, atol, &format!("{what}: gradient"))?;
    Ok(())
}

/// The logits path, both engines, in place, and with the gradient formed in
/// forward (out of place and in place), in f64 (to 1e-12) and f32.
fn logits_path_matches_pytorch(device: &Device) -> anyhow::Result<()> {
    let labels = Tensor::new(&LABELS, device)?;
    for (dtype, rtol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        let logits = Tensor::new(&LOGITS, device)?.to_dtype(dtype)?;
        for want in &PYTORCH {
            let configs = [
                ChunkedCrossEntropy::new(2, true, -100),
                ChunkedCrossEntropy::new(2, false, -100),
                ChunkedCrossEntropy::new(3, true, -100).inplace_grad(true),
                ChunkedCrossEntropy::new(2, true, -100).grad_in_forward(true),
                ChunkedCrossEntropy::new(3, true, -100).grad_in_forward(true).inplace_grad(true),
            ];
            for ce in configs {
                let ce = ce.label_smoothing(want.smoothing).z_loss(want.z_loss).logit_softcap(want.softcap);
                let var = Var::from_tensor(&logits)?;
                let out = ce.forward_with_outputs(&(var.as_tensor() * 1.0)?, &labels, None, None, None)?;
                let grads = out.loss.backward()?;
                let grad = grads.get(var.as_tensor()).expect("logits without gradient");
                check(&out, grad, want, rtol, &format!("{dtype:?} {ce:?}"))?;
            }
        }
    }
    Ok(())
}

/// The linear path with `weight = I` and a zero bias sees the same logits; the
/// gradient of `hidden` is then the logits' gradient, and the bias's is its
/// column sums.
fn linear_path_matches_pytorch(device: &Device) -> anyhow::Result<()> {
    let labels = Tensor::new(&LABELS, device)?;
    for (dtype, rtol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        let hidden = Var::from_tensor(&Tensor::new(&LOGITS, device)?.to_dtype(dtype)?)?;
        let weight = Var::from_tensor(&Tensor::eye(6, dtype, device)?)?;
        let bias = Var::from_tensor(&Tensor::zeros(6, dtype, device)?)?;
        for want in &PYTORCH {
            for (compile, chunk_len) in [(true, Some(2)), (false, Some(3)), (true, None)] {
                let ce = LinearCrossEntropy::default()
                    .compile(compile)
                    .chunk_len(chunk_len)
                    .label_smoothing(want.smoothing)
                    .z_loss(want.z_loss)
                    .logit_softcap(want.softcap);
                let out = ce.forward_with_outputs(&hidden, &weight, Some(&bias), &labels, None, None, None)?;
                let grads = out.loss.backward()?;
                let grad = grads.get(&hidden).expect("hidden without gradient");
                let what = format!("{dtype:?} linear {ce:?}");
                check(&out, grad, want, rtol, &what)?;
                let want_bias = Tensor::new(&want.grad, device)?.reshape((5, 6))?.sum(0)?;
                let bias_grad = grads.get(&bias).expect("bias without gradient");
                assert_close(bias_grad, &want_bias, rtol, rtol * 1e-2, &format!("{what}: bias gradient"))?;
            }
        }
    }
    Ok(())
}

/// The fused kernels (SIMD `tanh`, logit sum, capped gradient) against the
/// primitive engine run in f64 on the same values, at V = 50257, in every
/// logits dtype, with every reduction's gradient and in place.
fn fused_matches_primitive_at_vocab_scale(device: &Device) -> anyhow::Result<()> {
    let mut rng = Rng::new(41);
    let vocab = 50257;
    let logits = common::logits(&mut rng, &[2, 3, vocab], 12.0, DType::F64, device)?;
    let settings = [(0.1, 0.0, None), (0.0, 1e-3, Some(30.0)), (0.2, 1e-4, Some(5.0))];
    // Gradient tolerance: the logits' dtype rounds each gradient element once.
    for (dtype, rtol, grad_rtol) in [(DType::F32, 2e-5, 2e-5), (DType::BF16, 2e-5, 8e-3), (DType::F16, 2e-5, 1e-3)] {
        let logits = logits.to_dtype(dtype)?;
        let exact = logits.to_dtype(DType::F64)?;
        for (smoothing, z_loss, softcap) in settings {
            for reduction in [Reduction::Mean, Reduction::None] {
                let with = |ce: ChunkedCrossEntropy| {
                    ce.reduction(reduction).label_smoothing(smoothing).z_loss(z_loss).logit_softcap(softcap)
                };
                let truth = with(ChunkedCrossEntropy::new(4, false, -100));
                let (want, want_grad) = outputs_and_grad(&truth, &exact)?;
                for ce in [ChunkedCrossEntropy::default(), ChunkedCrossEntropy::default().inplace_grad(true)] {
                    let ce = with(ce);
                    let what = format!("{dtype:?} {ce:?}");
                    let (got, grad) = outputs_and_grad(&ce, &logits)?;
                    assert_close(&got.loss, &want.loss, rtol, 1e-6, &format!("{what}: loss"))?;
                    assert_close(&got.lse, &want.lse, rtol, 1e-6, &format!("{what}: lse"))?;
                    assert_close(&got.z_loss, &want.z_loss, rtol, 1e-9, &format!("{what}: z_loss"))?;
                    assert_close(&got.token_accuracy, &want.token_accuracy, 0.0, 0.0, &format!("{what}: accuracy"))?;
                    let atol = 1e-3 * grad_rtol * max_abs(&want_grad)?;
                    assert_close(&grad, &want_grad, grad_rtol, atol, &format!("{what}: gradient"))?;
                }
            }
        }
    }
    Ok(())
}

fn outputs_and_grad(ce: &ChunkedCrossEntropy, logits: &Tensor) -> anyhow::Result<(CrossEntropyOutput, Tensor)> {
    let var = Var::from_tensor(logits)?;
    let labels = Tensor::new(&[[5i64, -100, 50256], [0, 17, 33333]], logits.device())?;
    let out = ce.forward_with_outputs(&(var.as_tensor() * 1.0)?, &labels, None, None, None)?;
    let grads = common::backward_of(&out.loss)?.backward()?;
    let grad = grads.get(var.as_tensor()).expect("logits without gradient").clone();
    Ok((out, grad))
}

/// Token accuracy counts the first argmax, over valid tokens only, masks
/// included; with nothing valid it is 0.
fn token_accuracy_counts_valid_tokens(device: &Device) -> anyhow::Result<()> {
    let logits = Tensor::new(&[[0.0f32, 4.0, 4.0], [2.0, 1.0, 0.0], [0.0, 0.0, 9.0], [1.0, 1.0, 1.0]], device)?;
    let accuracy = |labels: &[i64], mask: Option<&Tensor>| -> anyhow::Result<f32> {
        let labels = Tensor::new(labels, device)?;
        let out = ChunkedCrossEntropy::default().forward_with_outputs(&logits, &labels, mask, None, None)?;
        Ok(out.token_accuracy.to_scalar::<f32>()?)
    };
    // Row 0 ties classes 1 and 2: only 1 is its argmax. Row 3 ties all: 0 is.
    assert_eq!(accuracy(&[1, 0, 2, 0], None)?, 1.0);
    assert_eq!(accuracy(&[2, 0, 2, 1], None)?, 0.5);
    assert_eq!(accuracy(&[2, -100, 2, -100], None)?, 0.5);
    let mask = Tensor::new(&[0u8, 1, 1, 0], device)?;
    assert_eq!(accuracy(&[2, 0, 2, 1], Some(&mask))?, 1.0);
    assert_eq!(accuracy(&[-100, -100, -100, -100], None)?, 0.0);
    Ok(())
}

/// With every option off, the extra outputs still hold: `z_loss` is 0 and the
/// loss is the plain cross-entropy's.
fn defaults_are_plain_cross_entropy(device: &Device) -> anyhow::Result<()> {
    let logits = Tensor::new(&LOGITS, device)?;
    let labels = Tensor::new(&LABELS, device)?;
    let out = ChunkedCrossEntropy::default().forward_with_outputs(&logits, &labels, None, None, None)?;
    let plain = ChunkedCrossEntropy::default().forward(&logits, &labels, None)?;
    assert_close(&out.loss, &plain, 0.0, 0.0, "loss")?;
    assert_eq!(out.z_loss.to_scalar::<f64>()?, 0.0);
    let lse = PYTORCH[0].lse;
    assert_close(&out.lse, &Tensor::new(&lse, device)?, 1e-12, 0.0, "lse without options")?;
    Ok(())
}

/// One class: the cross-entropy and smoothing terms are 0 whatever the logit
/// (its probability is 1), and only z-loss remains: a token's loss is
/// `t z x²` and its gradient `2 t z x / d`, with `d = 1` (`Sum`) or
/// `Σ t c_y` over valid tokens (`Mean`). By hand, for both engines, f32.
fn one_class_leaves_only_z_loss(device: &Device) -> anyhow::Result<()> {
    let logits = Tensor::new(&[[2.0f32], [-1.5], [0.5]], device)?;
    let labels = Tensor::new(&[0i64, 0, -100], device)?;
    let loss_weights = Tensor::new(&[1.5f32, 0.5, 1.0], device)?;
    let (z, class_weight) = (0.01, 2.0);
    // Sum: 1.5 z 4 + 0.5 z 2.25; Mean divides by 1.5 c + 0.5 c = 4.
    let token_losses = [1.5 * z * 4.0, 0.5 * z * 2.25, 0.0];
    let unit_grad = [1.5 * 2.0 * z * 2.0, 0.5 * 2.0 * z * -1.5, 0.0];
    for compile in [true, false] {
        for (reduction, divisor) in [(Reduction::Sum, 1.0), (Reduction::Mean, 4.0)] {
            let ce = ChunkedCrossEntropy::new(2, compile, -100)
                .reduction(reduction)
                .label_smoothing(0.4)
                .z_loss(z)
                .class_weights(Some(Tensor::new(&[class_weight as f32], device)?));
            let var = Var::from_tensor(&logits)?;
            let out = ce.forward_with_outputs(var.as_tensor(), &labels, None, Some(&loss_weights), None)?;
            let grad = out.loss.backward()?.get(var.as_tensor()).expect("logits without gradient").clone();
            let what = format!("compile {compile}, {reduction:?}");
            let loss = token_losses.iter().sum::<f64>() / divisor;
            assert_close(&out.loss, &Tensor::new(loss as f32, device)?, 1e-6, 0.0, &format!("{what}: loss"))?;
            let want_tokens = Tensor::new(&token_losses.map(|l| l as f32), device)?;
            assert_close(&out.token_losses, &want_tokens, 1e-6, 1e-7, &format!("{what}: token losses"))?;
            let want_grad = Tensor::new(&unit_grad.map(|g| (g / divisor) as f32), device)?.reshape((3, 1))?;
            assert_close(&grad, &want_grad, 1e-6, 1e-7, &format!("{what}: gradient"))?;
        }
    }
    Ok(())
}

/// Settings outside their domain are errors naming the setting.
fn bad_settings_are_errors(device: &Device) -> anyhow::Result<()> {
    let logits = Tensor::new(&LOGITS, device)?;
    let labels = Tensor::new(&LABELS, device)?;
    let cases = [
        (ChunkedCrossEntropy::default().label_smoothing(-0.1), "label_smoothing"),
        (ChunkedCrossEntropy::default().label_smoothing(1.5), "label_smoothing"),
        (ChunkedCrossEntropy::default().label_smoothing(f64::NAN), "label_smoothing"),
        (ChunkedCrossEntropy::default().z_loss(-1e-4), "z_loss"),
        (ChunkedCrossEntropy::default().z_loss(f64::INFINITY), "z_loss"),
        (ChunkedCrossEntropy::default().logit_softcap(Some(0.0)), "logit_softcap"),
        (ChunkedCrossEntropy::default().logit_softcap(Some(-30.0)), "logit_softcap"),
        (ChunkedCrossEntropy::default().logit_softcap(Some(f64::NAN)), "logit_softcap"),
    ];
    for (ce, name) in cases {
        let err = ce.forward(&logits, &labels, None).expect_err(name).to_string();
        assert!(err.contains(name), "{name}: {err}");
    }
    let hidden = Tensor::new(&LOGITS, device)?;
    let weight = Tensor::eye(6, DType::F64, device)?;
    let linear = LinearCrossEntropy::default();
    for (bias, expected) in [
        (Tensor::zeros(5, DType::F64, device)?, "bias [5] must be [6]"),
        (Tensor::zeros(6, DType::F32, device)?, "bias (F32)"),
    ] {
        let err =
            linear.forward_with_outputs(&hidden, &weight, Some(&bias), &labels, None, None, None).expect_err(expected);
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
    let err = LinearCrossEntropy::default().z_loss(-1.0).forward(&hidden, &weight, &labels, None).expect_err("z");
    assert!(err.to_string().contains("z_loss"), "{err}");
    Ok(())
}

device_tests!(
    logits_path_matches_pytorch,
    linear_path_matches_pytorch,
    fused_matches_primitive_at_vocab_scale,
    token_accuracy_counts_valid_tokens,
    defaults_are_plain_cross_entropy,
    one_class_leaves_only_z_loss,
    bad_settings_are_errors,
);
