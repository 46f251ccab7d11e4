//! The `finetune_gpt2` example's memory savings: what they save, and that
//! they compute what they replace. The training step (the blocks' backward
//! by hand, `block.rs`, their activations checkpointed) gives the gradients
//! of candle's backward through the whole graph, bit for bit (the linear
//! loss's output layer, which it forms itself: to rounding), and keeping the
//! activations gives the checkpointed gradients bit for bit; checkpointing
//! holds a fraction of the heap that keeping them holds (measured by this
//! binary's counting allocator); gradient
//! accumulation over micro-batches, with activations kept or checkpointed,
//! gives the gradients of one batch holding them all; the in-place AdamW gives
//! candle-nn's updates, and the graph-free logits the logits.
//!
//! In `finetune_memory/estimate.rs`: the estimate of a step's memory that
//! picks `--keep-activations`' default on a GPU, against the heap.

include!("common/finetune_model.rs");
#[path = "../examples/finetune_gpt2/adamw.rs"]
#[allow(dead_code)]
mod adamw;
#[path = "finetune_memory/estimate.rs"]
mod estimate;
#[path = "../examples/finetune_gpt2/memory_plan.rs"]
#[allow(dead_code)]
mod memory_plan;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use gpt2::{Activation, Config, Gpt2};
use rng::Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use train::{Batch, Dataset, LossKind};

/// The system allocator, counting the bytes this test binary holds on the
/// heap (`LIVE`) and the most it has held since [`peak_heap`] last reset it.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocated(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is passed to `System` unchanged; the counters only add
// and subtract the sizes of the blocks it hands out and takes back.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `GlobalAlloc::alloc`, whose contract the caller keeps.
        let block = unsafe { System.alloc(layout) };
        if !block.is_null() {
            allocated(layout.size());
        }
        block
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `GlobalAlloc::alloc_zeroed`, whose contract the caller keeps.
        let block = unsafe { System.alloc_zeroed(layout) };
        if !block.is_null() {
            allocated(layout.size());
        }
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY: `block` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(block, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `block` came from `System` with `layout`; the caller keeps the rest.
        let moved = unsafe { System.realloc(block, layout, new_size) };
        if !moved.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            allocated(new_size);
        }
        moved
    }
}

/// Tests run on several threads and share the counters: the one that measures
/// holds this lock alone, the others share it.
static MEASURING: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    MEASURING.read().unwrap_or_else(|e| e.into_inner())
}

fn alone() -> RwLockWriteGuard<'static, ()> {
    MEASURING.write().unwrap_or_else(|e| e.into_inner())
}

/// `f`'s result, and the most heap it held at once beyond what was held before
/// it (its result included).
fn peak_heap<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = f();
    (result, PEAK.load(Ordering::Relaxed) - before)
}

/// Three layers, and a vocabulary small enough that batches repeat tokens
/// (the embedding's gradient then adds several rows into one).
const TINY: Config = Config::gpt2(23, 16, 16, 3, 2);

fn data() -> Dataset {
    let tokens: Vec<u32> = (0..400u32).map(|i| (i * 5 + i / 7) % TINY.vocab as u32).collect();
    let mask: Vec<u8> = (0..400).map(|i| u8::from(i % 6 != 0)).collect();
    Dataset { sequences: vec![(tokens, mask)], records: false }
}

/// Asserts that two tensors hold the same values, bit for bit (as f64).
fn assert_same_bits(what: &str, got: &Tensor, expected: &Tensor) -> anyhow::Result<()> {
    assert_eq!(got.shape(), expected.shape(), "{what}: shape");
    let values = |t: &Tensor| -> anyhow::Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    let (got, expected) = (values(got)?, values(expected)?);
    let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != expected[i].to_bits()).collect();
    if let Some(&i) = differ.first() {
        panic!("{what}: {} of {} values differ, first at {i}: {} vs {}", differ.len(), got.len(), got[i], expected[i]);
    }
    Ok(())
}

