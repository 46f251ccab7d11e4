//! The `finetune_gpt2` example's causal softmax op (`softmax.rs`) against
//! candle's primitives (scale, add the causal mask, `candle_nn::ops::softmax`):
//! the probabilities and the scores' gradient under a random upstream
//! gradient, for a `T` that is no multiple of a warp and for `T = 1`; on the
//! CPU, and on CUDA (its kernels) when a GPU is there (skipping without one,
//! failing with `CHUNKED_CE_REQUIRE_CUDA` set).

#[path = "../examples/finetune_gpt2/softmax.rs"]
mod softmax;

use candle::{DType, Device, Tensor, Var, D};

/// The primitives' causal softmax of `[.., T, T]` scores.
fn primitive(scores: &Tensor, scale: f64) -> candle::Result<Tensor> {
    let t = scores.dim(D::Minus1)?;
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask, (t, t), scores.device())?;
    candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&mask)?, D::Minus1)
}

fn max_diff(a: &Tensor, b: &Tensor) -> candle::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn matches_the_primitives(device: &Device) -> candle::Result<()> {
    for dims in [[2usize, 3, 37, 37], [1, 1, 1, 1], [1, 2, 70, 70]] {
        let scores = Var::from_tensor(&(Tensor::randn(0f32, 3.0, &dims, device)?))?;
        let upstream = Tensor::randn(0f32, 1.0, &dims, device)?;
        let scale = 0.125;
        let ours = softmax::causal_softmax(scores.as_tensor(), scale)?;
        let theirs = primitive(scores.as_tensor(), scale)?;
        let what = format!("{dims:?} on {:?}", device.location());
        assert!(max_diff(&ours, &theirs)? <= 1e-6, "{what}: probabilities differ by {}", max_diff(&ours, &theirs)?);
        let grad = |probs: &Tensor| -> candle::Result<Tensor> {
            let grads = (probs * &upstream)?.sum_all()?.backward()?;
            Ok(grads.get(scores.as_tensor()).expect("a gradient for the scores").clone())
        };
        let (ours, theirs) = (grad(&ours)?, grad(&theirs)?);
        let scale_of = theirs.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let diff = max_diff(&ours, &theirs)?;
        assert!(diff <= 1e-5 * scale_of.max(1.0), "{what}: gradients differ by {diff} (largest {scale_of})");
        // Above the diagonal: nothing, exactly.
        let t = dims[3];
        let above: Vec<f32> = ours.flatten_all()?.to_vec1::<f32>()?;
        assert!(above.iter().enumerate().all(|(k, &x)| (k % t) <= (k / t) % t || x == 0.0), "{what}: masked gradient");
    }
    let f64_scores = Tensor::zeros((1, 1, 4, 4), DType::F64, device)?;
    let err = softmax::causal_softmax(&f64_scores, 1.0).expect_err("f64 scores").to_string();
    assert!(err.contains("f32"), "{err}");
    let err =
        softmax::causal_softmax(&Tensor::zeros((1, 4, 5), DType::F32, device)?, 1.0).expect_err("[4, 5]").to_string();
    assert!(err.contains("[.., T, T]"), "{err}");
    Ok(())
}

#[test]
fn matches_the_primitives_on_the_cpu() -> candle::Result<()> {
    matches_the_primitives(&Device::Cpu)
}

#[cfg(feature = "cuda")]
#[test]
fn matches_the_primitives_on_cuda() -> candle::Result<()> {
    match Device::new_cuda(0) {
        Ok(device) => matches_the_primitives(&device),
        Err(e) => {
            assert!(std::env::var_os("CHUNKED_CE_REQUIRE_CUDA").is_none(), "no CUDA device: {e}");
            eprintln!("SKIP matches_the_primitives_on_cuda: no CUDA device");
            Ok(())
        }
    }
}
