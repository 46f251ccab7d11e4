//! CPU against CUDA at realistic sizes (feature `cuda`; skipped with a message
//! when no GPU is present): the same inputs through the fused kernels on both
//! devices give the same losses and gradients, also beyond 2^31 elements,
//! beyond one launch's blocks, with each row's backward split across blocks,
//! in place over strided views, with NaN and infinite logits, and with class
//! weights.
#![cfg(feature = "cuda")]

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{ChunkedCrossEntropy, LinearCrossEntropy, Reduction};
use common::{assert_close, assert_close_nonfinite, backward_of, cuda_or_skip, loss_and_grad, max_abs, Rng};

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

/// Each row's backward shared by several blocks
/// (`kernel_abi::set_row_splits`, a process-wide test hook: tests of this
/// binary that run meanwhile get split launches too, which must pass as
/// well): the same losses and gradients as the CPU engine's, out of place and
/// in place, 3 splits (not dividing a row's packs evenly) and 16.
#[test]
fn rows_split_across_blocks() -> anyhow::Result<()> {
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = candle_chunked_ce::kernel_abi::set_row_splits(None);
        }
    }
    let _restore = Restore;
    for splits in [3, 16] {
        candle_chunked_ce::kernel_abi::set_row_splits(Some(splits))?;
        cpu_vs_cuda(128, 128256, DType::F32)?;
        cpu_vs_cuda(128, 128256, DType::BF16)?;
    }
    Ok(())
}

/// N * V beyond 2^31 elements (64-bit offsets in the kernels), random bf16
/// logits: every row's loss and log-sum-exp against the CPU engine, and the
/// gradient, out of place and in place, of rows on both sides of element 2^31
/// (row 16384 starts there) and the last ones, against the CPU engine on those rows.
#[test]
fn offsets_beyond_i32() -> anyhow::Result<()> {
    let Some(gpu) = cuda_or_skip("offsets_beyond_i32") else { return Ok(()) };
    let (rows, vocab) = (16400usize, 131072usize);
    gpu.set_seed(17)?;
    let logits = Tensor::randn(0f32, 4.0, (rows, vocab), &gpu)?.to_dtype(DType::BF16)?;
    let mut rng = Rng::new(17);
    let labels = common::labels(&mut rng, &[rows], vocab, 0.1, -100, &Device::Cpu)?;
    let gpu_labels = labels.to_device(&gpu)?;
    // The per-token outputs of every row: the CPU engine's forward over a host copy.
    let per_token = ChunkedCrossEntropy::default().reduction(Reduction::None);
    let want = per_token.forward_with_outputs(&logits.to_device(&Device::Cpu)?, &labels, None, None, None)?;
    // A sum's gradient of a row depends on that row only: the CPU engine needs only the picked rows.
    let picked: Vec<u32> = vec![0, 1, 16382, 16383, 16384, 16385, 16398, 16399];
    let picked_gpu = Tensor::new(picked.as_slice(), &gpu)?;
    let picked_cpu = Tensor::new(picked.as_slice(), &Device::Cpu)?;
    let on_cpu = |t: &Tensor| -> candle::Result<Tensor> { t.index_select(&picked_gpu, 0)?.to_device(&Device::Cpu) };
    let sum = ChunkedCrossEntropy::default().reduction(Reduction::Sum);
    let (_, want_grad) = loss_and_grad(&sum, &on_cpu(&logits)?, &labels.index_select(&picked_cpu, 0)?, None, None)?;
    for inplace in [false, true] {
        let what = format!("{rows}x{vocab} bf16 inplace={inplace}");
        let var = Var::from_tensor(&logits)?;
        let out =
            sum.clone().inplace_grad(inplace).forward_with_outputs(var.as_tensor(), &gpu_labels, None, None, None)?;
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        assert_close(&cpu(&out.token_losses)?, &want.token_losses, 1e-5, 1e-6, &format!("{what}: token losses"))?;
        assert_close(&cpu(&out.lse)?, &want.lse, 1e-5, 1e-6, &format!("{what}: lse"))?;
        assert_close(&cpu(&out.token_accuracy)?, &want.token_accuracy, 1e-6, 0.0, &format!("{what}: accuracy"))?;
        let grad = out.loss.backward()?.get(var.as_tensor()).expect("no gradient").clone();
        assert_close(&on_cpu(&grad)?, &want_grad, 1.0 / 128.0, 1e-9, &format!("{what}: gradient rows"))?;
    }
    Ok(())
}

