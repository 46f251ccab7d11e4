//! Class weights and per-token loss weights against PyTorch's own numbers:
//! every literal below was printed by `scripts/weighted_ce_literals.py`
//! (`F.cross_entropy(x, y, weight=c, label_smoothing=ε, reduction=..)`, and for
//! loss weights the per-token losses times `t`, summed and divided by `Σ t
//! c_y` over the valid tokens), in f64. Both losses, every engine, in f64
//! and f32. Finite differences and the property tests cover the rest.

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{ChunkedCrossEntropy, LinearCrossEntropy, Reduction};

const LOGITS: [[f64; 5]; 4] = [
    [0.5, -1.25, 2.0, 0.75, -0.5],
    [1.5, 0.25, -2.0, 3.0, 0.0],
    [-0.75, 1.0, 0.5, -1.5, 2.25],
    [2.5, -0.25, 1.25, 0.0, -3.0],
];
const LABELS: [i64; 4] = [1, 4, -100, 0];
const CLASS_WEIGHTS: [f64; 5] = [0.5, 2.0, 1.0, 0.0, 1.5];
const LOSS_WEIGHTS: [f64; 4] = [1.0, 0.5, 3.0, 2.0];

/// One PyTorch result: the settings, then the loss and the gradient of its
/// sum with respect to the logits (row-major `[4, 5]`).
struct Case {
    name: &'static str,
    reduction: Reduction,
    label_smoothing: f64,
    class_weights: bool,
    loss_weights: bool,
    loss: &'static [f64],
    grad: [f64; 20],
}

const CASES: [Case; 7] = [
    Case {
        name: "class weights, mean",
        reduction: Reduction::Mean,
        label_smoothing: 0.0,
        class_weights: true,
        loss_weights: false,
        loss: &[3.150479337485807],
        grad: [
            0.06842409042248725,
            -0.48810967598027455,
            0.30665549819428456,
            0.0878582712162139,
            0.025171816147288847,
            0.0622766198803749,
            0.017842550327966087,
            0.0018805909687736647,
            0.27910444665547446,
            -0.36110420783258906,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            -0.037989270008881706,
            0.005562409870366519,
            0.0249289915207622,
            0.007142275651585375,
            0.00035559296616761093,
        ],
    },
    Case {
        name: "class weights, sum",
        reduction: Reduction::Sum,
        label_smoothing: 0.0,
        class_weights: true,
        loss_weights: false,
        loss: &[12.601917349943228],
        grad: [
            0.273696361689949,
            -1.9524387039210982,
            1.2266219927771382,
            0.3514330848648556,
            0.10068726458915539,
            0.2491064795214996,
            0.07137020131186435,
            0.007522363875094659,
            1.1164177866218978,
            -1.4444168313303563,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            -0.15195708003552683,
            0.022249639481466077,
            0.0997159660830488,
            0.0285691026063415,
            0.0014223718646704437,
        ],
    },
    Case {
        name: "class weights, none",
        reduction: Reduction::None,
        label_smoothing: 0.0,
        class_weights: true,
        loss_weights: false,
        loss: &[7.477766273284163, 4.943009930148369, 0.0, 0.18114114651069513],
        grad: [
            0.273696361689949,
            -1.9524387039210982,
            1.2266219927771382,
            0.3514330848648556,
            0.10068726458915539,
            0.2491064795214996,
            0.07137020131186435,
            0.007522363875094659,
            1.1164177866218978,
            -1.4444168313303563,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            -0.15195708003552683,
            0.022249639481466077,
            0.0997159660830488,
            0.0285691026063415,
            0.0014223718646704437,
        ],
    },
    Case {
        name: "class weights + smoothing 0.1, mean",
        reduction: Reduction::Mean,
        label_smoothing: 0.1,
        class_weights: true,
        loss_weights: false,
        loss: &[3.0728440383146194],
        grad: [
            0.0625028859013629,
            -0.44870419218126084,
            0.28632272328457037,
            0.08346535765540321,
            0.016413225339924408,
            0.057700732551029074,
            0.00724779865036722,
            -0.003182095396852124,
            0.269800965100292,
            -0.3315674009048361,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            -0.019288197009769876,
            -0.0038813491425968285,
            0.02242189067283842,
            0.007856503216743914,
            -0.007108847737215628,
        ],
    },
    Case {
        name: "class weights + smoothing 0.1, none",
        reduction: Reduction::None,
        label_smoothing: 0.1,
        class_weights: true,
        loss_weights: false,
        loss: &[6.998877959619955, 4.793242932476757, 0.0, 0.49925526116176466],
        grad: [
            0.2500115436054516,
            -1.7948167687250434,
            1.1452908931382815,
            0.33386143062161283,
            0.06565290135969763,
            0.2308029302041163,
            0.02899119460146888,
            -0.012728381587408496,
            1.079203860401168,
            -1.3262696036193444,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            -0.0771527880390795,
            -0.015525396570387314,
            0.08968756269135368,
            0.031426012866975654,
            -0.02843539094886251,
        ],
    },
    Case {
        name: "loss weights + class weights + smoothing 0.1, mean",
        reduction: Reduction::Mean,
        label_smoothing: 0.1,
        class_weights: true,
        loss_weights: true,
        loss: &[2.7717359861818305],
        grad: [
            0.06666974496145374,
            -0.4786178049933449,
            0.305410904836875,
            0.08902971483243007,
            0.01750744036258603,
            0.030773724027215503,
            0.003865492613529183,
            -0.0016971175449877994,
            0.14389384805348904,
            -0.17683594714924591,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            -0.04114815362084239,
            -0.008280211504206568,
            0.047833366768721956,
            0.016760540195720347,
            -0.01516554183939334,
        ],
    },
    Case {
        name: "loss weights alone, mean",
        reduction: Reduction::Mean,
        label_smoothing: 0.0,
        class_weights: false,
        loss_weights: true,
        loss: &[1.7460336284002815],
        grad: [
            0.039099480241421285,
            -0.27891981484587114,
            0.17523171325387688,
            0.05020472640926508,
            0.014383894941307911,
            0.0237244266210952,
            0.006797162029701366,
            0.0007164156071518723,
            0.10632550348779979,
            -0.13756350774574821,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            -0.17366523432631636,
            0.0254281594073898,
            0.1139611040949129,
            0.032650402978675996,
            0.0016255678453376498,
        ],
    },
];

