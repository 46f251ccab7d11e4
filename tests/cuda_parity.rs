//! CPU against CUDA at realistic sizes (feature `cuda`; skipped with a message
//! when no GPU is present): the same inputs through the fused kernels on both
//! devices give the same losses and gradients.
#![cfg(feature = "cuda")]

mod common;

use candle::{DType, Device};
use candle_chunked_ce::{ChunkedCrossEntropy, Reduction};
use common::{assert_close, cuda_or_skip, loss_and_grad, Rng};

fn cpu_vs_cuda(rows: usize, vocab: usize, dtype: DType) -> anyhow::Result<()> {
    let what = format!("{rows}x{vocab} {dtype:?}");
    let Some(gpu) = cuda_or_skip(&what) else { return Ok(()) };
    let mut rng = Rng::new(vocab as u64);
    let logits = common::logits(&mut rng, &[rows, vocab], 8.0, dtype, &Device::Cpu)?;
    let labels = common::labels(&mut rng, &[rows], vocab, 0.1, -100, &Device::Cpu)?;
    for reduction in [Reduction::Mean, Reduction::None] {
        for inplace in [false, true] {
            let ce = ChunkedCrossEntropy::default().reduction(reduction).inplace_grad(inplace);
            let (cpu_loss, cpu_grad) = loss_and_grad(&ce, &logits, &labels, None, None)?;
            let (gpu_loss, gpu_grad) =
                loss_and_grad(&ce, &logits.to_device(&gpu)?, &labels.to_device(&gpu)?, None, None)?;
            let what = format!("{what} {reduction:?} inplace={inplace}");
            assert_close(&gpu_loss.to_device(&Device::Cpu)?, &cpu_loss, 1e-5, 1e-7, &format!("{what} loss"))?;
            let grad_rtol = if dtype == DType::BF16 { 1.0 / 128.0 } else { 1e-5 };
            assert_close(&gpu_grad.to_device(&Device::Cpu)?, &cpu_grad, grad_rtol, 1e-9, &format!("{what} grad"))?;
        }
    }
    Ok(())
}

#[test]
fn gpt2_vocabulary_f32() -> anyhow::Result<()> {
    cpu_vs_cuda(256, 50257, DType::F32)
}

#[test]
fn gpt2_vocabulary_bf16() -> anyhow::Result<()> {
    cpu_vs_cuda(256, 50257, DType::BF16)
}

#[test]
fn llama3_vocabulary_f32() -> anyhow::Result<()> {
    cpu_vs_cuda(128, 128256, DType::F32)
}

#[test]
fn llama3_vocabulary_bf16() -> anyhow::Result<()> {
    cpu_vs_cuda(128, 128256, DType::BF16)
}

/// N * V beyond 2^31 elements: 64-bit offsets in the kernels.
#[test]
fn offsets_beyond_i32() -> anyhow::Result<()> {
    let Some(gpu) = cuda_or_skip("offsets_beyond_i32") else { return Ok(()) };
    let (rows, vocab) = (16400usize, 131072usize);
    let logits = candle::Tensor::zeros((rows, vocab), DType::BF16, &gpu)?;
    let labels = candle::Tensor::arange(0i64, rows as i64, &gpu)?;
    let loss = ChunkedCrossEntropy::default().reduction(Reduction::None).forward(&logits, &labels, None)?;
    // Uniform logits: every row's loss is ln(V), the last row's included.
    let losses: Vec<f32> = loss.to_vec1()?;
    let want = (vocab as f32).ln();
    assert!(losses.iter().all(|l| (l - want).abs() < 1e-4), "last row loss {}", losses[rows - 1]);
    Ok(())
}

/// Label smoothing, z-loss, soft-cap and every extra output agree between the
/// devices at Llama 3's vocabulary, in bf16 and f32.
#[test]
fn options_and_outputs_llama3_vocabulary() -> anyhow::Result<()> {
    let Some(gpu) = cuda_or_skip("options_and_outputs_llama3_vocabulary") else { return Ok(()) };
    let (rows, vocab) = (64, 128256);
    let mut rng = Rng::new(7);
    for dtype in [DType::F32, DType::BF16] {
        let logits = common::logits(&mut rng, &[rows, vocab], 40.0, dtype, &Device::Cpu)?;
        let labels = common::labels(&mut rng, &[rows], vocab, 0.1, -100, &Device::Cpu)?;
        let ce = ChunkedCrossEntropy::default().label_smoothing(0.1).z_loss(1e-4).logit_softcap(Some(30.0));
        let run = |device: &Device| -> anyhow::Result<Vec<candle::Tensor>> {
            let var = candle::Var::from_tensor(&logits.to_device(device)?)?;
            let out = ce.forward_with_outputs(var.as_tensor(), &labels.to_device(device)?, None, None)?;
            let grad = out.loss.backward()?.get(var.as_tensor()).expect("no gradient").clone();
            [out.loss, out.z_loss, out.token_losses, out.lse, out.token_accuracy, grad]
                .iter()
                .map(|t| Ok(t.to_device(&Device::Cpu)?))
                .collect()
        };
        let (cpu, gpu) = (run(&Device::Cpu)?, run(&gpu)?);
        let names = ["loss", "z_loss", "token losses", "lse", "accuracy", "gradient"];
        for ((name, c), g) in names.iter().zip(&cpu).zip(&gpu) {
            let rtol = if *name == "gradient" && dtype == DType::BF16 { 1.0 / 128.0 } else { 1e-5 };
            assert_close(g, c, rtol, 1e-9, &format!("{dtype:?} {name}"))?;
        }
    }
    Ok(())
}
