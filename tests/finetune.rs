//! The `finetune_gpt2` example's model and training step, on a tiny GPT-2:
//! the loss decreases, every parameter gets a gradient, and gradient
//! accumulation over micro-batches equals one big batch.

#[path = "../examples/finetune_gpt2/gpt2.rs"]
#[allow(dead_code)]
mod gpt2;
#[path = "../examples/finetune_gpt2/rng.rs"]
#[allow(dead_code)]
mod rng;
#[path = "../examples/finetune_gpt2/train.rs"]
#[allow(dead_code)]
mod train;

use candle::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use gpt2::{Config, Gpt2};
use rng::Rng;
use train::{Batch, Dataset, LossKind};

const TINY: Config = Config { vocab: 61, context: 16, width: 16, layers: 2, heads: 2 };

fn tiny_model(seed: u64) -> anyhow::Result<Gpt2> {
    Ok(Gpt2::from_tensors(TINY.init(&mut Rng::new(seed), &Device::Cpu)?, TINY.heads, &Device::Cpu)?)
}

/// Token data with a repeating pattern a model can learn, and a mask that
/// drops some positions (as prompt masking does).
fn data() -> Dataset {
    let tokens: Vec<u32> = (0..600u32).map(|i| (i * 7 + i / 5) % TINY.vocab as u32).collect();
    let mask: Vec<u8> = (0..600).map(|i| u8::from(i % 9 != 0)).collect();
    Dataset { sequences: vec![(tokens, mask)] }
}

#[test]
fn every_parameter_gets_a_gradient() -> anyhow::Result<()> {
    let model = tiny_model(1)?;
    let batch = data().batch(&mut Rng::new(2), 3, 8, &Device::Cpu)?;
    for kind in [LossKind::Chunked, LossKind::Linear, LossKind::CandleNn] {
        let (_, grads) = train::step_gradients(&model, std::slice::from_ref(&batch), kind)?;
        assert_eq!(train::missing_gradients(&model, &grads), Vec::<String>::new(), "{kind:?}");
        for (name, var) in model.named_vars() {
            let norm = grads.get(var.as_tensor()).unwrap().sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm > 0.0, "{kind:?}: {name} has an all-zero gradient");
        }
    }
    Ok(())
}

#[test]
fn all_losses_agree_at_step_zero() -> anyhow::Result<()> {
    let model = tiny_model(3)?;
    let batches: Vec<Batch> =
        (0..2).map(|_| data().batch(&mut Rng::new(4), 4, 8, &Device::Cpu)).collect::<candle::Result<_>>()?;
    let (chunked, _) = train::step_gradients(&model, &batches, LossKind::Chunked)?;
    for kind in [LossKind::CandleNn, LossKind::Linear] {
        let (other, _) = train::step_gradients(&model, &batches, kind)?;
        assert!((chunked - other).abs() <= 1e-5 * chunked.abs(), "{kind:?}: {chunked} vs {other}");
    }
    Ok(())
}

/// Two micro-batches with `num_label_tokens` normalisation give the loss and
/// gradients of the single batch that holds both.
#[test]
fn accumulation_equals_one_big_batch() -> anyhow::Result<()> {
    let model = tiny_model(5)?;
    let mut rng = Rng::new(6);
    let (a, b) = (data().batch(&mut rng, 2, 12, &Device::Cpu)?, data().batch(&mut rng, 3, 12, &Device::Cpu)?);
    assert_ne!(a.valid_tokens()? * 3, b.valid_tokens()? * 2, "the micro-batches should differ in valid tokens");
    let cat = |f: fn(&Batch) -> &Tensor| Tensor::cat(&[f(&a), f(&b)], 0);
    let big = Batch { inputs: cat(|x| &x.inputs)?, labels: cat(|x| &x.labels)?, mask: cat(|x| &x.mask)? };
    let (loss_accum, grads_accum) = train::step_gradients(&model, &[a, b], LossKind::Chunked)?;
    let (loss_big, grads_big) = train::step_gradients(&model, &[big], LossKind::Chunked)?;
    assert!((loss_accum - loss_big).abs() <= 1e-5 * loss_big, "loss {loss_accum} vs {loss_big}");
    for (name, var) in model.named_vars() {
        let (g1, g2) = (grads_accum.get(var.as_tensor()).unwrap(), grads_big.get(var.as_tensor()).unwrap());
        let diff = (g1 - g2)?.abs()?.max_keepdim(0)?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = g2.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff <= 1e-5 * scale.max(1e-6), "{name}: accumulated gradient differs by {diff} (scale {scale})");
    }
    Ok(())
}