/// Asserts `|got - expected| <= rtol max |expected|` element by element, with
/// the tensor's largest magnitude as the scale (the same terms summed in
/// another order differ by a few ulp of the largest, wherever they cancel).
fn assert_close(what: &str, got: &Tensor, expected: &Tensor, rtol: f64) -> anyhow::Result<()> {
    assert_eq!(got.shape(), expected.shape(), "{what}: shape");
    let values = |t: &Tensor| -> anyhow::Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    let (got, expected) = (values(got)?, values(expected)?);
    let bound = rtol * expected.iter().fold(0f64, |m, e| m.max(e.abs()));
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!((g - e).abs() <= bound, "{what}: element {i} is {g}, expected {e} (bound {bound:e})");
    }
    Ok(())
}

/// The micro-batches as one batch, one after the other along the batch dimension.
fn concatenated(batches: &[Batch]) -> anyhow::Result<Batch> {
    let cat = |part: fn(&Batch) -> &Tensor| Tensor::cat(&batches.iter().map(part).collect::<Vec<_>>(), 0);
    Ok(Batch::new(cat(|b| &b.inputs)?, cat(|b| &b.labels)?, cat(|b| &b.mask)?)?)
}

/// The bound of [`assert_close`] for the same terms summed in another order:
/// measured within 2 ulp of f32 of the largest, 16 allowed.
const REORDERED: f64 = 16.0 * f32::EPSILON as f64;

/// One batch, activations checkpointed and kept: the whole graph's loss and
/// gradients bit for bit, but for the output layer's under the linear loss,
/// which forms it itself and sums it in f32 (see `train::step_gradients`):
/// the same terms in another order.
#[test]
fn step_gradients_are_the_whole_graphs() -> anyhow::Result<()> {
    let _shared = shared();
    step_against_whole_graph(&Device::Cpu, true)
}

/// [`step_gradients_are_the_whole_graphs`] on CUDA (feature `cuda`; skipped
/// without a GPU, failing then with `CHUNKED_CE_REQUIRE_CUDA` set), to the
/// rounding of terms summed in another order: cuBLAS picks its kernels by
/// shape and layout, which the blocks' backward by hand gives each product
/// as candle's backward does, but the GPU's bits are not held here. The
/// values that differ in their bits are counted on stderr.
#[cfg(feature = "cuda")]
#[test]
fn cuda_step_gradients_are_the_whole_graphs() -> anyhow::Result<()> {
    let _shared = shared();
    match Device::new_cuda(0) {
        Ok(device) => step_against_whole_graph(&device, false),
        Err(e) => {
            assert!(std::env::var_os("CHUNKED_CE_REQUIRE_CUDA").is_none(), "no CUDA device: {e}");
            eprintln!("SKIP cuda_step_gradients_are_the_whole_graphs: no CUDA device");
            Ok(())
        }
    }
}

