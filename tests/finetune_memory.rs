//! The `finetune_gpt2` example's memory savings compute what they replace,
//! bit for bit: the checkpointed backward gives the whole graph's gradients,
//! the in-place AdamW candle-nn's updates, and the graph-free logits the
//! logits.

#[path = "../examples/finetune_gpt2/adamw.rs"]
#[allow(dead_code)]
mod adamw;
#[path = "../examples/finetune_gpt2/checkpoint.rs"]
#[allow(dead_code)]
mod checkpoint;
#[path = "../examples/finetune_gpt2/gpt2.rs"]
#[allow(dead_code)]
mod gpt2;
#[path = "../examples/finetune_gpt2/rng.rs"]
#[allow(dead_code)]
mod rng;
#[path = "../examples/finetune_gpt2/train.rs"]
#[allow(dead_code)]
mod train;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use gpt2::{Config, Gpt2};
use rng::Rng;
use train::{Dataset, LossKind};

/// Three layers, and a vocabulary small enough that batches repeat tokens
/// (the embedding's gradient then adds several rows into one).
const TINY: Config = Config::gpt2(23, 16, 16, 3, 2);

fn data() -> Dataset {
    let tokens: Vec<u32> = (0..400u32).map(|i| (i * 5 + i / 7) % TINY.vocab as u32).collect();
    let mask: Vec<u8> = (0..400).map(|i| u8::from(i % 6 != 0)).collect();
    Dataset { sequences: vec![(tokens, mask)] }
}

/// Asserts that two tensors hold the same values, bit for bit (as f64).
fn assert_same_bits(what: &str, got: &Tensor, expected: &Tensor) -> anyhow::Result<()> {
    assert_eq!(got.shape(), expected.shape(), "{what}: shape");
    let values = |t: &Tensor| -> anyhow::Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    let (got, expected) = (values(got)?, values(expected)?);
    let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != expected[i].to_bits()).collect();
    if let Some(&i) = differ.first() {
        panic!("{what}: {} of {} values differ, first at {i}: {} vs {}", differ.len(), got.len(), got[i], expected[i]);
    }
    Ok(())
}

#[test]
fn checkpointed_gradients_are_the_whole_graphs() -> anyhow::Result<()> {
    for tied in [true, false] {
        let config = Config { tied, ..TINY };
        let model = Gpt2::new(config, config.init(&mut Rng::new(1), &Device::Cpu)?, &Device::Cpu)?;
        let batch = data().batch(&mut Rng::new(2), 3, 10, &Device::Cpu)?;
        let n = batch.valid_tokens()?;
        for kind in [LossKind::Chunked, LossKind::Linear, LossKind::CandleNn] {
            let what = format!("tied {tied}, {kind:?}");
            let whole_loss = train::batch_loss(&model, &batch, kind, n)?;
            let whole = whole_loss.backward()?;
            for keep_activations in [false, true] {
                let what = format!("{what}, keep_activations {keep_activations}");
                let (loss, grads) =
                    train::step_gradients_with(&model, std::slice::from_ref(&batch), kind, keep_activations)?;
                assert_eq!(loss.to_bits(), whole_loss.to_scalar::<f32>()?.to_bits(), "{what}: loss");
                for (name, var) in model.named_vars() {
                    let expected = whole.get(var.as_tensor()).expect("the whole graph's gradient");
                    let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
                    assert!(!got.track_op(), "{what}: {name}'s gradient holds a graph");
                    assert_same_bits(&format!("{what}: {name}"), got, expected)?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn logits_without_a_graph_are_the_logits() -> anyhow::Result<()> {
    let model = Gpt2::new(TINY, TINY.init(&mut Rng::new(3), &Device::Cpu)?, &Device::Cpu)?;
    let batch = data().batch(&mut Rng::new(4), 2, 12, &Device::Cpu)?;
    let logits = model.logits_no_grad(&batch.inputs)?;
    assert_same_bits("logits", &logits, &model.logits(&batch.inputs)?)?;
    let too_long = Tensor::zeros((1, TINY.context + 1), DType::U32, &Device::Cpu)?;
    assert!(model.logits_no_grad(&too_long).is_err());
    Ok(())
}

/// Parameters of several shapes (one large enough to matter, one scalar-like),
/// gradients from a seeded stream.
fn parameters(dtype: DType, rng: &mut Rng) -> anyhow::Result<Vec<Var>> {
    [vec![37, 19], vec![5], vec![1]]
        .into_iter()
        .map(|shape| {
            let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.normal() as f32).collect();
            Ok(Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?)?)
        })
        .collect()
}

#[test]
fn adamw_is_candle_nns_bit_for_bit() -> anyhow::Result<()> {
    // f32: the in-place CPU update; f64: the tensor operations it falls back to.
    for dtype in [DType::F32, DType::F64] {
        let (ours, theirs) = (parameters(dtype, &mut Rng::new(5))?, parameters(dtype, &mut Rng::new(5))?);
        let params = ParamsAdamW { lr: 3e-2, weight_decay: 0.1, ..Default::default() };
        let mut our_opt = adamw::AdamW::new(ours.clone(), params.clone())?;
        let mut their_opt = candle_nn::AdamW::new(theirs.clone(), params)?;
        let mut rng = Rng::new(6);
        for step in 0..5 {
            // Gradients of sum(w * theta²), with zeros among them.
            let weights: Vec<Vec<f32>> = ours
                .iter()
                .map(|var| (0..var.elem_count()).map(|i| if i % 4 == 0 { 0.0 } else { rng.normal() as f32 }).collect())
                .collect();
            let grads = |vars: &[Var]| -> anyhow::Result<candle::backprop::GradStore> {
                let mut total = Tensor::zeros((), dtype, &Device::Cpu)?;
                for (var, w) in vars.iter().zip(&weights) {
                    let w = Tensor::from_vec(w.clone(), var.shape(), &Device::Cpu)?.to_dtype(dtype)?;
                    total = (total + (var.as_tensor().sqr()? * w)?.sum_all()?)?;
                }
                Ok(total.backward()?)
            };
            let (g_ours, g_theirs) = (grads(&ours)?, grads(&theirs)?);
            if step == 3 {
                our_opt.set_learning_rate(1e-2);
                their_opt.set_learning_rate(1e-2);
            }
            our_opt.step(&g_ours)?;
            their_opt.step(&g_theirs)?;
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_same_bits(&format!("{dtype:?} step {step}, parameter {i}"), a.as_tensor(), b.as_tensor())?;
            }
        }
    }
    Ok(())
}
