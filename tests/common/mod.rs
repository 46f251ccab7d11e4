//! Helpers shared by the integration tests: deterministic inputs, the loss and
//! gradient through our op and through the slow autograd reference, and
//! comparisons with stated tolerances.
#![allow(dead_code)]

use candle::{DType, Device, Result, Tensor, Var};
use candle_chunked_ce::{reference::cross_entropy_slow, ChunkedCrossEntropy, Reduction};

/// Runs each listed `fn name(device: &Device) -> anyhow::Result<()>` as a test on
/// the CPU, and on CUDA when the feature is on (skipping with a `SKIP` line, see
/// [`skip`], when no GPU is present).
#[macro_export]
macro_rules! device_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn cpu() -> anyhow::Result<()> {
                super::$name(&candle::Device::Cpu)
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() -> anyhow::Result<()> {
                match $crate::common::cuda_or_skip(stringify!($name)) {
                    Some(device) => super::$name(&device),
                    None => Ok(()),
                }
            }
        }
    )*};
}

/// The first CUDA device, or `None` after reporting why `what` is skipped.
/// With `CHUNKED_CE_REQUIRE_CUDA=1` (set by `scripts/gpu-check.sh`) a missing
/// device fails the test instead, so that a broken GPU setup cannot pass as skips.
#[cfg(feature = "cuda")]
pub fn cuda_or_skip(what: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            let reason = e.to_string();
            let reason = reason.lines().next().unwrap_or_default();
            skip(what, &format!("no CUDA device ({reason})"), "CHUNKED_CE_REQUIRE_CUDA");
            None
        }
    }
}

/// Reports that test `what` is skipped, and why, as one line `SKIP what:
/// reason` on the process's stderr; fails it instead when the environment
/// variable `require` is set. The line is written to stderr itself, not with
/// `eprintln!`: libtest captures the macro's output and shows it only for a
/// failing test, so a skip would pass as a plain `ok`. Written directly, it
/// stands in `cargo test`'s output beside the test's `ok` (checked by
/// `a_skip_shows_in_the_test_output` in `tests/kernels_on_cpu.rs`).
pub fn skip(what: &str, reason: &str, require: &str) {
    assert!(std::env::var_os(require).is_none(), "{what}: {reason} ({require} is set: it must run)");
    use std::io::Write;
    // Nothing to do if stderr is closed: the skip still returns.
    let _ = writeln!(std::io::stderr(), "SKIP {what}: {reason}");
}

#[path = "../../examples/finetune_gpt2/rng.rs"]
mod rng;
/// The seeded generator behind every test input (shared with the example).
pub use rng::Rng;

/// `[dims..]` logits, uniform in `[-scale, scale)`, as f64 then cast to `dtype`.
pub fn logits(rng: &mut Rng, dims: &[usize], scale: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let values: Vec<f64> = (0..n).map(|_| (rng.unit() * 2.0 - 1.0) * scale).collect();
    Tensor::from_vec(values, dims, device)?.to_dtype(dtype)
}

/// Labels in `[0, vocab)`, about `ignored_fraction` of them set to `ignore_index`.
pub fn labels(
    rng: &mut Rng,
    dims: &[usize],
    vocab: usize,
    ignored_fraction: f64,
    ignore_index: i64,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let values: Vec<i64> =
        (0..n).map(|_| if rng.unit() < ignored_fraction { ignore_index } else { rng.below(vocab) as i64 }).collect();
    Tensor::from_vec(values, dims, device)
}

/// `values` as labels of `dtype` (u8, u32, i16, i32 or i64) on `device`, made
/// from a host vector of that dtype: candle's CUDA kernels cannot cast to i16
/// or i32, and a test must not depend on a cast the loss itself avoids.
pub fn labels_as(values: &[i64], dims: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    fn narrowed<T: TryFrom<i64> + candle::WithDType>(
        values: &[i64],
        dims: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        let narrowed: Vec<T> = values
            .iter()
            .map(|&v| T::try_from(v).unwrap_or_else(|_| panic!("label {v} does not fit {:?}", T::DTYPE)))
            .collect();
        Tensor::from_vec(narrowed, dims, device)
    }
    match dtype {
        DType::U8 => narrowed::<u8>(values, dims, device),
        DType::U32 => narrowed::<u32>(values, dims, device),
        DType::I16 => narrowed::<i16>(values, dims, device),
        DType::I32 => narrowed::<i32>(values, dims, device),
        DType::I64 => narrowed::<i64>(values, dims, device),
        other => candle::bail!("{other:?} is not a label dtype"),
    }
}

/// The label dtypes the losses take.
pub const LABEL_DTYPES: [DType; 5] = [DType::U8, DType::U32, DType::I16, DType::I32, DType::I64];

/// A 0/1 u8 mask keeping about `keep` of the tokens.
pub fn mask(rng: &mut Rng, dims: &[usize], keep: f64, device: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let values: Vec<u8> = (0..n).map(|_| u8::from(rng.unit() < keep)).collect();
    Tensor::from_vec(values, dims, device)
}