/// Every output of `ce` and the gradient of the logits (backward from
/// `backward_of(loss)`), computed on `device` and brought back to the CPU, in
/// the order of [`OUTPUTS`].
fn outputs_and_grad(
    ce: &ChunkedCrossEntropy,
    logits: &Tensor,
    labels: &Tensor,
    mask: Option<&Tensor>,
    device: &Device,
) -> anyhow::Result<Vec<Tensor>> {
    let var = Var::from_tensor(&logits.to_device(device)?)?;
    let mask = mask.map(|m| m.to_device(device)).transpose()?;
    let out = ce.forward_with_outputs(var.as_tensor(), &labels.to_device(device)?, mask.as_ref(), None, None)?;
    let grad = backward_of(&out.loss)?.backward()?.get(var.as_tensor()).expect("no gradient").clone();
    [out.loss, out.z_loss, out.token_losses, out.lse, out.token_accuracy, grad]
        .iter()
        .map(|t| Ok(t.to_device(&Device::Cpu)?))
        .collect()
}

const OUTPUTS: [&str; 6] = ["loss", "z_loss", "token losses", "lse", "accuracy", "gradient"];

/// [`outputs_and_grad`] on the GPU against the CPU engine, every output to
/// `rtol` (the gradient to `grad_rtol`, and to an absolute floor relative to
/// its largest element, as smoothing's `p_j - ε / V` cancels); NaN where the
/// CPU gives NaN, the same infinities. The reduced losses get more room with
/// many tokens: candle's CPU `sum_all` adds the f32 terms one after another,
/// an error growing about as `sqrt(N)` roundings.
fn gpu_matches_cpu(
    ce: &ChunkedCrossEntropy,
    logits: &Tensor,
    labels: &Tensor,
    mask: Option<&Tensor>,
    gpu: &Device,
    (rtol, grad_rtol): (f64, f64),
    what: &str,
) -> anyhow::Result<Vec<Tensor>> {
    let cpu = outputs_and_grad(ce, logits, labels, mask, &Device::Cpu)?;
    let got = outputs_and_grad(ce, logits, labels, mask, gpu)?;
    let sum_rtol = 2.0 * (labels.elem_count() as f64).sqrt() * f64::from(f32::EPSILON);
    for ((name, g), c) in OUTPUTS.iter().zip(&got).zip(&cpu) {
        let (rtol, atol) = match *name {
            "gradient" => (grad_rtol, 1e-6 * max_abs(c)?),
            "loss" | "z_loss" => (rtol.max(sum_rtol), 1e-7),
            _ => (rtol, 1e-7),
        };
        assert_close_nonfinite(g, c, rtol, atol, &format!("{what}: {name}"))?;
    }
    Ok(got)
}

/// More rows than a launch has blocks (65536), with one row per block (a large
/// vocabulary) and with several rows per block (a small one, many more rows):
/// the kernels loop over the rest, with every option and in place; a bad
/// label in a row beyond the grid is reported with that row.
#[test]
fn more_rows_than_blocks() -> anyhow::Result<()> {
    let Some(gpu) = cuda_or_skip("more_rows_than_blocks") else { return Ok(()) };
    for (rows, vocab) in [(67_881usize, 2053usize), (600_001, 37)] {
        let mut rng = Rng::new(rows as u64);
        let logits = common::logits(&mut rng, &[rows, vocab], 8.0, DType::F32, &Device::Cpu)?;
        let labels = common::labels(&mut rng, &[rows], vocab, 0.1, -100, &Device::Cpu)?;
        for (reduction, inplace) in [(Reduction::Mean, false), (Reduction::None, true)] {
            let ce = ChunkedCrossEntropy::default()
                .reduction(reduction)
                .inplace_grad(inplace)
                .label_smoothing(0.1)
                .z_loss(1e-4)
                .logit_softcap(Some(30.0));
            let what = format!("{rows}x{vocab} {reduction:?} inplace={inplace}");
            gpu_matches_cpu(&ce, &logits, &labels, None, &gpu, (1e-5, 1e-5), &what)?;
        }
        let mut values: Vec<i64> = labels.to_vec1()?;
        let bad_row = rows - 3;
        values[bad_row] = vocab as i64;
        let bad = Tensor::from_vec(values, rows, &gpu)?;
        let err = ChunkedCrossEntropy::default().forward(&logits.to_device(&gpu)?, &bad, None).expect_err("bad label");
        assert!(err.to_string().contains(&format!("row {bad_row}")), "{rows}x{vocab}: {err}");
    }
    Ok(())
}

