//! candle's f32 reduced-precision switch on CUDA, in a test binary of its own
//! (the switch is global to the process): with it on, `LinearCrossEntropy`'s
//! logits and input gradient are TF32 candle matmuls and its weight gradient's
//! own cuBLAS product takes TF32 products too (`CUBLAS_COMPUTE_32F_FAST_TF32`,
//! `src/cuda_gemm.rs`). Against the CPU's strict f32, in several chunks (the
//! first product written over the sum, the others added to it): within TF32's
//! rounding of the products' inputs (a 10-bit mantissa, 2^-11 relative).
//! It shows that path runs and stays accurate; whether the weight gradient's
//! product took TF32 is not visible beside the TF32 logits it is formed from.
//! Feature `cuda`; skipped with a message when no GPU is present.
#![cfg(feature = "cuda")]

mod common;

use candle::{DType, Device, Tensor};
use candle_chunked_ce::LinearCrossEntropy;
use common::{cuda_or_skip, Rng};

/// `max |got - want| / max |want|`, in f64.
fn error_of_largest(got: &Tensor, want: &Tensor) -> anyhow::Result<f64> {
    let (got, want) = (got.to_dtype(DType::F64)?.to_device(&Device::Cpu)?, want.to_dtype(DType::F64)?);
    let max = |t: &Tensor| -> anyhow::Result<f64> { Ok(t.abs()?.max_all()?.to_scalar::<f64>()?) };
    Ok(max(&(got - &want)?)? / max(&want)?)
}

/// Restores candle's f32 switch when dropped, whatever the test did.
struct Tf32Off;

impl Drop for Tf32Off {
    fn drop(&mut self) {
        candle::cuda::set_gemm_reduced_precision_f32(false);
    }
}

#[test]
fn tf32_products_stay_within_tf32_rounding() -> anyhow::Result<()> {
    let Some(gpu) = cuda_or_skip("tf32_products_stay_within_tf32_rounding") else { return Ok(()) };
    let (rows, width, vocab) = (300, 256, 1000);
    let mut rng = Rng::new(21);
    let hidden = common::logits(&mut rng, &[rows, width], 1.0, DType::F32, &Device::Cpu)?;
    let weight = common::logits(&mut rng, &[vocab, width], 0.2, DType::F32, &Device::Cpu)?;
    let labels = common::labels(&mut rng, &[rows], vocab, 0.1, -100, &Device::Cpu)?;
    let ce = LinearCrossEntropy::default().chunk_len(Some(64));
    let want = ce.loss_and_grads(&hidden, &weight, None, &labels, None)?;
    let on_gpu = |t: &Tensor| t.to_device(&gpu);
    let run = || ce.loss_and_grads(&on_gpu(&hidden)?, &on_gpu(&weight)?, None, &on_gpu(&labels)?, None);
    let strict = run()?;
    let _restore = Tf32Off;
    candle::cuda::set_gemm_reduced_precision_f32(true);
    let tf32 = run()?;
    for (name, strict, got, want) in [
        ("loss", &strict.loss, &tf32.loss, &want.loss),
        ("hidden_grad", &strict.hidden_grad, &tf32.hidden_grad, &want.hidden_grad),
        ("weight_grad", &strict.weight_grad, &tf32.weight_grad, &want.weight_grad),
    ] {
        let (strict_error, tf32_error) = (error_of_largest(strict, want)?, error_of_largest(got, want)?);
        eprintln!("{name}: error of the largest, strict f32 {strict_error:.2e}, TF32 {tf32_error:.2e}");
        assert!(strict_error <= 1e-4, "{name}: strict f32 on CUDA is {strict_error:e} off the CPU's");
        // Products of inputs rounded to 2^-11 relative, summed in f32: a few
        // times that on the largest element.
        assert!(tf32_error <= 1e-2, "{name}: TF32 on CUDA is {tf32_error:e} off the CPU's f32");
    }
    Ok(())
}