/// The loss and the logits' gradient through `ce`. For `Reduction::None`, the
/// backward starts from `sum(per_token * weights)` so that a non-uniform
/// upstream gradient is exercised.
pub fn loss_and_grad(
    ce: &ChunkedCrossEntropy,
    logits: &Tensor,
    labels: &Tensor,
    mask: Option<&Tensor>,
    num_label_tokens: Option<usize>,
) -> Result<(Tensor, Tensor)> {
    let var = Var::from_tensor(logits)?;
    let loss = ce.forward_with_num_label_tokens(var.as_tensor(), labels, mask, num_label_tokens)?;
    let grads = backward_of(&loss)?.backward()?;
    let grad = grads.get(var.as_tensor()).expect("logits received no gradient").clone();
    Ok((loss, grad))
}

/// The scalar that backward starts from: the loss itself, or a weighted sum of
/// per-token losses (weights 0.5, 1.5, 2.5, ... in token order).
pub fn backward_of(loss: &Tensor) -> Result<Tensor> {
    if loss.rank() == 0 {
        return Ok(loss.clone());
    }
    let weights = upstream_weights(loss.elem_count(), loss.dtype(), loss.device())?.reshape(loss.shape())?;
    (loss * weights)?.sum_all()
}

pub fn upstream_weights(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::arange(0u32, n as u32, device)?.to_dtype(dtype)?.affine(1.0, 0.5)
}

/// The same loss and gradient from [`cross_entropy_slow`] (candle autograd,
/// unchunked), computed in f64 on `logits` widened to f64: the truth that f32
/// results are held against.
pub fn slow_loss_and_grad(
    logits: &Tensor,
    labels: &Tensor,
    mask: Option<&Tensor>,
    ignore_index: i64,
    reduction: Reduction,
    num_label_tokens: Option<usize>,
) -> Result<(Tensor, Tensor)> {
    let var = Var::from_tensor(&logits.to_dtype(DType::F64)?)?;
    let vocab = logits.dim(candle::D::Minus1)?;
    let rows = var.as_tensor().reshape(((), vocab))?;
    let mut flat_labels = labels.to_dtype(DType::I64)?.flatten_all()?;
    if let Some(mask) = mask {
        let ignored = Tensor::full(ignore_index, flat_labels.shape(), flat_labels.device())?;
        flat_labels = mask.flatten_all()?.ne(0f64)?.where_cond(&flat_labels, &ignored)?;
    }
    let per_token = cross_entropy_slow(&rows, &flat_labels, ignore_index)?;
    let valid = flat_labels.ne(ignore_index as f64)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    let loss = match reduction {
        Reduction::None => per_token.reshape(labels.shape())?,
        Reduction::Sum => per_token.sum_all()?,
        Reduction::Mean => {
            let n = num_label_tokens.map_or(valid, |n| n as f64);
            let scale = Tensor::new(if n == 0.0 { 0.0 } else { 1.0 / n }, per_token.device())?;
            per_token.sum_all()?.mul(&scale)?
        }
    };
    let grads = backward_of(&loss)?.backward()?;
    let grad = grads.get(var.as_tensor()).expect("slow reference: no gradient").clone();
    Ok((loss, grad))
}

/// Asserts `|a - b| <= atol + rtol * |b|` element-wise, naming `what` on failure.
pub fn assert_close(a: &Tensor, b: &Tensor, rtol: f64, atol: f64, what: &str) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let a: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let b: Vec<f64> = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let bound = atol + rtol * y.abs();
        assert!((x - y).abs() <= bound, "{what}: element {i}: {x} vs {y} (diff {:e} > {bound:e})", (x - y).abs());
    }
    Ok(())
}

/// [`assert_close`] for outputs that may be non-finite: where `b` is NaN, `a`
/// must be NaN; where `b` is infinite, `a` must be the same infinity;
/// elsewhere `|a - b| <= atol + rtol * |b|`.
pub fn assert_close_nonfinite(a: &Tensor, b: &Tensor, rtol: f64, atol: f64, what: &str) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let a: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let b: Vec<f64> = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if y.is_nan() {
            assert!(x.is_nan(), "{what}: element {i}: {x}, want NaN");
        } else if y.is_infinite() {
            assert_eq!(x, y, "{what}: element {i}");
        } else {
            let bound = atol + rtol * y.abs();
            assert!((x - y).abs() <= bound, "{what}: element {i}: {x} vs {y} (diff {:e} > {bound:e})", (x - y).abs());
        }
    }
    Ok(())
}

/// Every element of `t` is exactly 0 (vacuously for an empty `t`, which
/// candle cannot convert on CUDA: its cast kernels launch an empty grid).
pub fn assert_all_zero(t: &Tensor, what: &str) -> Result<()> {
    if t.elem_count() == 0 {
        return Ok(());
    }
    let values: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    assert!(values.iter().all(|&v| v == 0.0), "{what}: not exactly zero: {values:?}");
    Ok(())
}

/// The largest `|t|`, as f64 (NaN is skipped).
pub fn max_abs(t: &Tensor) -> Result<f64> {
    let values: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(values.iter().map(|v| v.abs()).filter(|v| !v.is_nan()).fold(0.0, f64::max))
}