/// A view of a tensor (a test case's strided logits, or the part of their storage outside them).
type View = fn(&Tensor) -> candle::Result<Tensor>;

/// The gradient written in place over strided logits: a `[B, S-1, V]` shift
/// of `[B, S, V]` (rows with gaps) and a `[B, S, V]` view of `[S, B, V]` (rows
/// out of order). The gradient equals the CPU engine's, and the storage
/// outside the view (the shift's last position) is left as it was.
#[test]
fn inplace_on_strided_logits() -> anyhow::Result<()> {
    let Some(gpu) = cuda_or_skip("inplace_on_strided_logits") else { return Ok(()) };
    let (batch, seq, vocab) = (3usize, 17usize, 50257usize);
    let mut rng = Rng::new(23);
    let labels = common::labels(&mut rng, &[batch, seq - 1], vocab, 0.1, -100, &Device::Cpu)?;
    let permuted = common::labels(&mut rng, &[batch, seq], vocab, 0.1, -100, &Device::Cpu)?;
    for (dtype, grad_rtol) in [(DType::F32, 1e-5), (DType::BF16, 1.0 / 128.0)] {
        let base = common::logits(&mut rng, &[batch, seq, vocab], 8.0, dtype, &Device::Cpu)?;
        // (what, the logits' storage, the view the loss sees, what of the storage lies outside it)
        let shift: View = |t| t.narrow(1, 0, t.dim(1)? - 1);
        let last_position: View = |t| t.narrow(1, t.dim(1)? - 1, 1);
        let cases = [
            ("[B, S-1, V] of [B, S, V]", base.clone(), shift, &labels, Some(last_position)),
            ("[B, S, V] of [S, B, V]", base.transpose(0, 1)?.contiguous()?, |t| t.transpose(0, 1), &permuted, None),
        ];
        for (name, base, view, labels, outside) in cases {
            let what = format!("{dtype:?} {name}");
            let grad_of = |device: &Device, inplace: bool| -> anyhow::Result<(Tensor, Tensor)> {
                let var = Var::from_tensor(&base.to_device(device)?)?;
                let logits = view(var.as_tensor())?;
                assert!(!logits.is_contiguous(), "{what}: the view must be strided");
                let ce = ChunkedCrossEntropy::default().inplace_grad(inplace);
                let loss = ce.forward(&logits, &labels.to_device(device)?, None)?;
                let grad = loss.backward()?.get(var.as_tensor()).expect("no gradient").clone();
                Ok((grad.to_device(&Device::Cpu)?, var.as_tensor().to_device(&Device::Cpu)?))
            };
            let (want, _) = grad_of(&Device::Cpu, false)?;
            let (grad, storage) = grad_of(&gpu, true)?;
            assert_close(&grad, &want, grad_rtol, 1e-9, &format!("{what}: gradient"))?;
            assert_close(&view(&storage)?, &view(&want)?, grad_rtol, 1e-9, &format!("{what}: storage in the view"))?;
            if let Some(outside) = outside {
                assert_close(&outside(&storage)?, &outside(&base)?, 0.0, 0.0, &format!("{what}: outside the view"))?;
            }
        }
    }
    Ok(())
}

