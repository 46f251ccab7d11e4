//! `LinearCrossEntropy`'s weight gradient on CUDA, where each chunk's `Gᵀ · H`
//! is one cuBLAS GEMM into the f32 accumulator, or for a bf16 weight in one
//! chunk straight into the bf16 gradient (`src/cuda_gemm.rs`), against
//! the CPU's from the same inputs: f32, bf16 and f16, several chunk lengths
//! (one row, uneven last chunks, one chunk), vocabularies that are not
//! multiples of 8, and both the gradients formed in forward (`Mean`) and the
//! recomputing backward (`None`). Feature `cuda`; skipped with a message when
//! no GPU is present.
#![cfg(feature = "cuda")]

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{linear_products, LinearCrossEntropy, Reduction};
use common::{assert_close, backward_of, cuda_or_skip, max_abs, Rng};

/// The loss and the gradients of `hidden` and `weight` through `ce`.
fn loss_and_grads(
    ce: &LinearCrossEntropy,
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let (h, w) = (Var::from_tensor(hidden)?, Var::from_tensor(weight)?);
    let loss = ce.forward(h.as_tensor(), w.as_tensor(), labels, None)?;
    let grads = backward_of(&loss)?.backward()?;
    let grad = |v: &Var| grads.get(v.as_tensor()).expect("no gradient").clone();
    let cpu = |t: Tensor| t.to_device(&Device::Cpu);
    Ok((cpu(loss)?, cpu(grad(&h))?, cpu(grad(&w))?))
}

/// `‖got - want‖ / ‖want‖` (Frobenius), in f64.
fn relative_error(got: &Tensor, want: &Tensor) -> anyhow::Result<f64> {
    let (got, want) = (got.to_dtype(DType::F64)?, want.to_dtype(DType::F64)?);
    let norm = |t: &Tensor| -> anyhow::Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) };
    Ok(norm(&(got - &want)?)? / norm(&want)?)
}

/// The CPU's loss and gradients (default chunking) against CUDA's for each
/// of `chunk_lens`, from the same `[rows, width]` hidden states, `[vocab,
/// width]` weight and labels (10 % ignored).
fn cpu_vs_cuda(
    (rows, width, vocab): (usize, usize, usize),
    dtype: DType,
    reduction: Reduction,
    chunk_lens: &[Option<usize>],
) -> anyhow::Result<()> {
    let what = format!("{rows}x{width}x{vocab} {dtype:?} {reduction:?}");
    let Some(gpu) = cuda_or_skip(&what) else { return Ok(()) };
    let mut rng = Rng::new((rows * 31 + vocab) as u64);
    let hidden = common::logits(&mut rng, &[rows, width], 1.0, dtype, &Device::Cpu)?;
    let weight = common::logits(&mut rng, &[vocab, width], 0.5, dtype, &Device::Cpu)?;
    let labels = common::labels(&mut rng, &[rows], vocab, 0.1, -100, &Device::Cpu)?;
    let ce = LinearCrossEntropy::default().reduction(reduction);
    let want = loss_and_grads(&ce, &hidden, &weight, &labels)?;
    let (hidden_gpu, weight_gpu, labels_gpu) =
        (hidden.to_device(&gpu)?, weight.to_device(&gpu)?, labels.to_device(&gpu)?);
    // f32: summation order only. bf16/f16: the chunk's gradient is rounded to
    // the dtype on both devices from slightly different logits and softmax,
    // and dW is rounded to it at the end (an ulp is 2^-8 / 2^-11 relative).
    let (rtol, frobenius) = match dtype {
        DType::F32 => (1e-4, 1e-5),
        _ => (1.0 / 32.0, 1.0 / 64.0),
    };
    for &chunk_len in chunk_lens {
        let what = format!("{what} chunk_len={chunk_len:?}");
        let ce = ce.clone().chunk_len(chunk_len);
        let before = linear_products().weight_grad;
        let got = loss_and_grads(&ce, &hidden_gpu, &weight_gpu, &labels_gpu)?;
        // One weight-gradient product per chunk of the valid rows. The
        // automatic chunk on CUDA has at least 2048 rows (more for 16-bit
        // weights where H is larger), more than these cases have: one chunk.
        let valid = labels.to_vec1::<i64>()?.iter().filter(|&&l| l != -100).count();
        assert!(valid < 2048, "{what}: the automatic chunk would not hold all {valid} rows");
        let len = chunk_len.unwrap_or(valid).min(valid);
        assert_eq!(linear_products().weight_grad - before, valid.div_ceil(len), "{what}: weight-gradient products");
        assert_eq!(got.2.dtype(), dtype, "{what}: weight gradient dtype");
        let loss_rtol = if dtype == DType::F32 { 1e-5 } else { 1e-3 };
        assert_close(&got.0, &want.0, loss_rtol, 1e-6, &format!("{what} loss"))?;
        for (name, got, want) in [("weight", &got.2, &want.2), ("hidden", &got.1, &want.1)] {
            let error = relative_error(got, want)?;
            eprintln!("{what}: {name} gradient, relative error {error:.2e}");
            assert!(error <= frobenius, "{what}: {name} gradient relative error {error:e} > {frobenius:e}");
            assert_close(got, want, rtol, rtol * max_abs(want)?, &format!("{what} {name} gradient"))?;
        }
    }
    Ok(())
}

/// GPT-2's vocabulary (50257, odd), 1500 rows: the automatic chunk (all the
/// rows on CUDA), one row, an odd length (a short last chunk), one chunk.
const GPT2: (usize, usize, usize) = (1500, 64, 50257);
const GPT2_CHUNKS: &[Option<usize>] = &[None, Some(1), Some(333), Some(1500)];

#[test]
fn gpt2_vocabulary_f32() -> anyhow::Result<()> {
    cpu_vs_cuda(GPT2, DType::F32, Reduction::Mean, GPT2_CHUNKS)
}

#[test]
fn gpt2_vocabulary_bf16() -> anyhow::Result<()> {
    cpu_vs_cuda(GPT2, DType::BF16, Reduction::Mean, GPT2_CHUNKS)
}

/// The recomputing backward (per-token losses) accumulates through the same
/// GEMM.
#[test]
fn gpt2_vocabulary_bf16_recomputed() -> anyhow::Result<()> {
    cpu_vs_cuda(GPT2, DType::BF16, Reduction::None, &[None, Some(333)])
}

/// Small odd sizes (V = 1003, H = 72, N = 257), every float dtype the GEMM takes.
#[test]
fn odd_sizes() -> anyhow::Result<()> {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for reduction in [Reduction::Mean, Reduction::None] {
            cpu_vs_cuda((257, 72, 1003), dtype, reduction, &[None, Some(1), Some(7), Some(100), Some(257)])?;
        }
    }
    Ok(())
}