/// The training step's loss and gradients on `device`, tied and untied, with
/// GPT-2's GELU and the exact one, each loss, activations checkpointed and
/// kept, against `loss.backward()` through the whole graph: bit for bit with
/// `bitwise`, else to [`REORDERED`].
fn step_against_whole_graph(device: &Device, bitwise: bool) -> anyhow::Result<()> {
    let configs = [(true, Activation::GeluTanh), (false, Activation::GeluTanh), (true, Activation::GeluErf)];
    for (tied, activation) in configs {
        let config = Config { tied, activation, ..TINY };
        let model = Gpt2::new(config, config.init(&mut Rng::new(1), device)?, device)?;
        let batch = data().batch(&mut Rng::new(2), 3, 10, device)?;
        let n = batch.valid_tokens();
        for kind in [LossKind::Chunked, LossKind::Linear, LossKind::CandleNn] {
            let whole_loss = train::batch_loss(&model, &batch, kind, n)?;
            let whole = whole_loss.backward()?;
            for keep_activations in [false, true] {
                let what = format!(
                    "{:?}, tied {tied}, {activation:?}, {kind:?}, keep_activations {keep_activations}",
                    device.location()
                );
                let (loss, grads) =
                    train::step_gradients_with(&model, std::slice::from_ref(&batch), kind, keep_activations)?;
                let whole_loss = whole_loss.to_scalar::<f32>()?;
                if bitwise {
                    assert_eq!(loss.to_bits(), whole_loss.to_bits(), "{what}: loss");
                } else {
                    assert!(
                        (loss - whole_loss).abs() <= 1e-6 * whole_loss.abs(),
                        "{what}: loss {loss} vs {whole_loss}"
                    );
                }
                let mut differ = 0;
                for (name, var) in model.named_vars() {
                    let expected = whole.get(var.as_tensor()).expect("the whole graph's gradient");
                    let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
                    assert!(!got.track_op(), "{what}: {name}'s gradient holds a graph");
                    let what = format!("{what}: {name}");
                    let output_layer = kind == LossKind::Linear && var.as_tensor().id() == model.lm_head().id();
                    if bitwise && !output_layer {
                        assert_same_bits(&what, got, expected)?;
                    } else {
                        assert_close(&what, got, expected, REORDERED)?;
                        differ += bits_differ(got, expected)?;
                    }
                }
                if !bitwise {
                    eprintln!("{what}: {differ} gradient values differ from the whole graph's in their bits");
                }
            }
        }
    }
    Ok(())
}

/// How many values of two tensors of one shape differ in their bits (as f64).
fn bits_differ(got: &Tensor, expected: &Tensor) -> anyhow::Result<usize> {
    let values = |t: &Tensor| -> anyhow::Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    let (got, expected) = (values(got)?, values(expected)?);
    Ok(got.iter().zip(&expected).filter(|(g, e)| g.to_bits() != e.to_bits()).count())
}

/// Gradient accumulation, activations kept or checkpointed: two micro-batches
/// with different numbers of valid tokens give the loss and gradients of one
/// batch holding both, through the whole graph (each micro-batch's share
/// divided by the step's token count, the shares summed), and the two ways
/// agree bit for bit.
#[test]
fn micro_batches_add_up_to_the_whole_batch() -> anyhow::Result<()> {
    let _shared = shared();
    for tied in [true, false] {
        let config = Config { tied, ..TINY };
        let model = Gpt2::new(config, config.init(&mut Rng::new(1), &Device::Cpu)?, &Device::Cpu)?;
        let micro = [
            data().batch(&mut Rng::new(8), 2, 10, &Device::Cpu)?,
            data().batch(&mut Rng::new(9), 1, 10, &Device::Cpu)?,
        ];
        let whole = concatenated(&micro)?;
        let n = whole.valid_tokens();
        for kind in [LossKind::Chunked, LossKind::Linear, LossKind::CandleNn] {
            let what = format!("tied {tied}, {kind:?}");
            let whole_loss = train::batch_loss(&model, &whole, kind, n)?;
            let expected = whole_loss.backward()?;
            let whole_loss = whole_loss.to_scalar::<f32>()?;
            let mut ways = Vec::new();
            for keep_activations in [false, true] {
                let what = format!("{what}, keep_activations {keep_activations}");
                let (loss, grads) = train::step_gradients_with(&model, &micro, kind, keep_activations)?;
                // Two f32 shares added, against one sum: an ulp or two.
                assert!((loss - whole_loss).abs() <= 1e-6 * whole_loss.abs(), "{what}: loss {loss} vs {whole_loss}");
                for (name, var) in model.named_vars() {
                    let want = expected.get(var.as_tensor()).expect("the whole batch's gradient");
                    let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
                    // The same per-token terms, summed per micro-batch and then added.
                    assert_close(&format!("{what}: {name}"), got, want, REORDERED)?;
                }
                ways.push((loss, grads));
            }
            let [(checkpointed_loss, checkpointed), (kept_loss, kept)] = &ways[..] else { unreachable!() };
            assert_eq!(checkpointed_loss.to_bits(), kept_loss.to_bits(), "{what}: loss, checkpointed and kept");
            for (name, var) in model.named_vars() {
                let (a, b) = (
                    checkpointed.get(var.as_tensor()).expect("a gradient"),
                    kept.get(var.as_tensor()).expect("a gradient"),
                );
                assert_same_bits(&format!("{what}: {name}, checkpointed and kept"), a, b)?;
            }
        }
    }
    Ok(())
}