/// Rows with NaN, `+inf` and `-inf` logits (in the row, at the target, all of
/// it, both infinities), ignored and masked rows holding them too: every
/// output and the gradient equal the CPU engine's, NaN where it gives NaN, in
/// f32 and bf16, with a warp's and a block's worth of vocabulary per row, with
/// and without options (the soft-cap makes infinities finite), in place too.
/// Ignored and masked rows get an exact zero gradient.
#[test]
fn non_finite_logits() -> anyhow::Result<()> {
    let Some(gpu) = cuda_or_skip("non_finite_logits") else { return Ok(()) };
    let labels = [1i64, 2, 3, 2, 0, -100, 4, 5, 6, 7, 8, 9];
    let mask = Tensor::new(&[1u8, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1], &Device::Cpu)?;
    let rows = labels.len();
    for vocab in [300usize, 3000] {
        let mut rng = Rng::new(vocab as u64);
        let mut values: Vec<f64> =
            common::logits(&mut rng, &[rows, vocab], 4.0, DType::F64, &Device::Cpu)?.flatten_all()?.to_vec1()?;
        let (nan, inf) = (f64::NAN, f64::INFINITY);
        let specials = [
            (0, 3, nan),
            (1, 5, inf),
            (2, 7, -inf),
            (3, 2, -inf), // at the target: an infinite loss
            (5, 0, nan),  // ignored by its label
            (6, 1, inf),  // masked
            (7, 0, inf),  // both infinities
            (7, 1, -inf),
            (8, 6, inf),          // at the target
            (9, 7, nan),          // at the target
            (10, vocab - 1, inf), // in the row's last element
        ];
        for (row, col, value) in specials {
            values[row * vocab + col] = value;
        }
        values[4 * vocab..5 * vocab].fill(-inf); // a row of -inf
        let logits = Tensor::from_vec(values, (rows, vocab), &Device::Cpu)?;
        let labels = Tensor::new(&labels, &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let logits = logits.to_dtype(dtype)?;
            let grad_rtol = if dtype == DType::BF16 { 1.0 / 128.0 } else { 1e-5 };
            for (smoothing, z_loss, softcap) in [(0.0, 0.0, None), (0.1, 1e-3, Some(5.0))] {
                for (reduction, inplace) in [(Reduction::Sum, false), (Reduction::None, true)] {
                    let ce = ChunkedCrossEntropy::default()
                        .reduction(reduction)
                        .inplace_grad(inplace)
                        .label_smoothing(smoothing)
                        .z_loss(z_loss)
                        .logit_softcap(softcap);
                    let what = format!("V={vocab} {dtype:?} {ce:?}");
                    let got = gpu_matches_cpu(&ce, &logits, &labels, Some(&mask), &gpu, (1e-5, grad_rtol), &what)?;
                    let grad_rows: Vec<Vec<f32>> = got[5].to_dtype(DType::F32)?.to_vec2()?;
                    for row in [5, 6] {
                        assert!(grad_rows[row].iter().all(|&g| g == 0.0), "{what}: ignored row {row}");
                    }
                }
            }
        }
    }
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
            let out = ce.forward_with_outputs(var.as_tensor(), &labels.to_device(device)?, None, None, None)?;
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

/// Label smoothing with class weights (a quarter of them 0) and per-token loss
/// weights, with a mask: the loss and the gradients on the GPU equal the CPU
/// engine's, for the loss over logits (f32 and bf16, out of place and in
/// place) and for the linear loss (f32; the gradients of the hidden states and
/// of the weight). This runs the kernels' `_weighted_` entries.
#[test]
fn class_weights_with_label_smoothing_and_loss_weights() -> anyhow::Result<()> {
    let Some(gpu) = cuda_or_skip("class_weights_with_label_smoothing_and_loss_weights") else { return Ok(()) };
    let (rows, vocab, hidden_dim) = (96usize, 50257usize, 64usize);
    let mut rng = Rng::new(29);
    let labels = common::labels(&mut rng, &[rows], vocab, 0.1, -100, &Device::Cpu)?;
    let mask = common::mask(&mut rng, &[rows], 0.9, &Device::Cpu)?;
    let class: Vec<f32> = (0..vocab).map(|_| if rng.below(4) == 0 { 0.0 } else { 2.0 * rng.unit() as f32 }).collect();
    let class = Tensor::from_vec(class, vocab, &Device::Cpu)?;
    let loss_weights: Vec<f32> = (0..rows).map(|_| 2.0 * rng.unit() as f32).collect();
    let loss_weights = Tensor::from_vec(loss_weights, rows, &Device::Cpu)?;
    // A tensor moved to `device`, and brought back to the CPU.
    let on = |device: &Device, t: &Tensor| t.to_device(device);
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu);

    for dtype in [DType::F32, DType::BF16] {
        let logits = common::logits(&mut rng, &[rows, vocab], 8.0, dtype, &Device::Cpu)?;
        let grad_rtol = if dtype == DType::BF16 { 1.0 / 128.0 } else { 1e-5 };
        for inplace in [false, true] {
            let run = |device: &Device| -> anyhow::Result<(Tensor, Tensor)> {
                let ce = ChunkedCrossEntropy::default()
                    .label_smoothing(0.1)
                    .inplace_grad(inplace)
                    .class_weights(Some(on(device, &class)?));
                let var = Var::from_tensor(&on(device, &logits)?)?;
                let (labels, mask, weights) = (on(device, &labels)?, on(device, &mask)?, on(device, &loss_weights)?);
                let loss = ce.forward_weighted(var.as_tensor(), &labels, Some(&mask), &weights)?;
                let grad = loss.backward()?.get(var.as_tensor()).expect("no gradient").clone();
                Ok((cpu(&loss)?, cpu(&grad)?))
            };
            let ((want_loss, want_grad), (loss, grad)) = (run(&Device::Cpu)?, run(&gpu)?);
            let what = format!("{dtype:?} inplace={inplace}");
            assert_close(&loss, &want_loss, 1e-5, 1e-7, &format!("{what}: loss"))?;
            let atol = 1e-6 * max_abs(&want_grad)?;
            assert_close(&grad, &want_grad, grad_rtol, atol, &format!("{what}: gradient"))?;
        }
    }

    let hidden = common::logits(&mut rng, &[rows, hidden_dim], 1.0, DType::F32, &Device::Cpu)?;
    let weight = common::logits(&mut rng, &[vocab, hidden_dim], 0.5, DType::F32, &Device::Cpu)?;
    let run = |device: &Device| -> anyhow::Result<[Tensor; 3]> {
        let ce = LinearCrossEntropy::default().label_smoothing(0.1).class_weights(Some(on(device, &class)?));
        let (h, w) = (Var::from_tensor(&on(device, &hidden)?)?, Var::from_tensor(&on(device, &weight)?)?);
        let (labels, mask, weights) = (on(device, &labels)?, on(device, &mask)?, on(device, &loss_weights)?);
        let loss = ce.forward_weighted(h.as_tensor(), w.as_tensor(), &labels, Some(&mask), &weights)?;
        let grads = loss.backward()?;
        let grad = |v: &Var| grads.get(v.as_tensor()).expect("no gradient").clone();
        Ok([cpu(&loss)?, cpu(&grad(&h))?, cpu(&grad(&w))?])
    };
    let (want, got) = (run(&Device::Cpu)?, run(&gpu)?);
    for ((name, g), w) in ["loss", "hidden gradient", "weight gradient"].iter().zip(&got).zip(&want) {
        // The gradients are matmuls over many partly cancelling terms: their error
        // scales with their largest element.
        let (rtol, atol) = if *name == "loss" { (1e-5, 1e-7) } else { (1e-4, 1e-5 * max_abs(w)?) };
        assert_close(g, w, rtol, atol, &format!("linear f32: {name}"))?;
    }
    Ok(())
}