#[test]
fn loss_decreases() -> anyhow::Result<()> {
    let model = tiny_model(7)?;
    let data = data();
    let mut rng = Rng::new(8);
    let vars = model.named_vars().into_iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(vars, ParamsAdamW { lr: 1e-2, ..Default::default() })?;
    let eval = data.batch(&mut Rng::new(9), 8, 12, &Device::Cpu)?;
    let before = train::step_gradients(&model, std::slice::from_ref(&eval), LossKind::Chunked)?.0;
    for step in 0..30 {
        let batch = data.batch(&mut rng, 4, 12, &Device::Cpu)?;
        let (_, mut grads) = train::step_gradients(&model, &[batch], LossKind::Chunked)?;
        train::clip_grad_norm(&model, &mut grads, 1.0)?;
        opt.set_learning_rate(train::learning_rate(step, 30, 3, 1e-2));
        opt.step(&grads)?;
    }
    let after = train::step_gradients(&model, std::slice::from_ref(&eval), LossKind::Chunked)?.0;
    assert!(after < before - 0.5, "loss went from {before} to {after}");
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("finetune_test_{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Missing and malformed weights files.
    let missing = Gpt2::load(&dir.join("nope.safetensors"), 2, &Device::Cpu).err().expect("missing file");
    assert!(missing.to_string().contains("does not exist"), "{missing}");
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not safetensors")?;
    let malformed = Gpt2::load(&garbage, 2, &Device::Cpu).err().expect("malformed file");
    assert!(malformed.to_string().contains("not a readable safetensors file"), "{malformed}");
    // Another architecture: a tensor map without GPT-2's names.
    let other = dir.join("other.safetensors");
    let tensors = std::collections::HashMap::from([(
        "encoder.weight".to_string(),
        Tensor::zeros((4, 4), candle::DType::F32, &Device::Cpu)?,
    )]);
    candle::safetensors::save(&tensors, &other)?;
    let wrong = Gpt2::load(&other, 2, &Device::Cpu).err().expect("other architecture");
    assert!(wrong.to_string().contains("not a GPT-2 checkpoint"), "{wrong}");
    // A round trip through save and load, with the `transformer.` prefix accepted.
    let model = tiny_model(10)?;
    let saved = dir.join("tiny.safetensors");
    model.save(&saved)?;
    let prefixed: std::collections::HashMap<String, Tensor> = candle::safetensors::load(&saved, &Device::Cpu)?
        .into_iter()
        .map(|(name, t)| (format!("transformer.{name}"), t))
        .collect();
    let reloaded = Gpt2::from_tensors(prefixed, TINY.heads, &Device::Cpu)?;
    assert_eq!(reloaded.config, TINY);
    // A sequence longer than the context, and empty data.
    let long = Tensor::zeros((1, TINY.context + 1), candle::DType::U32, &Device::Cpu)?;
    let too_long = model.logits(&long).expect_err("too long");
    assert!(too_long.to_string().contains("exceeds the model's context"), "{too_long}");
    let empty = Dataset::from_tokens(vec![]).batch(&mut Rng::new(1), 1, 4, &Device::Cpu).expect_err("empty data");
    assert!(empty.to_string().contains("no sequence"), "{empty}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