/// What checkpointing saves: eight blocks at 4 x 64 tokens, whose backward
/// with the activations kept holds every block's at once, and through
/// checkpoints one block's and the blocks' inputs. Measured (2026-12-05,
/// the blocks' backward by hand): 1.3 MB checkpointed, 5.6 MB kept (23%).
#[test]
fn checkpointing_holds_a_fraction_of_the_heap() -> anyhow::Result<()> {
    let _alone = alone();
    let config = Config::gpt2(23, 64, 32, 8, 2);
    let model = Gpt2::new(config, config.init(&mut Rng::new(10), &Device::Cpu)?, &Device::Cpu)?;
    let batch = [data().batch(&mut Rng::new(11), 4, 64, &Device::Cpu)?];
    // Once first: rayon's threads and whatever else is set up on first use.
    train::step_gradients_with(&model, &batch, LossKind::Chunked, true)?;
    let step = |keep_activations| train::step_gradients_with(&model, &batch, LossKind::Chunked, keep_activations);
    let (checkpointed, checkpointed_peak) = peak_heap(|| step(false));
    let (kept, kept_peak) = peak_heap(|| step(true));
    assert_eq!(checkpointed?.0.to_bits(), kept?.0.to_bits(), "the same loss");
    eprintln!("peak heap: {checkpointed_peak} bytes checkpointed, {kept_peak} kept");
    assert!(
        checkpointed_peak * 5 < kept_peak * 2,
        "checkpointing holds {checkpointed_peak} bytes at its peak, keeping the activations {kept_peak}: not under 40%"
    );
    Ok(())
}

#[test]
fn hidden_states_without_a_graph_are_the_hidden_states() -> anyhow::Result<()> {
    let _shared = shared();
    let model = Gpt2::new(TINY, TINY.init(&mut Rng::new(3), &Device::Cpu)?, &Device::Cpu)?;
    let batch = data().batch(&mut Rng::new(4), 2, 12, &Device::Cpu)?;
    let hidden = model.hidden_no_grad(&batch.inputs)?;
    assert!(!hidden.track_op(), "detached");
    assert_same_bits("hidden states", &hidden, &model.hidden(&batch.inputs)?)?;
    let too_long = Tensor::zeros((1, TINY.context + 1), DType::U32, &Device::Cpu)?;
    assert!(model.hidden_no_grad(&too_long).is_err());
    Ok(())
}

/// Parameters of several shapes (one larger than a CUDA launch's grid of
/// 4096 x 256 threads covers in one sweep, one scalar-like), gradients from a
/// seeded stream, on `device`.
fn parameters(dtype: DType, rng: &mut Rng, device: &Device) -> anyhow::Result<Vec<Var>> {
    [vec![37, 19], vec![5], vec![1], vec![1100, 1000]]
        .into_iter()
        .map(|shape| {
            let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.normal() as f32).collect();
            Ok(Var::from_tensor(&Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)?)
        })
        .collect()
}

#[test]
fn adamw_is_candle_nns_bit_for_bit() -> anyhow::Result<()> {
    adamw_matches_candle_nn(&Device::Cpu)
}

/// On CUDA, f32 runs `adamw.cu`'s kernels; candle-nn runs candle's CUDA
/// kernels, each operation rounded on its own, as ours (no contraction).
/// Skips without a GPU (fails with `CHUNKED_CE_REQUIRE_CUDA` set).
#[cfg(feature = "cuda")]
#[test]
fn adamw_is_candle_nns_bit_for_bit_on_cuda() -> anyhow::Result<()> {
    match Device::new_cuda(0) {
        Ok(device) => adamw_matches_candle_nn(&device),
        Err(e) => {
            assert!(std::env::var_os("CHUNKED_CE_REQUIRE_CUDA").is_none(), "no CUDA device: {e}");
            eprintln!("SKIP adamw_is_candle_nns_bit_for_bit_on_cuda: no CUDA device");
            Ok(())
        }
    }
}