/// The inputs of every case in `dtype` on `device`.
struct Inputs {
    logits: Tensor,
    labels: Tensor,
    class_weights: Tensor,
    loss_weights: Tensor,
}

impl Inputs {
    fn new(dtype: DType, device: &Device) -> anyhow::Result<Self> {
        Ok(Self {
            logits: Tensor::new(&LOGITS, device)?.to_dtype(dtype)?,
            labels: Tensor::new(&LABELS, device)?,
            class_weights: Tensor::new(&CLASS_WEIGHTS, device)?.to_dtype(dtype)?,
            loss_weights: Tensor::new(&LOSS_WEIGHTS, device)?.to_dtype(dtype)?,
        })
    }
}

/// The logits loss's engines: fused (chunks of 2 rows, out of place and in
/// place), primitive, and candle's autograd; for a scalar loss also the
/// gradient formed in forward, out of place and in place.
fn engines(case: &Case, inputs: &Inputs) -> Vec<ChunkedCrossEntropy> {
    let base = ChunkedCrossEntropy::new(2, true, -100)
        .reduction(case.reduction)
        .label_smoothing(case.label_smoothing)
        .class_weights(case.class_weights.then(|| inputs.class_weights.clone()));
    let mut engines = vec![
        base.clone(),
        base.clone().inplace_grad(true),
        base.clone().compile(false),
        base.clone().force_autograd(true),
    ];
    if case.reduction != Reduction::None {
        engines.extend([base.clone().grad_in_forward(true), base.grad_in_forward(true).inplace_grad(true)]);
    }
    engines
}

/// The loss of `case` through `ce`, and the gradient of its sum.
fn logits_loss(ce: &ChunkedCrossEntropy, case: &Case, inputs: &Inputs) -> anyhow::Result<(Tensor, Tensor)> {
    let var = Var::from_tensor(&inputs.logits)?;
    // `inplace_grad` overwrites its input: give it a copy that is in the graph.
    let logits = (var.as_tensor() * 1.0)?;
    let loss = if case.loss_weights {
        ce.forward_weighted(&logits, &inputs.labels, None, &inputs.loss_weights)?
    } else {
        ce.forward(&logits, &inputs.labels, None)?
    };
    let grads = loss.sum_all()?.backward()?;
    Ok((loss, grads.get(var.as_tensor()).expect("logits without gradient").clone()))
}

fn expected(case: &Case, device: &Device) -> anyhow::Result<(Tensor, Tensor)> {
    let loss = Tensor::new(case.loss, device)?;
    let loss = if case.reduction == Reduction::None { loss } else { loss.squeeze(0)? };
    Ok((loss, Tensor::new(&case.grad, device)?.reshape((4, 5))?))
}