/// Labels and mask on the CPU with the logits (or the hidden states and
/// weight) on the GPU: the same losses and gradients as with them on the GPU,
/// for the logits loss (also with `grad_in_forward`) and the linear loss, and
/// the same errors: a bad label names its row, a mask on the GPU with labels on
/// the CPU is refused. (Kept on the host, the labels need no device read.)
#[test]
fn labels_on_the_host() -> anyhow::Result<()> {
    let Some(gpu) = cuda_or_skip("labels_on_the_host") else { return Ok(()) };
    let mut rng = Rng::new(83);
    let (rows, width, vocab) = (96, 32, 1003);
    let logits = common::logits(&mut rng, &[rows, vocab], 6.0, DType::F32, &gpu)?;
    let hidden = common::logits(&mut rng, &[rows, width], 1.0, DType::BF16, &gpu)?;
    let weight = common::logits(&mut rng, &[vocab, width], 0.5, DType::BF16, &gpu)?;
    let labels = common::labels(&mut rng, &[rows], vocab, 0.1, -100, &Device::Cpu)?;
    let mask = common::mask(&mut rng, &[rows], 0.8, &Device::Cpu)?;
    let on_gpu = |t: &Tensor| t.to_device(&gpu);
    for grad_in_forward in [false, true] {
        let ce = ChunkedCrossEntropy::default().grad_in_forward(grad_in_forward);
        let run = |labels: &Tensor, mask: &Tensor| -> anyhow::Result<(Tensor, Tensor)> {
            let var = Var::from_tensor(&logits)?;
            let loss = ce.forward(&(var.as_tensor() * 1.0)?, labels, Some(mask))?;
            let grad = loss.backward()?.get(var.as_tensor()).expect("a gradient").clone();
            Ok((loss.to_device(&Device::Cpu)?, grad.to_device(&Device::Cpu)?))
        };
        let want = run(&on_gpu(&labels)?, &on_gpu(&mask)?)?;
        let got = run(&labels, &mask)?;
        let what = format!("logits loss, grad_in_forward {grad_in_forward}");
        assert_close(&got.0, &want.0, 0.0, 0.0, &format!("{what}: loss"))?;
        assert_close(&got.1, &want.1, 0.0, 0.0, &format!("{what}: gradient"))?;
    }
    let linear = LinearCrossEntropy::default();
    let direct = |labels: &Tensor, mask: &Tensor| linear.loss_and_grads(&hidden, &weight, None, labels, Some(mask));
    let (want, got) = (direct(&on_gpu(&labels)?, &on_gpu(&mask)?)?, direct(&labels, &mask)?);
    for (name, g, w) in [("loss", &got.loss, &want.loss), ("hidden", &got.hidden_grad, &want.hidden_grad)] {
        assert_close(&g.to_device(&Device::Cpu)?, &w.to_device(&Device::Cpu)?, 0.0, 0.0, &format!("linear {name}"))?;
    }
    let (g, w) = (got.weight_grad.to_device(&Device::Cpu)?, want.weight_grad.to_device(&Device::Cpu)?);
    assert_close(&g, &w, 0.0, 0.0, "linear weight gradient")?;
    // Errors: a label out of range names its row; a mask on another device than the labels.
    let bad = Tensor::from_vec(
        (0..rows as u32).map(|r| if r == 7 { vocab as u32 } else { 0 }).collect(),
        rows,
        &Device::Cpu,
    )?;
    for err in [
        ChunkedCrossEntropy::default().forward(&logits, &bad, None).map(|_| ()),
        linear.forward(&hidden, &weight, &bad, None).map(|_| ()),
    ] {
        let msg = err.expect_err("a bad label").to_string();
        assert!(msg.contains("row 7") && msg.contains(&format!("label {vocab}")), "{msg}");
    }
    let err =
        ChunkedCrossEntropy::default().forward(&logits, &labels, Some(&on_gpu(&mask)?)).expect_err("mask elsewhere");
    assert!(err.to_string().contains("mask is on"), "{err}");
    let err =
        ChunkedCrossEntropy::default().forward(&logits, &on_gpu(&labels)?, Some(&mask)).expect_err("mask on the CPU");
    assert!(err.to_string().contains("mask is on"), "{err}");
    // [B, S] labels from the host, and no tokens at all: a loss of exactly 0.
    let batched =
        ChunkedCrossEntropy::default().forward(&logits.reshape((8, 12, vocab))?, &labels.reshape((8, 12))?, None)?;
    let flat = ChunkedCrossEntropy::default().forward(&logits, &labels, None)?;
    assert_close(&batched.to_device(&Device::Cpu)?, &flat.to_device(&Device::Cpu)?, 0.0, 0.0, "[B, S] host labels")?;
    let none = Tensor::zeros(0, DType::I64, &Device::Cpu)?;
    let empty = ChunkedCrossEntropy::default().forward(&logits.narrow(0, 0, 0)?, &none, None)?;
    assert_eq!(empty.to_device(&Device::Cpu)?.to_scalar::<f32>()?, 0.0, "no tokens, host labels");
    Ok(())
}