fn adamw_matches_candle_nn(device: &Device) -> anyhow::Result<()> {
    let _shared = shared();
    // f32: the in-place update (Rust on the CPU, adamw.cu on CUDA); f64: the
    // tensor operations it falls back to.
    for dtype in [DType::F32, DType::F64] {
        let (ours, theirs) =
            (parameters(dtype, &mut Rng::new(5), device)?, parameters(dtype, &mut Rng::new(5), device)?);
        let params = ParamsAdamW { lr: 3e-2, weight_decay: 0.1, ..Default::default() };
        let mut our_opt = adamw::AdamW::new(ours.clone(), params.clone())?;
        let mut their_opt = candle_nn::AdamW::new(theirs.clone(), params)?;
        let mut rng = Rng::new(6);
        for step in 0..5 {
            // Gradients of sum(w * theta²), with zeros among them.
            let weights: Vec<Vec<f32>> = ours
                .iter()
                .map(|var| (0..var.elem_count()).map(|i| if i % 4 == 0 { 0.0 } else { rng.normal() as f32 }).collect())
                .collect();
            let grads = |vars: &[Var]| -> anyhow::Result<candle::backprop::GradStore> {
                let mut total = Tensor::zeros((), dtype, device)?;
                for (var, w) in vars.iter().zip(&weights) {
                    let w = Tensor::from_vec(w.clone(), var.shape(), device)?.to_dtype(dtype)?;
                    total = (total + (var.as_tensor().sqr()? * w)?.sum_all()?)?;
                }
                Ok(total.backward()?)
            };
            let (g_ours, g_theirs) = (grads(&ours)?, grads(&theirs)?);
            if step == 3 {
                our_opt.set_learning_rate(1e-2);
                their_opt.set_learning_rate(1e-2);
            }
            // From step 2 on, the gradients scaled as clipping scales them: ours
            // through `step_scaled`, candle-nn's through scaled copies.
            if step < 2 {
                our_opt.step(&g_ours)?;
                their_opt.step(&g_theirs)?;
            } else {
                // Any shape of one value (here [1, 1] for f64's tensor path).
                let scale = Tensor::new(0.37f64, device)?;
                our_opt.step_scaled(&g_ours, Some(&scale.reshape((1, 1))?))?;
                let mut scaled = candle::backprop::GradStore::default();
                for var in &theirs {
                    let g = g_theirs.get(var.as_tensor()).expect("a gradient");
                    scaled.insert(var.as_tensor(), g.broadcast_mul(&scale.to_dtype(g.dtype())?)?);
                }
                their_opt.step(&scaled)?;
            }
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_same_bits(&format!("{dtype:?} step {step}, parameter {i}"), a.as_tensor(), b.as_tensor())?;
            }
        }
        // A scale of two values, of integers, or (on CUDA) on the host is an
        // error before any parameter moves.
        let before: Vec<Tensor> = ours.iter().map(|v| v.as_tensor().copy()).collect::<candle::Result<_>>()?;
        let grads = (ours[0].as_tensor().sqr()?.sum_all()?).backward()?;
        let mut bad = vec![
            (Tensor::ones(2, DType::F32, device)?, "one float value"),
            (Tensor::ones((), DType::U32, device)?, "one float value"),
        ];
        if !device.is_cpu() {
            bad.push((Tensor::ones((), DType::F32, &Device::Cpu)?, "the parameters on"));
        }
        for (scale, why) in bad {
            let err = our_opt.step_scaled(&grads, Some(&scale)).expect_err("a bad scale").to_string();
            assert!(err.contains(why), "{err}");
        }
        for (i, (var, was)) in ours.iter().zip(&before).enumerate() {
            assert_same_bits(&format!("{dtype:?} parameter {i} after refused steps"), var.as_tensor(), was)?;
        }
    }
    Ok(())
}
