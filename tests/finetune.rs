//! The `finetune_gpt2` example's model and training step, on a tiny GPT-2:
//! the loss decreases, every parameter gets a gradient, and gradient
//! accumulation over micro-batches equals one big batch; its step split puts
//! each phase's time where it belongs. The data and the samples:
//! `finetune_data.rs`.

include!("common/finetune_model.rs");
#[path = "../examples/finetune_gpt2/split.rs"]
#[allow(dead_code)]
mod split;

use candle::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use gpt2::{Config, Gpt2};
use rng::Rng;
use train::{Batch, Dataset, LossKind};

const TINY: Config = Config::gpt2(61, 16, 16, 2, 2);

fn tiny_model(seed: u64) -> anyhow::Result<Gpt2> {
    Ok(Gpt2::new(TINY, TINY.init(&mut Rng::new(seed), &Device::Cpu)?, &Device::Cpu)?)
}

/// Token data with a repeating pattern a model can learn, and a mask that
/// drops some positions (as prompt masking does).
fn data() -> Dataset {
    let tokens: Vec<u32> = (0..600u32).map(|i| (i * 7 + i / 5) % TINY.vocab as u32).collect();
    let mask: Vec<u8> = (0..600).map(|i| u8::from(i % 9 != 0)).collect();
    Dataset { sequences: vec![(tokens, mask)], records: false }
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
    assert_ne!(a.valid_tokens() * 3, b.valid_tokens() * 2, "the micro-batches should differ in valid tokens");
    let cat = |f: fn(&Batch) -> &Tensor| Tensor::cat(&[f(&a), f(&b)], 0);
    let big = Batch::new(cat(|x| &x.inputs)?, cat(|x| &x.labels)?, cat(|x| &x.mask)?)?;
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
    let missing = checkpoint::load(&dir.join("nope.safetensors"), Some(2), &Device::Cpu).err().expect("missing file");
    assert!(missing.to_string().contains("does not exist"), "{missing}");
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not safetensors")?;
    let malformed = checkpoint::load(&garbage, Some(2), &Device::Cpu).err().expect("malformed file");
    assert!(malformed.to_string().contains("not a readable safetensors file"), "{malformed}");
    // Another architecture: a tensor map without GPT-2's names.
    let other = dir.join("other.safetensors");
    let tensors = std::collections::HashMap::from([(
        "encoder.weight".to_string(),
        Tensor::zeros((4, 4), candle::DType::F32, &Device::Cpu)?,
    )]);
    candle::safetensors::save(&tensors, &other)?;
    let wrong = checkpoint::load(&other, Some(2), &Device::Cpu).err().expect("other architecture");
    assert!(wrong.to_string().contains("not a GPT-2 checkpoint"), "{wrong}");
    // A round trip through save and load (with config.json), and names without the `transformer.` prefix.
    let model = tiny_model(10)?;
    let saved = dir.join("tiny.safetensors");
    checkpoint::save(&model, &saved)?;
    let (reloaded, notice) = checkpoint::load(&saved, None, &Device::Cpu)?;
    assert_eq!((reloaded.config, notice), (TINY, None));
    let unprefixed: std::collections::HashMap<String, Tensor> = candle::safetensors::load(&saved, &Device::Cpu)?
        .into_iter()
        .map(|(name, t)| (name.strip_prefix("transformer.").unwrap_or(&name).to_string(), t))
        .collect();
    let (reloaded, _) = checkpoint::from_checkpoint(unprefixed, None, Some(TINY.heads), &Device::Cpu)?;
    assert_eq!(reloaded.config, TINY);
    // A sequence longer than the context, and empty data.
    let long = Tensor::zeros((1, TINY.context + 1), candle::DType::U32, &Device::Cpu)?;
    let too_long = model.logits(&long).expect_err("too long");
    assert!(too_long.to_string().contains("exceeds the model's context"), "{too_long}");
    let empty = Dataset::from_tokens(vec![]).batch(&mut Rng::new(1), 1, 4, &Device::Cpu).expect_err("empty data");
    assert!(empty.to_string().contains("no token to train on"), "{empty}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// `--save` and `--plot` paths, resolved and checked before training (a bad
/// one failed after the whole run): a directory saves `model.safetensors` in
/// it, missing directories are created, and a directory that cannot be
/// created, or a directory given as the file, is refused.
#[test]
fn output_paths_are_checked_before_training() -> anyhow::Result<()> {
    let dir = scratch("outputs")?;
    assert_eq!(checkpoint::save_path(&dir)?, dir.join("model.safetensors"));
    let new = dir.join("new").join("sub");
    let with_separator = std::path::PathBuf::from(format!("{}{}", new.display(), std::path::MAIN_SEPARATOR));
    assert_eq!(checkpoint::save_path(&with_separator)?, new.join("model.safetensors"));
    assert!(new.is_dir(), "the directory is created");
    assert_eq!(checkpoint::save_path(&dir.join("a/b.safetensors"))?, dir.join("a/b.safetensors"));
    assert!(dir.join("a").is_dir(), "the file's directory is created");
    std::fs::write(dir.join("file"), b"")?;
    let err = checkpoint::save_path(&dir.join("file/m.safetensors")).expect_err("under a file").to_string();
    assert!(err.contains("cannot create the directory"), "{err}");
    let err = checkpoint::writable_directory_of(&dir).expect_err("a directory as the plot").to_string();
    assert!(err.contains("is a directory, not a file"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// A directory of its own under the temp dir, for one test's checkpoints.
fn scratch(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("finetune_test_{}_{name}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Rewrites one key of the config.json beside `weights`.
fn edit_config(weights: &std::path::Path, key: &str, value: serde_json::Value) -> anyhow::Result<()> {
    let path = checkpoint::config_path(weights);
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    json[key] = value;
    std::fs::write(&path, json.to_string())?;
    Ok(())
}

fn load_error(weights: &std::path::Path, heads: Option<usize>) -> String {
    match checkpoint::load(weights, heads, &Device::Cpu) {
        Ok((model, _)) => panic!("loaded a model of {:?}", model.config),
        Err(e) => checkpoint::message(&e),
    }
}

#[test]
fn config_json_gives_the_heads_and_is_checked() -> anyhow::Result<()> {
    let dir = scratch("config")?;
    let weights = dir.join("model.safetensors");
    checkpoint::save(&tiny_model(11)?, &weights)?;
    assert_eq!(checkpoint::load(&weights, None, &Device::Cpu)?.0.config.heads, TINY.heads);
    assert_eq!(checkpoint::load(&weights, Some(TINY.heads), &Device::Cpu)?.0.config.heads, TINY.heads);
    let contradiction = load_error(&weights, Some(4));
    assert!(contradiction.contains("--heads 4") && contradiction.contains("n_head 2"), "{contradiction}");
    edit_config(&weights, "activation_function", "relu".into())?;
    let activation = load_error(&weights, None);
    assert!(activation.contains("activation_function \"relu\" is not supported"), "{activation}");
    edit_config(&weights, "activation_function", "gelu".into())?;
    let (exact_gelu, _) = checkpoint::load(&weights, None, &Device::Cpu)?;
    assert_eq!(exact_gelu.config.activation, gpt2::Activation::GeluErf);
    edit_config(&weights, "n_layer", 3.into())?;
    let layers = load_error(&weights, None);
    assert!(layers.contains("n_layer is 3, but the weights have 2"), "{layers}");
    // Without config.json: --heads, else width / 64 with a notice (width 16 has no such count).
    std::fs::remove_file(checkpoint::config_path(&weights))?;
    let (model, notice) = checkpoint::load(&weights, Some(2), &Device::Cpu)?;
    assert_eq!((model.config, notice), (TINY, None));
    let no_heads = load_error(&weights, None);
    assert!(no_heads.contains("pass --heads"), "{no_heads}");
    let wide = Config::gpt2(61, 16, 128, 1, 4);
    let wide_model = Gpt2::new(wide, wide.init(&mut Rng::new(12), &Device::Cpu)?, &Device::Cpu)?;
    checkpoint::save(&wide_model, &weights)?;
    std::fs::remove_file(checkpoint::config_path(&weights))?;
    let (model, notice) = checkpoint::load(&weights, None, &Device::Cpu)?;
    assert_eq!(model.config.heads, 2);
    let notice = notice.expect("a notice when the heads are assumed");
    assert!(notice.contains("no config.json") && notice.contains("2 heads"), "{notice}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

#[test]
fn layer_gaps_and_unknown_tensors_are_errors() -> anyhow::Result<()> {
    let config = Config::gpt2(61, 16, 16, 3, 2);
    let tensors = config.init(&mut Rng::new(13), &Device::Cpu)?;
    let gap: std::collections::HashMap<String, Tensor> =
        tensors.clone().into_iter().filter(|(name, _)| !name.starts_with("h.1.")).collect();
    let error = checkpoint::from_checkpoint(gap, None, Some(2), &Device::Cpu).err().expect("a gap");
    assert!(checkpoint::message(&error).contains("gap: no tensor of layer h.1, but h.2 exists"), "{error}");
    let mut extra = tensors;
    extra.insert("h.0.attn.rotary.weight".into(), Tensor::zeros(4, DType::F32, &Device::Cpu)?);
    let error = checkpoint::from_checkpoint(extra, None, Some(2), &Device::Cpu).err().expect("an unknown tensor");
    assert!(checkpoint::message(&error).contains("does not use: [\"h.0.attn.rotary.weight\"]"), "{error}");
    Ok(())
}

/// An `lm_head.weight` in the file is used (untied), or refused when
/// config.json ties it to a different embedding; never dropped.
#[test]
fn an_untied_lm_head_is_used_or_refused() -> anyhow::Result<()> {
    let dir = scratch("lm_head")?;
    let weights = dir.join("model.safetensors");
    let untied = Config { tied: false, ..TINY };
    let model = Gpt2::new(untied, untied.init(&mut Rng::new(14), &Device::Cpu)?, &Device::Cpu)?;
    checkpoint::save(&model, &weights)?;
    let (loaded, _) = checkpoint::load(&weights, None, &Device::Cpu)?;
    assert!(!loaded.config.tied);
    let head = candle::safetensors::load(&weights, &Device::Cpu)?.remove(gpt2::LM_HEAD).expect("saved");
    let tokens = Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu)?;
    let expected = loaded.hidden(&tokens)?.broadcast_matmul(&head.t()?)?;
    let diff = (loaded.logits(&tokens)? - expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert_eq!(diff, 0.0, "the logits use the file's lm_head");
    let batch = data().batch(&mut Rng::new(15), 2, 8, &Device::Cpu)?;
    for kind in [LossKind::Chunked, LossKind::Linear] {
        let (_, grads) = train::step_gradients(&loaded, std::slice::from_ref(&batch), kind)?;
        assert_eq!(train::missing_gradients(&loaded, &grads), Vec::<String>::new(), "{kind:?}");
    }
    // Without config.json a different lm_head is untied as well.
    let config_json = std::fs::read_to_string(checkpoint::config_path(&weights))?;
    std::fs::remove_file(checkpoint::config_path(&weights))?;
    assert!(!checkpoint::load(&weights, Some(2), &Device::Cpu)?.0.config.tied);
    std::fs::write(checkpoint::config_path(&weights), config_json)?;
    edit_config(&weights, "tie_word_embeddings", true.into())?;
    let refused = load_error(&weights, None);
    assert!(refused.contains("lm_head.weight differs from wte.weight"), "{refused}");
    // An lm_head.weight equal to wte, in a tied checkpoint: the tied model.
    let mut tensors = tiny_model(16)?.hf_tensors();
    tensors.insert(gpt2::LM_HEAD.into(), tensors["transformer.wte.weight"].clone());
    let hf = checkpoint::HfConfig::parse(&checkpoint::HfConfig::json(&TINY), "config.json")?;
    let (tied, _) = checkpoint::from_checkpoint(tensors.clone(), Some(&hf), None, &Device::Cpu)?;
    assert_eq!(tied.config, TINY);
    // Untied in config.json, with no lm_head.weight in the file.
    tensors.remove(gpt2::LM_HEAD);
    let untied_hf = checkpoint::HfConfig { tie_word_embeddings: false, ..hf };
    let error = checkpoint::from_checkpoint(tensors, Some(&untied_hf), None, &Device::Cpu).err().expect("no lm_head");
    assert!(checkpoint::message(&error).contains("the weights hold no lm_head.weight"), "{error}");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// The step split (`split.rs`) on the CPU's clock: each phase's time goes to
/// that phase, the time between steps to none, and every step counts. Phases
/// sleep a known time: lower bounds (a busy machine makes a sleep longer,
/// never shorter), and an upper bound on their sum that booking the 300 ms
/// slept between the steps would pass.
#[test]
fn step_split_attributes_each_phase() -> anyhow::Result<()> {
    use gpt2::Phase;
    use std::time::Duration;
    let device = Device::Cpu;
    let mut split = split::Split::default();
    let sleep = |ms: u64| std::thread::sleep(Duration::from_millis(ms));
    for _ in 0..3 {
        split.start(&device)?;
        sleep(40);
        split.lap(&device, Phase::Forward)?;
        sleep(5);
        split.lap(&device, Phase::Loss)?;
        sleep(20);
        split.lap(&device, Phase::Backward)?;
        sleep(10);
        split.optimizer(&device)?;
        sleep(150); // between steps: no phase's
    }
    let ([forward, loss, backward, optimizer], steps) = split.totals(&device)?;
    assert_eq!(steps, 3);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (forward, loss, backward, optimizer) = (ms(forward), ms(loss), ms(backward), ms(optimizer));
    assert!(
        forward >= 120.0 && loss >= 15.0 && backward >= 60.0 && optimizer >= 30.0,
        "{forward} {loss} {backward} {optimizer}"
    );
    // The time between steps went nowhere: the four phases are the steps' own
    // time, the 225 ms they slept and what the 12 sleeps overran (up to 150
    // ms here); booked, the two gaps between the steps would add 300 ms (the
    // sleep after the last step follows its last mark).
    assert!(forward + loss + backward + optimizer < 225.0 + 150.0, "{forward} {loss} {backward} {optimizer}");
    let line = split.summary(&device, true, 100)?;
    assert!(line.starts_with("step split (mean ms per step): forward "), "{line}");
    Ok(())
}

/// Clipping on the device: every gradient times `max_norm / norm` (rounded
/// once in f64, then to f32) when the global norm passes `max_norm`, and left
/// exactly as it was when it does not or `max_norm` is infinite; the norm
/// returned is the gradients' L2 norm (here against one summed in f64 on the
/// host). A `max_norm` of 0, below 0 or NaN is an error.
#[test]
fn clip_grad_norm_scales_by_max_norm_over_norm() -> anyhow::Result<()> {
    let model = tiny_model(11)?;
    let batch = data().batch(&mut Rng::new(12), 4, 12, &Device::Cpu)?;
    let (_, grads) = train::step_gradients(&model, &[batch], LossKind::Linear)?;
    let host = |g: &Tensor| -> anyhow::Result<Vec<f32>> { Ok(g.flatten_all()?.to_vec1::<f32>()?) };
    let mut squares = 0f64;
    for (_, var) in model.named_vars() {
        squares +=
            host(grads.get(var.as_tensor()).expect("a gradient"))?.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>();
    }
    let want_norm = squares.sqrt();
    for max_norm in [0.0, -1.0, f64::NAN] {
        let err = train::clip_grad_norm(&model, &mut candle::backprop::GradStore::default(), max_norm).unwrap_err();
        assert!(err.to_string().contains("must be positive"), "max_norm {max_norm}: {err}");
    }
    for (max_norm, clips) in [(want_norm / 3.0, true), (want_norm * 2.0, false), (f64::INFINITY, false)] {
        let mut clipped = candle::backprop::GradStore::default();
        for (_, var) in model.named_vars() {
            clipped.insert(var.as_tensor(), grads.get(var.as_tensor()).expect("a gradient").clone());
        }
        let norm = train::clip_grad_norm(&model, &mut clipped, max_norm)?.to_scalar::<f64>()?;
        // Summed in f64 (sum_squares.rs): to f64's rounding, not f32's.
        assert!((norm - want_norm).abs() <= 1e-12 * want_norm, "norm {norm} vs {want_norm}");
        let factor = if clips { (max_norm / norm) as f32 } else { 1.0 };
        // The factor itself, as the example hands it to AdamW: none for no limit.
        match train::clip_factor(&model, &grads, max_norm)?.factor {
            None => assert!(max_norm.is_infinite(), "max_norm {max_norm}: no factor"),
            Some(f) => assert_eq!(f.to_dtype(DType::F32)?.to_scalar::<f32>()?, factor, "max_norm {max_norm}: factor"),
        }
        for (name, var) in model.named_vars() {
            let (before, after) = (grads.get(var.as_tensor()).unwrap(), clipped.get(var.as_tensor()).unwrap());
            let want: Vec<f32> = host(before)?.iter().map(|&x| x * factor).collect();
            assert_eq!(host(after)?, want, "{name}, max_norm {max_norm}: clipped gradient");
        }
    }
    Ok(())
}
