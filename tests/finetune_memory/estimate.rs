//! `memory_plan`'s estimate of a step's memory, which picks
//! `--keep-activations`' default on a GPU, against the heap the same code
//! holds on the CPU; and the default itself.

use super::{alone, data, memory_plan, peak_heap, shared, train, LIVE};
use crate::gpt2::{Config, Gpt2};
use crate::rng::Rng;
use crate::train::{Batch, LossKind};
use candle::Device;
use std::sync::atomic::Ordering;

/// A model and micro-batch shape for the memory estimate.
struct Estimated {
    vocab: usize,
    width: usize,
    heads: usize,
    layers: usize,
    shape: memory_plan::MicroBatch,
}

/// The attention's `[B, H, T, T]` against the `[B * T, C]` tensors, more
/// layers, heads, sequences and width, and a vocabulary whose logits outweigh
/// the rest.
const ESTIMATED: [Estimated; 6] = [
    Estimated::of(23, 64, 2, 2, 4, 64),
    Estimated::of(23, 64, 2, 4, 4, 64),
    Estimated::of(23, 64, 8, 2, 4, 64),
    Estimated::of(23, 64, 2, 2, 4, 128),
    Estimated::of(23, 128, 4, 2, 2, 32),
    Estimated::of(4000, 32, 2, 2, 4, 64),
];

impl Estimated {
    const fn of(vocab: usize, width: usize, heads: usize, layers: usize, batch: usize, seq: usize) -> Self {
        Self { vocab, width, heads, layers, shape: memory_plan::MicroBatch { batch, seq } }
    }

    /// A fresh model of this shape, on the CPU, and one micro-batch for it.
    fn model_and_batch(&self) -> anyhow::Result<(Gpt2, Batch)> {
        let config = Config::gpt2(self.vocab, 128, self.width, self.layers, self.heads);
        let model = Gpt2::new(config, config.init(&mut Rng::new(10), &Device::Cpu)?, &Device::Cpu)?;
        let batch = data().batch(&mut Rng::new(11), self.shape.batch, self.shape.seq, &Device::Cpu)?;
        Ok((model, batch))
    }

    fn describe(&self) -> String {
        let Self { vocab, width, heads, layers, shape } = self;
        format!(
            "vocabulary {vocab}, width {width}, {heads} heads, {layers} layers, batch {} x {}",
            shape.batch, shape.seq
        )
    }
}

/// `--keep-activations`' default on a GPU rests on `memory_plan`'s estimate
/// of what the blocks keep for the backward pass. The same tensors are held
/// on every device; here the heap also holds each tensor's bookkeeping (a
/// few hundred bytes), so the measure may exceed the estimate by that, and
/// never fall short of it.
#[test]
fn the_kept_activations_are_as_estimated() -> anyhow::Result<()> {
    let _alone = alone();
    for case in &ESTIMATED {
        let (model, batch) = case.model_and_batch()?;
        let first = model.embed(&batch.inputs)?.detach();
        drop(model.forward_checkpoints(first.clone(), true)?);
        let before = LIVE.load(Ordering::Relaxed);
        let kept = model.forward_checkpoints(first.clone(), true)?;
        let held = (LIVE.load(Ordering::Relaxed) - before) as f64;
        let estimate = memory_plan::kept_activation_bytes(&model.config, case.shape, 4) as f64;
        let what = case.describe();
        eprintln!(
            "{what}: the blocks keep {held} bytes, estimated {estimate} ({:+.2}%)",
            100.0 * (held / estimate - 1.0)
        );
        assert!(
            held >= estimate && held <= 1.02 * estimate,
            "{what}: the blocks keep {held} bytes, estimated {estimate}"
        );
        drop(kept);
    }
    Ok(())
}

/// A whole training step with the activations kept, every loss, one
/// micro-batch and two: its peak heap stays under
/// `memory_plan::kept_step_bytes`, the bound the default compares with the
/// GPU's available memory, and not so far under that the GPU would
/// recompute where it need not. The bound adds up what each phase holds at
/// its most (the loss's buffers, then the backward's), so it is loosest
/// where the parameters' gradients dominate (these small models): measured
/// (2026-12-05, the blocks' backward by hand) 1.01-1.70x the peak.
#[test]
fn a_kept_step_stays_under_its_estimate() -> anyhow::Result<()> {
    let _alone = alone();
    for case in &ESTIMATED {
        let (model, batch) = case.model_and_batch()?;
        let params: usize = model.named_vars().iter().map(|(_, v)| v.elem_count()).sum();
        let second = data().batch(&mut Rng::new(12), case.shape.batch, case.shape.seq, &Device::Cpu)?;
        let batches = [batch, second];
        for (loss, micro) in
            [LossKind::Linear, LossKind::Chunked, LossKind::CandleNn].into_iter().flat_map(|l| [(l, 1), (l, 2)])
        {
            let batches = &batches[..micro];
            train::step_gradients_with(&model, batches, loss, true)?;
            let (step, peak) = peak_heap(|| train::step_gradients_with(&model, batches, loss, true));
            drop(step?);
            let estimate = memory_plan::kept_step_bytes(&model.config, case.shape, 4, params, loss, micro);
            let what = format!("{loss:?}, {micro} micro-batches, {}", case.describe());
            eprintln!("{what}: peak {peak} bytes, estimated {estimate} ({:.2}x)", estimate as f64 / peak as f64);
            let (peak, estimate) = (peak as f64, estimate as f64);
            assert!(
                peak <= estimate && estimate <= 2.0 * peak,
                "{what}: the step peaks at {peak} bytes, estimated {estimate}"
            );
        }
    }
    Ok(())
}

/// `--keep-activations`' default on the CPU: kept when the step fits the
/// host's available memory (Linux's `MemAvailable`); a step that needs more
/// than any machine has recomputes them, saying so.
#[cfg(target_os = "linux")]
#[test]
fn the_cpu_keeps_activations_where_they_fit() -> anyhow::Result<()> {
    let _shared = shared();
    assert_eq!(memory_plan::default_keep_activations(&Device::Cpu, 1 << 20)?, (true, None));
    let (keep, note) = memory_plan::default_keep_activations(&Device::Cpu, 1 << 50)?;
    assert!(!keep, "a petabyte fits?");
    let note = note.expect("a note saying why");
    assert!(note.contains("recomputing") && note.contains("this machine has"), "{note}");
    Ok(())
}

/// On CUDA a step that needs one byte keeps its activations and one that
/// needs more than any GPU has recomputes them, saying so. Skips without a
/// GPU (fails with `CHUNKED_CE_REQUIRE_CUDA` set).
#[cfg(feature = "cuda")]
#[test]
fn cuda_keeps_activations_where_they_fit() -> anyhow::Result<()> {
    let _shared = shared();
    let device = match Device::new_cuda(0) {
        Ok(device) => device,
        Err(e) => {
            assert!(std::env::var_os("CHUNKED_CE_REQUIRE_CUDA").is_none(), "no CUDA device: {e}");
            eprintln!("SKIP cuda_keeps_activations_where_they_fit: no CUDA device");
            return Ok(());
        }
    };
    assert_eq!(memory_plan::default_keep_activations(&device, 1)?, (true, None));
    let (keep, note) = memory_plan::default_keep_activations(&device, 1 << 50)?;
    assert!(!keep, "a petabyte fits?");
    let note = note.expect("a note saying why");
    assert!(note.contains("recomputing") && note.contains("1125899.9 GB"), "{note}");
    Ok(())
}