fn logits_loss_matches_pytorch(device: &Device) -> anyhow::Result<()> {
    for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        let inputs = Inputs::new(dtype, device)?;
        for case in &CASES {
            let (want_loss, want_grad) = expected(case, device)?;
            for ce in engines(case, &inputs) {
                let (loss, grad) = logits_loss(&ce, case, &inputs)?;
                let what = format!("{} {dtype:?} {ce:?}", case.name);
                common::assert_close(&loss, &want_loss, tolerance, tolerance, &format!("{what}: loss"))?;
                common::assert_close(&grad, &want_grad, tolerance, tolerance, &format!("{what}: grad"))?;
            }
        }
    }
    Ok(())
}

/// The linear loss with `hidden = I` and `weight = LOGITSᵀ`, whose logits are
/// `LOGITS`: the weight's gradient is the logits' gradient transposed, the
/// hidden states' is it times `LOGITSᵀ`.
fn linear_loss_matches_pytorch(device: &Device) -> anyhow::Result<()> {
    for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        let inputs = Inputs::new(dtype, device)?;
        let hidden = Var::from_tensor(&Tensor::eye(4, dtype, device)?)?;
        let weight = Var::from_tensor(&inputs.logits.t()?.contiguous()?)?;
        for case in &CASES {
            let (want_loss, want_grad) = expected(case, device)?;
            let want_hidden_grad = want_grad.matmul(&Tensor::new(&LOGITS, device)?.t()?)?;
            let base = LinearCrossEntropy::default()
                .chunk_len(Some(3))
                .reduction(case.reduction)
                .label_smoothing(case.label_smoothing)
                .class_weights(case.class_weights.then(|| inputs.class_weights.clone()));
            for ce in [base.clone(), base.clone().compile(false), base.force_autograd(true)] {
                let (h, w) = (hidden.as_tensor(), weight.as_tensor());
                let loss = if case.loss_weights {
                    ce.forward_weighted(h, w, &inputs.labels, None, &inputs.loss_weights)?
                } else {
                    ce.forward(h, w, &inputs.labels, None)?
                };
                let grads = loss.sum_all()?.backward()?;
                let what = format!("linear {} {dtype:?} {ce:?}", case.name);
                common::assert_close(&loss, &want_loss, tolerance, tolerance, &format!("{what}: loss"))?;
                let weight_grad = grads.get(w).expect("weight without gradient").t()?;
                common::assert_close(&weight_grad, &want_grad, tolerance, tolerance, &format!("{what}: weight"))?;
                let hidden_grad = grads.get(h).expect("hidden without gradient");
                common::assert_close(hidden_grad, &want_hidden_grad, tolerance, tolerance, &format!("{what}: hidden"))?;
            }
        }
    }
    Ok(())
}

/// Weights of 1 change nothing; loss weights scaled by a constant leave a
/// `Mean` unchanged; and zero weights act as a mask (the valid-token count
/// then comes from the weights).
fn weights_of_one_and_scaled_weights(device: &Device) -> anyhow::Result<()> {
    let inputs = Inputs::new(DType::F64, device)?;
    let ce = ChunkedCrossEntropy::default().label_smoothing(0.1).z_loss(1e-2);
    let plain = ce.forward(&inputs.logits, &inputs.labels, None)?;
    let ones = Tensor::ones(4, DType::F64, device)?;
    let with_ones = ce.clone().class_weights(Some(Tensor::ones(5, DType::F32, device)?));
    common::assert_close(
        &with_ones.forward_weighted(&inputs.logits, &inputs.labels, None, &ones)?,
        &plain,
        1e-14,
        0.0,
        "ones",
    )?;
    let weighted = ce.forward_weighted(&inputs.logits, &inputs.labels, None, &inputs.loss_weights)?;
    let scaled = ce.forward_weighted(&inputs.logits, &inputs.labels, None, &(&inputs.loss_weights * 8.0)?)?;
    common::assert_close(&scaled, &weighted, 1e-14, 0.0, "scaled loss weights")?;
    let mask = Tensor::new(&[1u8, 0, 1, 1], device)?;
    let zero_weight = Tensor::new(&[1f64, 0.0, 1.0, 1.0], device)?;
    let masked = ce.forward(&inputs.logits, &inputs.labels, Some(&mask))?;
    common::assert_close(
        &ce.forward_weighted(&inputs.logits, &inputs.labels, None, &zero_weight)?,
        &masked,
        1e-14,
        0.0,
        "zero weight",
    )?;
    Ok(())
}

device_tests!(logits_loss_matches_pytorch, linear_loss_matches_pytorch, weights_of_one_and_scaled_weights);
