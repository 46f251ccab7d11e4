//! The `finetune_gpt2` example's model against transformers' GPT2LMHeadModel
//! on `tests/fixtures/gpt2_tiny` (made by `scripts/make_gpt2_fixture.py`: 3
//! heads of 16, layer-norm epsilon 1e-3, random biases and gains, a 211-token
//! vocabulary). The reference was computed by transformers in float64 from the
//! same f32 weights; our model runs in f32. Tolerances, relative to the
//! largest magnitude of each expected tensor: logits 5e-6, loss 1e-6,
//! gradients 1e-5 (about ten times the errors measured: 4.7e-7, 8.3e-8 and
//! at most 9.5e-7; the epsilon of 1e-5 instead of config.json's 1e-3 alone
//! moves the logits by more).

include!("common/finetune_model.rs");
#[path = "common/checkout.rs"]
mod checkout;

use candle::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use train::{Batch, LossKind};

const LOGITS_TOL: f64 = 5e-6;
const LOSS_TOL: f64 = 1e-6;
const GRAD_TOL: f64 = 1e-5;

fn fixture() -> PathBuf {
    checkout::checkout().join("tests/fixtures/gpt2_tiny")
}

fn expected() -> candle::Result<HashMap<String, Tensor>> {
    candle::safetensors::load(fixture().join("expected.safetensors"), &Device::Cpu)
}

/// max |actual - expected| / max |expected|, in f64.
fn relative_error(actual: &Tensor, expected: &Tensor) -> candle::Result<f64> {
    assert_eq!(actual.dims(), expected.dims());
    let (a, e) = (actual.to_dtype(DType::F64)?, expected.to_dtype(DType::F64)?);
    let diff = (a - &e)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = e.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(diff / scale.max(f64::MIN_POSITIVE))
}

fn batch(expected: &HashMap<String, Tensor>) -> candle::Result<Batch> {
    Batch::new(
        expected["inputs"].to_dtype(DType::U32)?,
        expected["labels"].to_dtype(DType::U32)?,
        expected["mask"].clone(),
    )
}

#[test]
fn config_json_gives_heads_epsilon_and_tying() -> anyhow::Result<()> {
    let (model, notice) = checkpoint::load(&fixture().join("model.safetensors"), None, &Device::Cpu)?;
    assert_eq!(notice, None);
    let expected = gpt2::Config { layer_norm_epsilon: 1e-3, ..gpt2::Config::gpt2(211, 32, 48, 2, 3) };
    assert_eq!(model.config, expected);
    // The directory works as well as the file.
    assert_eq!(checkpoint::load(&fixture(), None, &Device::Cpu)?.0.config, expected);
    Ok(())
}

#[test]
fn logits_match_transformers() -> anyhow::Result<()> {
    let (model, _) = checkpoint::load(&fixture().join("model.safetensors"), None, &Device::Cpu)?;
    let expected = expected()?;
    let logits = model.logits(&batch(&expected)?.inputs)?;
    let error = relative_error(&logits, &expected["logits"])?;
    assert!(error <= LOGITS_TOL, "logits differ from transformers' by {error:e} (relative)");
    Ok(())
}

/// The masked mean loss and its gradients, through each loss of the example's
/// training step, against `F.cross_entropy(..., ignore_index=-100)` in float64.
#[test]
fn loss_and_gradients_match_transformers() -> anyhow::Result<()> {
    let (model, _) = checkpoint::load(&fixture().join("model.safetensors"), None, &Device::Cpu)?;
    let expected = expected()?;
    let batch = batch(&expected)?;
    let expected_loss = expected["loss"].to_scalar::<f64>()?;
    let vars: HashMap<&str, &candle::Var> = model.named_vars().into_iter().collect();
    for kind in [LossKind::Chunked, LossKind::Linear, LossKind::CandleNn] {
        let (loss, grads) = train::step_gradients(&model, std::slice::from_ref(&batch), kind)?;
        let error = (loss as f64 - expected_loss).abs() / expected_loss.abs();
        assert!(error <= LOSS_TOL, "{kind:?}: loss {loss} vs transformers' {expected_loss} ({error:e} relative)");
        let mut checked = 0;
        for (name, want) in expected.iter().filter_map(|(k, v)| Some((k.strip_prefix("grad.")?, v))) {
            let got = grads.get(vars[name].as_tensor()).unwrap_or_else(|| panic!("{kind:?}: no gradient for {name}"));
            let error = relative_error(got, want)?;
            assert!(error <= GRAD_TOL, "{kind:?}: gradient of {name} differs by {error:e} (relative)");
            checked += 1;
        }
        assert_eq!(checked, 7, "the fixture's gradients");
    }
    Ok(())
}
