//! One table: our cross-entropy (fused and primitive, gradient in place or not)
//! against `candle_nn::loss::cross_entropy`, on the same inputs in one process,
//! with the machine's bandwidth and first-touch floors.
//!
//! `cargo bench --bench ce_table` (all shapes), or with arguments
//! `cargo bench --bench ce_table -- 2048x50257 [runs]`; `-- --linear
//! [NxHxV] [runs]` (default 4096x768x50257) times the fused linear loss against
//! its floor and against materialised logits instead, then by mode (training,
//! evaluation, frozen head; `-- --linear --modes` the by-mode table alone;
//! `--ignore-every=K` ignores every K-th label there, 10 by default as in
//! `scripts/torch_linear_ce_bench.py`, 0 for none); `-- --options [NxV]
//! [runs]` (default 2048x50257) times the loss options against the plain loss;
//! `-- --probes [runs]` times first-touch from one thread against several, and
//! candle's accumulation of a transposed gradient against a contiguous one;
//! `-- --steps [runs] [chunk,chunk,..] [--ignore-every=K]` times training steps
//! of the linear loss alone at 4096 x 768 x 50257 f32 (forward and
//! `backward()`), the chunk lengths interleaved step by step (0: automatic;
//! default 0 and 5 steps; no label ignored unless `--ignore-every`);
//! `-- --linear --direct [NxHxV] [runs] [--bf16]` times a training step of
//! the linear loss (f32, or bf16) through candle's autograd against
//! `loss_and_grads`, `accumulate_grads` and `loss_and_grads` with
//! `low_memory`, with time, the allocator's peak and the RSS rise
//! (`scripts/torch_linear_ce_bench.py --device cpu` gives PyTorch's, RSS
//! included).
//! Peak extra memory is counted by a global allocator: bytes live above those
//! at the start of the measured call, as a multiple of the logits' size.

#[path = "../src/gemm/mod.rs"]
#[allow(dead_code)]
mod routes;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{ChunkedCrossEntropy, LinearCrossEntropy, LinearGradAccumulator};
use rayon::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The system allocator, counting live bytes and their high-water mark.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Relaxed);
        note_alloc(new_size);
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note_alloc(size: usize) {
    let live = LIVE.fetch_add(size, Relaxed) + size;
    PEAK.fetch_max(live, Relaxed);
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`, returning its result and the peak bytes allocated above those live before it.
fn with_peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let out = f();
    (out, PEAK.load(Relaxed) - base)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Memory bandwidth over a warm 256 MiB buffer split across the rayon
/// threads (as the kernels are), in bytes per second: `(read, read_write)`,
/// where read is a sum over the buffer and read+write an in-place update
/// (each byte read once and written once, counted twice): the access patterns
/// of our forward and backward ops.
fn bandwidth() -> (f64, f64) {
    let mut buf = vec![1f32; 64 << 20];
    let bytes = (buf.len() * 4) as f64;
    let piece = buf.len() / rayon::current_num_threads();
    let time = |f: &mut dyn FnMut()| {
        f();
        median(
            (0..5)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed()
                })
                .collect(),
        )
    };
    let read = time(&mut || {
        // Integer adds vectorise (an f32 sum would be one dependent add per element).
        let total: u32 = buf.par_chunks(piece).map(|c| c.iter().fold(0u32, |a, x| a.wrapping_add(x.to_bits()))).sum();
        std::hint::black_box(total);
    });
    let read_write = time(&mut || buf.par_chunks_mut(piece).for_each(|c| c.iter_mut().for_each(|x| *x *= 0.999)));
    (bytes / read.as_secs_f64(), 2.0 * bytes / read_write.as_secs_f64())
}

/// Time to first-touch a fresh `bytes` buffer (one write per 4 KiB page),
/// split over `threads` of rayon's threads (one piece per thread).
fn first_touch(bytes: usize, threads: usize) -> Duration {
    let piece = bytes / threads + 1;
    let times = (0..3)
        .map(|_| {
            let mut buf = vec![0u8; bytes];
            let start = Instant::now();
            buf.par_chunks_mut(piece).for_each(|part| part.iter_mut().step_by(4096).for_each(|b| *b = 1));
            let t = start.elapsed();
            std::hint::black_box(&buf);
            t
        })
        .collect();
    median(times)
}

struct Row {
    name: String,
    forward: Option<Duration>,
    backward: Option<Duration>,
    end_to_end: Duration,
    peak_extra: usize,
}

/// `loss.backward()` end to end (forward included), median of `runs`, with the peak of the last run.
fn end_to_end(runs: usize, logits: &Tensor, loss_fn: impl Fn(&Tensor) -> candle::Result<Tensor>) -> (Duration, usize) {
    let mut times = Vec::new();
    let mut peak = 0;
    for _ in 0..runs {
        let var = Var::from_tensor(logits).unwrap();
        let (t, p) = with_peak(|| {
            let start = Instant::now();
            let loss = loss_fn(var.as_tensor()).unwrap();
            let grads = loss.backward().unwrap();
            assert!(grads.get(var.as_tensor()).is_some());
            start.elapsed()
        });
        times.push(t);
        peak = p;
    }
    (median(times), peak)
}

/// Our loss configured as `ce` (`inplace` must match its `inplace_grad`).
fn ours(runs: usize, logits: &Tensor, labels: &Tensor, ce: &ChunkedCrossEntropy, inplace: bool, name: String) -> Row {
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    for _ in 0..runs {
        // In-place backward destroys its logits: give it a copy, made outside the timing.
        let input = if inplace { logits.copy().unwrap() } else { logits.clone() };
        let (f, b, grad) = ce.bench_ops(&input, labels).unwrap();
        std::hint::black_box(grad);
        fwd.push(f);
        bwd.push(b);
    }
    let (e2e, peak_extra) = end_to_end(runs, logits, |x| {
        // The in-place variant writes over `x`, which is a fresh Var copy each run.
        ce.forward(x, labels, None)
    });
    Row { name, forward: Some(median(fwd)), backward: Some(median(bwd)), end_to_end: e2e, peak_extra }
}

/// The fused loss with each option, and all of them, against the plain loss
/// (`-- --options [NxV] [runs]`): the optional terms' cost.
fn options_table(n: usize, v: usize, runs: usize) {
    let device = Device::Cpu;
    println!("loss options, {n}x{v}, fused kernels ({}), median of {runs}", candle_chunked_ce::instruction_set());
    println!("{:<6} {:<40} {:>9} {:>9} {:>9} {:>12}", "dtype", "options", "fwd op", "bwd op", "e2e", "e2e / plain");
    let plain = ChunkedCrossEntropy::default();
    let configs = [
        ("none", plain.clone()),
        ("label_smoothing 0.1", plain.clone().label_smoothing(0.1)),
        ("z_loss 1e-4", plain.clone().z_loss(1e-4)),
        ("logit_softcap 30", plain.clone().logit_softcap(Some(30.0))),
        ("all three", plain.clone().label_smoothing(0.1).z_loss(1e-4).logit_softcap(Some(30.0))),
    ];
    for dtype in [DType::F32, DType::BF16] {
        let logits = Tensor::randn(0f32, 2.0, (n, v), &device).unwrap().to_dtype(dtype).unwrap();
        let labels = Tensor::rand(0f32, v as f32, n, &device).unwrap().to_dtype(DType::I64).unwrap();
        let mut reference = None;
        for (name, ce) in &configs {
            let row = ours(runs, &logits, &labels, ce, false, name.to_string());
            let plain_e2e = *reference.get_or_insert(row.end_to_end);
            println!(
                "{:<6} {:<40} {:>9.1} {:>9.1} {:>9.1} {:>11.2}x",
                format!("{dtype:?}").to_lowercase(),
                row.name,
                ms(row.forward.unwrap()),
                ms(row.backward.unwrap()),
                ms(row.end_to_end),
                row.end_to_end.as_secs_f64() / plain_e2e.as_secs_f64()
            );
        }
    }
}

fn candle_nn(runs: usize, logits: &Tensor, labels_u32: &Tensor) -> Row {
    let (e2e, peak_extra) =
        end_to_end(runs, logits, |x| candle_nn::loss::cross_entropy(&x.to_dtype(DType::F32)?, labels_u32));
    let name = if logits.dtype() == DType::F32 { "candle-nn".into() } else { "candle-nn (upcast to f32)".into() };
    Row { name, forward: None, backward: None, end_to_end: e2e, peak_extra }
}

/// Physical memory in bytes, from /proc/meminfo (0 if unreadable).
fn total_memory() -> usize {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = info.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|l| l.trim().strip_suffix("kB"));
    kib.and_then(|k| k.trim().parse::<usize>().ok()).map_or(0, |k| k * 1024)
}

/// `hidden [N, H] @ weight^T [H, V]` then the loss, end to end with backward
/// into `hidden` and `weight` (f32), against the floor of the work no
/// implementation avoids: the three matmuls (logits, `G · W`, `Gᵀ · H`) and one
/// fused cross-entropy pass (forward and in-place gradient), each timed on the
/// same chunks of rows. Ours takes the gradients from its forward pass (a
/// `Mean` loss) or recomputes the logits in backward (`Reduction::None`); the
/// materialised-logits paths run only where they fit in memory. Peak extra
/// memory is counted by the allocator for the forward call alone and end to
/// end (candle's backprop adds each gradient into a fresh zero buffer, which
/// the allocator counts although reading calloc'd zeros touches no physical
/// memory), against the bound `chunk·V·4 + N·H·4 + V·H·4` bytes; `RSS+` is
/// the rise of the process's peak resident memory during the call.
fn linear_table(n: usize, h: usize, v: usize, runs: usize) {
    let device = Device::Cpu;
    let hidden = Tensor::randn(0f32, 1.0, (n, h), &device).unwrap();
    let weight = Tensor::randn(0f32, 0.05, (v, h), &device).unwrap();
    let labels = Tensor::rand(0f32, v as f32, n, &device).unwrap().to_dtype(DType::U32).unwrap();
    let chunk = (n * h / v).max(1024).min(n);
    let logits_bytes = (n * v * 4) as f64;
    let bound = (chunk * v * 4 + n * h * 4 + v * h * 4) as f64;
    println!(
        "linear cross-entropy, N={n} H={h} V={v} f32, {} threads: logits would be {:.0} MB; automatic chunk {chunk} rows; memory bound chunk*V*4 + N*H*4 + V*H*4 = {:.0} MB",
        rayon::current_num_threads(),
        logits_bytes / 1e6,
        bound / 1e6
    );
    let floor = linear_floor(&hidden, &weight, &labels, chunk, runs);
    println!(
        "{:<50} {:>9} {:>9} {:>11} {:>10} {:>8} {:>8} {:>9} {:>13}",
        "implementation",
        "e2e ms",
        "vs floor",
        "fwd peak MB",
        "e2e peak MB",
        "/logits",
        "/bound",
        "RSS+ MB",
        "min-max ms"
    );
    println!("{:<50} {:>9.1} {:>9}", "floor: 3 matmuls + 1 fused CE pass, per chunk", ms(floor), "1.00x");
    let ce = ChunkedCrossEntropy::default();
    let linear = LinearCrossEntropy::default();
    let linear_none = LinearCrossEntropy::default().reduction(candle_chunked_ce::Reduction::None);
    type LossFn<'a> = Box<dyn Fn(&Tensor, &Tensor) -> candle::Result<Tensor> + 'a>;
    let ram = total_memory() as f64;
    let mut cases: Vec<(&str, LossFn)> = vec![
        ("ours LinearCrossEntropy (gradients from forward)", Box::new(|x, w| linear.forward(x, w, &labels, None))),
        (
            "ours LinearCrossEntropy (backward recomputes)",
            Box::new(|x, w| linear_none.forward(x, w, &labels, None)?.sum_all()),
        ),
    ];
    // Materialised logits: ours peaks near 4x the logits, candle-nn near 11x.
    if 5.0 * logits_bytes < 0.8 * ram {
        cases.push(("ours over hidden @ weight^T", Box::new(|x, w| ce.forward(&x.matmul(&w.t()?)?, &labels, None))));
    }
    if 12.0 * logits_bytes < 0.8 * ram {
        cases.push((
            "candle-nn over hidden @ weight^T",
            Box::new(|x, w| candle_nn::loss::cross_entropy(&x.matmul(&w.t()?)?, &labels)),
        ));
    }
    for (name, loss_fn) in cases {
        let mut times = Vec::new();
        let (mut peak, mut forward_peak, mut rss) = (0, 0, 0);
        for _ in 0..runs {
            let (x, w) = (Var::from_tensor(&hidden).unwrap(), Var::from_tensor(&weight).unwrap());
            let rss_base = reset_rss_peak();
            let ((t, fp), p) = with_peak(|| {
                let start = Instant::now();
                let (loss, fp) = with_peak(|| loss_fn(x.as_tensor(), w.as_tensor()).unwrap());
                let grads = loss.backward().unwrap();
                assert!(grads.get(x.as_tensor()).is_some() && grads.get(w.as_tensor()).is_some());
                (start.elapsed(), fp)
            });
            rss = rss_kib("VmHWM:").saturating_sub(rss_base) * 1024;
            times.push(t);
            (peak, forward_peak) = (p, fp);
        }
        let spread = format!("{:.0}-{:.0}", ms(*times.iter().min().unwrap()), ms(*times.iter().max().unwrap()));
        let t = median(times);
        println!(
            "{name:<50} {:>9.1} {:>8.2}x {:>11.0} {:>10.0} {:>7.2}x {:>7.2}x {:>9.0} {spread:>13}",
            ms(t),
            t.as_secs_f64() / floor.as_secs_f64(),
            forward_peak as f64 / 1e6,
            peak as f64 / 1e6,
            peak as f64 / logits_bytes,
            peak as f64 / bound,
            rss as f64 / 1e6
        );
    }
}

/// Two costs the linear loss's design works around, at GPT-2's `[V, H]` =
/// `[50257, 768]` f32 (the weight gradient): first-touching a fresh buffer
/// from rayon's threads at once against from one thread (`faulted_zeros` in
/// `src/linear/products.rs`), and candle's backprop accumulation of a returned
/// gradient (`zeros_like` + `add`) when it is the transposed view our CPU
/// accumulator hands out, against a contiguous one.
fn probes_table(runs: usize) {
    let (v, h) = (50257, 768);
    let bytes = v * h * 4;
    let threads = rayon::current_num_threads();
    println!("first touch of a fresh {:.0} MB buffer, median of 3:", bytes as f64 / 1e6);
    println!("  from {threads} threads: {:.1} ms", ms(first_touch(bytes, threads)));
    println!("  from one thread: {:.1} ms", ms(first_touch(bytes, 1)));
    // One 1024-row chunk's `dWᵀ += Xᵀ·G` into the [H, V] accumulator, as
    // `src/linear/products.rs` runs it: into a fresh zeroed buffer that the product's
    // threads fault in, into the same buffer again, and into a fresh buffer
    // first touched by one thread (that touch included).
    let rows = 1024;
    let x: Vec<f32> = (0..rows * h).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
    let g: Vec<f32> = (0..rows * v).map(|i| ((i * 104729 % 1000) as f32 - 500.0) * 1e-6).collect();
    let product = |acc: &mut [f32]| routes::add_matmul_tn(acc, &x, &g, (h, v, rows));
    let (mut fresh, mut again, mut touched) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut acc = vec![0f32; h * v];
        let start = Instant::now();
        product(&mut acc);
        fresh.push(start.elapsed());
        let start = Instant::now();
        product(&mut acc);
        again.push(start.elapsed());
        drop(acc);
        let start = Instant::now();
        let mut acc = vec![0f32; h * v];
        acc.iter_mut().step_by(1024).for_each(|a| *a = 0.0);
        product(&mut acc);
        touched.push(start.elapsed());
        std::hint::black_box(acc);
    }
    println!("one 1024-row chunk's weight-gradient product into the f32 [H, V] accumulator, median of {runs}:");
    println!("  into a fresh buffer (faulted in by the product's threads): {:.1} ms", ms(median(fresh)));
    println!("  into the same buffer again: {:.1} ms", ms(median(again)));
    println!("  into a fresh buffer first touched by one thread (touch included): {:.1} ms", ms(median(touched)));
    let device = Device::Cpu;
    let acc = Tensor::randn(0f32, 1.0, (h, v), &device).unwrap();
    let contiguous = acc.t().unwrap().contiguous().unwrap();
    println!("candle's accumulation of a [{v}, {h}] f32 gradient (zeros + add), median of {runs}:");
    for (name, grad) in [("transposed view of [H, V]", acc.t().unwrap()), ("contiguous [V, H]", contiguous)] {
        let times = (0..runs)
            .map(|_| {
                let start = Instant::now();
                let zeros = Tensor::zeros((v, h), DType::F32, &device).unwrap();
                let sum = (&zeros + &grad).unwrap();
                let t = start.elapsed();
                std::hint::black_box(sum);
                t
            })
            .collect();
        println!("  {name}: {:.1} ms", ms(median(times)));
    }
}

/// f32 hidden states `[n, h]` and weight `[v, h]` (logits of order 1), and
/// labels `[n]` i64 with every `ignore_every`-th one ignored (0: none).
fn linear_inputs(n: usize, h: usize, v: usize, ignore_every: usize) -> (Tensor, Tensor, Tensor) {
    let device = Device::Cpu;
    let hidden = Tensor::randn(0f32, 1.0, (n, h), &device).unwrap();
    let weight = Tensor::randn(0f32, 0.05, (v, h), &device).unwrap();
    let ignored = |i: usize| ignore_every > 0 && i.is_multiple_of(ignore_every);
    let labels: Vec<i64> = (0..n).map(|i| if ignored(i) { -100 } else { ((i * 7919) % v) as i64 }).collect();
    (hidden, weight, Tensor::new(labels.as_slice(), &device).unwrap())
}

/// "1 in K" or "no", for the tables' titles.
fn ignored_share(ignore_every: usize) -> String {
    if ignore_every > 0 {
        format!("1 in {ignore_every}")
    } else {
        "no".into()
    }
}

/// Training steps (forward and `backward()`) of the linear loss alone at
/// 4096 x 768 x 50257 f32, every `ignore_every`-th label ignored (0: none),
/// one step per chunk length (0: automatic) in turn, `runs` rounds; the
/// median and every time per chunk length.
fn training_steps(runs: usize, chunk_lens: &[usize], ignore_every: usize) {
    let (n, h, v) = (4096, 768, 50257);
    let (hidden, weight, labels) = linear_inputs(n, h, v, ignore_every);
    let mut times = vec![Vec::new(); chunk_lens.len()];
    for _ in 0..runs {
        for (&chunk_len, times) in chunk_lens.iter().zip(&mut times) {
            let linear = LinearCrossEntropy::default().chunk_len((chunk_len > 0).then_some(chunk_len));
            let (x, w) = (Var::from_tensor(&hidden).unwrap(), Var::from_tensor(&weight).unwrap());
            let start = Instant::now();
            let loss = linear.forward(x.as_tensor(), w.as_tensor(), &labels, None).unwrap();
            let grads = loss.backward().unwrap();
            times.push(start.elapsed());
            drop(grads);
        }
    }
    let share = ignored_share(ignore_every);
    println!("linear loss training steps, N={n} H={h} V={v} f32, {share} labels ignored, {runs} rounds:");
    for (chunk_len, times) in chunk_lens.iter().zip(times) {
        let all: Vec<String> = times.iter().map(|t| format!("{:.0}", ms(*t))).collect();
        println!("  chunk_len {chunk_len}: median {:.0} ms, all [{}]", ms(median(times)), all.join(", "));
    }
}

/// The three ways a linear loss is called in practice, each timed as one
/// call (forward, and backward when anything wants a gradient), ours against
/// the materialised logits through our logits loss, on the same inputs: a
/// training step (hidden states and weight are variables), evaluation
/// (nothing is), and a frozen head (only the hidden states are, as with LoRA).
/// `scripts/torch_linear_ce_bench.py --modes` times PyTorch's the same way.
fn linear_modes_table(n: usize, h: usize, v: usize, runs: usize, ignore_every: usize) {
    // Every `ignore_every`-th label ignored (10%, by default), as in PyTorch's script.
    let (hidden, weight, labels) = linear_inputs(n, h, v, ignore_every);
    let linear = LinearCrossEntropy::default();
    let ce = ChunkedCrossEntropy::default();
    let materialised = 5.0 * ((n * v * 4) as f64) < 0.8 * total_memory() as f64;
    let share = ignored_share(ignore_every);
    println!("\nlinear cross-entropy by mode, N={n} H={h} V={v} f32, {share} labels ignored: median ms over {runs} runs (min-max)");
    println!("{:<12} {:>22} {:>22}", "mode", "LinearCrossEntropy", "ours over logits");
    for (mode, hidden_var, weight_var) in
        [("training", true, true), ("evaluation", false, false), ("frozen head", true, false)]
    {
        let mut row = format!("{mode:<12}");
        for over_logits in [false, true] {
            if over_logits && !materialised {
                row += &format!(" {:>22}", "-");
                continue;
            }
            let mut times = Vec::new();
            for _ in 0..runs {
                let input = |t: &Tensor, var: bool| {
                    if var {
                        Var::from_tensor(t).unwrap().as_tensor().clone()
                    } else {
                        t.clone()
                    }
                };
                let (x, w) = (input(&hidden, hidden_var), input(&weight, weight_var));
                let start = Instant::now();
                let loss = if over_logits {
                    ce.forward(&x.matmul(&w.t().unwrap()).unwrap(), &labels, None).unwrap()
                } else {
                    linear.forward(&x, &w, &labels, None).unwrap()
                };
                if hidden_var || weight_var {
                    let grads = loss.backward().unwrap();
                    assert_eq!(grads.get(&w).is_some(), weight_var, "{mode}: weight gradient");
                } else {
                    loss.to_scalar::<f32>().unwrap();
                }
                times.push(start.elapsed());
            }
            let spread = format!("({:.0}-{:.0})", ms(*times.iter().min().unwrap()), ms(*times.iter().max().unwrap()));
            row += &format!(" {:>9.0} {spread:>12}", ms(median(times)));
        }
        println!("{row}");
    }
}

/// A training step of the linear loss, three ways, on the same inputs (every
/// `ignore_every`-th label ignored): through candle's autograd (`forward` on
/// variables, then `backward()`, which adds each returned gradient into fresh
/// zeros), `loss_and_grads` (the gradients handed over, nothing recorded),
/// and `accumulate_grads` into an accumulator made beforehand (as a loop over
/// micro-batches keeps it). Median ms (min-max) over `runs`, the allocator's
/// peak above what was live before the call, and the rise of the process's
/// peak RSS during it (a fresh buffer counts only once touched).
fn direct_table(n: usize, h: usize, v: usize, runs: usize, ignore_every: usize, dtype: DType) {
    let (hidden, weight, labels) = linear_inputs(n, h, v, ignore_every);
    let (hidden, weight) = (hidden.to_dtype(dtype).unwrap(), weight.to_dtype(dtype).unwrap());
    let linear = LinearCrossEntropy::default();
    let lean = linear.clone().low_memory(true);
    let grad_mb = (v * h * dtype.size_in_bytes()) as f64 / 1e6;
    println!(
        "linear cross-entropy training step, N={n} H={h} V={v} {dtype:?}, {} labels ignored, {} threads; the weight gradient is {grad_mb:.0} MB",
        ignored_share(ignore_every),
        rayon::current_num_threads()
    );
    println!("{:<44} {:>9} {:>13} {:>10} {:>9}", "path", "ms", "min-max", "peak MB", "RSS+ MB");
    let mut acc = LinearGradAccumulator::new(&weight, None).unwrap();
    let paths = [
        (Direct::Autograd, "autograd: forward + backward()"),
        (Direct::LossAndGrads, "loss_and_grads"),
        (Direct::Accumulate, "accumulate_grads (accumulator kept)"),
        (Direct::LowMemory, "loss_and_grads, low_memory"),
    ];
    for (path, name) in paths {
        let (mut times, mut peak, mut rss) = (Vec::new(), 0, 0);
        for _ in 0..runs {
            let (x, w) = (Var::from_tensor(&hidden).unwrap(), Var::from_tensor(&weight).unwrap());
            let rss_base = reset_rss_peak();
            let (t, p) = with_peak(|| {
                let start = Instant::now();
                match path {
                    Direct::LossAndGrads => drop(linear.loss_and_grads(&hidden, &weight, None, &labels, None).unwrap()),
                    Direct::LowMemory => drop(lean.loss_and_grads(&hidden, &weight, None, &labels, None).unwrap()),
                    Direct::Accumulate => {
                        drop(linear.accumulate_grads(&hidden, &weight, None, &labels, None, None, &mut acc).unwrap())
                    }
                    Direct::Autograd => {
                        let loss = linear.forward(x.as_tensor(), w.as_tensor(), &labels, None).unwrap();
                        let grads = loss.backward().unwrap();
                        assert!(grads.get(w.as_tensor()).is_some());
                    }
                }
                start.elapsed()
            });
            rss = rss_kib("VmHWM:").saturating_sub(rss_base) * 1024;
            times.push(t);
            peak = p;
        }
        let spread = format!("{:.0}-{:.0}", ms(*times.iter().min().unwrap()), ms(*times.iter().max().unwrap()));
        println!(
            "{name:<44} {:>9.0} {spread:>13} {:>10.0} {:>9.0}",
            ms(median(times)),
            peak as f64 / 1e6,
            rss as f64 / 1e6
        );
    }
}

/// How [`direct_table`] takes the linear loss's gradients.
#[derive(Clone, Copy)]
enum Direct {
    Autograd,
    LossAndGrads,
    Accumulate,
    LowMemory,
}

/// Resets the process's peak resident set size (Linux `clear_refs`) and
/// returns the current one, in KiB (0 where unsupported).
fn reset_rss_peak() -> usize {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    rss_kib("VmRSS:")
}

/// A KiB field of /proc/self/status (0 if unreadable).
fn rss_kib(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let value = status.lines().find_map(|l| l.strip_prefix(field)).and_then(|l| l.trim().strip_suffix("kB"));
    value.and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// The floor of [`linear_table`]: per chunk of rows, the logits matmul, our
/// fused forward and in-place gradient, `G · W` and `Gᵀ · H`, each timed
/// alone; the median over `runs` of their sum.
fn linear_floor(hidden: &Tensor, weight: &Tensor, labels: &Tensor, chunk: usize, runs: usize) -> Duration {
    let n = hidden.dim(0).unwrap();
    let labels = labels.to_dtype(DType::I64).unwrap();
    let ce = ChunkedCrossEntropy::default().inplace_grad(true);
    let wt = weight.t().unwrap();
    let totals = (0..runs)
        .map(|_| {
            let mut total = Duration::ZERO;
            for start in (0..n).step_by(chunk) {
                let len = chunk.min(n - start);
                let x = hidden.narrow(0, start, len).unwrap();
                let t = Instant::now();
                let logits = x.matmul(&wt).unwrap();
                total += t.elapsed();
                let (fwd, bwd, grad) = ce.bench_ops(&logits, &labels.narrow(0, start, len).unwrap()).unwrap();
                total += fwd + bwd;
                let t = Instant::now();
                std::hint::black_box(grad.matmul(weight).unwrap());
                std::hint::black_box(grad.t().unwrap().matmul(&x).unwrap());
                total += t.elapsed();
            }
            total
        })
        .collect();
    median(totals)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let ignore_every =
        std::env::args().find_map(|a| a.strip_prefix("--ignore-every=").map(|k| k.parse().expect("--ignore-every=K")));
    if std::env::args().any(|a| a == "--linear") {
        let (n, h, v) = match args.first() {
            Some(s) => {
                let dims: Vec<usize> = s.split('x').map(|d| d.parse().expect("shape as NxHxV")).collect();
                (dims[0], dims[1], dims[2])
            }
            None => (4096, 768, 50257),
        };
        let runs = args.get(1).map_or(3, |r| r.parse().unwrap());
        if std::env::args().any(|a| a == "--direct") {
            let dtype = if std::env::args().any(|a| a == "--bf16") { DType::BF16 } else { DType::F32 };
            direct_table(n, h, v, runs, ignore_every.unwrap_or(10), dtype);
            return;
        }
        if !std::env::args().any(|a| a == "--modes") {
            linear_table(n, h, v, runs);
        }
        linear_modes_table(n, h, v, runs, ignore_every.unwrap_or(10));
        return;
    }
    let nxv = |s: &String| -> (usize, usize) {
        let (n, v) = s.split_once('x').expect("shape as NxV");
        (n.parse().unwrap(), v.parse().unwrap())
    };
    if std::env::args().any(|a| a == "--steps") {
        let chunks = args.get(1).map_or(vec![0], |c| c.split(',').map(|c| c.parse().expect("chunk lengths")).collect());
        training_steps(args.first().map_or(5, |r| r.parse().unwrap()), &chunks, ignore_every.unwrap_or(0));
        return;
    }
    if std::env::args().any(|a| a == "--probes") {
        probes_table(args.first().map_or(5, |r| r.parse().unwrap()));
        return;
    }
    if std::env::args().any(|a| a == "--options") {
        let (n, v) = args.first().map_or((2048, 50257), nxv);
        options_table(n, v, args.get(1).map_or(5, |r| r.parse().unwrap()));
        return;
    }
    let shapes: Vec<(usize, usize)> = match args.first() {
        Some(s) => vec![nxv(s)],
        None => vec![(1024, 32000), (2048, 50257), (4096, 128256)],
    };
    let runs: usize = args.get(1).map_or(5, |r| r.parse().unwrap());
    let device = Device::Cpu;
    let (read_bw, rw_bw) = bandwidth();
    let ram = total_memory();
    println!(
        "CPU kernels: {}, rayon threads: {}, bandwidth: read {:.1} GB/s, read+write {:.1} GB/s, RAM {:.1} GB, runs per cell: {runs} (median)",
        candle_chunked_ce::instruction_set(),
        rayon::current_num_threads(),
        read_bw / 1e9,
        rw_bw / 1e9,
        ram as f64 / 1e9
    );
    println!(
        "{:<12} {:<5} {:<36} {:>9} {:>9} {:>9} {:>11} {:>9} {:>13}",
        "N x V", "dtype", "implementation", "fwd op", "bwd op", "e2e", "candle adds", "peak", "vs candle-nn"
    );
    for (n, v) in shapes {
        for dtype in [DType::F32, DType::BF16] {
            let logits = Tensor::randn(0f32, 2.0, (n, v), &device).unwrap().to_dtype(dtype).unwrap();
            let labels = Tensor::rand(0f32, v as f32, n, &device).unwrap().to_dtype(DType::I64).unwrap();
            let labels_u32 = labels.to_dtype(DType::U32).unwrap();
            let bytes = n * v * dtype.size_in_bytes();
            let read_pass = bytes as f64 / read_bw * 1e3;
            let rw_pass = bytes as f64 / rw_bw * 1e3;
            let touch = ms(first_touch(bytes, rayon::current_num_threads()));
            println!(
                "{n}x{v} {dtype:?}: logits {:.0} MB; floors: fwd op (1 read) {read_pass:.1} ms; bwd op (read + write) {:.1} ms + first touch of a fresh gradient {touch:.1} ms = {:.1} ms (in place: {:.1} ms); e2e (fwd + bwd floors, 3 passes) {:.1} ms, in place {:.1} ms",
                bytes as f64 / 1e6,
                2.0 * rw_pass,
                2.0 * rw_pass + touch,
                2.0 * rw_pass,
                read_pass + 2.0 * rw_pass + touch,
                read_pass + 2.0 * rw_pass
            );
            // candle-nn peaks near 10x the f32 logits beyond them: skip it where that would not fit.
            let candle_nn_need = 11 * n * v * 4;
            let mut rows = Vec::new();
            if candle_nn_need < ram * 4 / 5 {
                rows.push(candle_nn(runs.min(3), &logits, &labels_u32));
            } else {
                println!("(candle-nn skipped at {n}x{v}: it would need about {:.0} GB)", candle_nn_need as f64 / 1e9);
            }
            // (compile, inplace_grad, grad_in_forward); with grad_in_forward the fwd op column times
            // the one op that forms the statistics and the gradient, and the bwd op is 0.
            for (compile, inplace, in_forward) in [
                (true, false, false),
                (true, true, false),
                (true, false, true),
                (true, true, true),
                (false, false, false),
            ] {
                let ce =
                    ChunkedCrossEntropy::default().compile(compile).inplace_grad(inplace).grad_in_forward(in_forward);
                let name = format!("ours compile={} inplace={}", compile as u8, inplace as u8);
                let name = if in_forward { format!("{name} in_forward") } else { name };
                rows.push(ours(if compile { runs } else { runs.min(3) }, &logits, &labels, &ce, inplace, name));
            }
            let reference = rows.iter().find(|r| r.name.starts_with("candle-nn")).map(|r| r.end_to_end);
            for r in &rows {
                let opt = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1}", ms(d)));
                let adds = match (r.forward, r.backward) {
                    (Some(f), Some(b)) => format!("{:.1}", ms(r.end_to_end.saturating_sub(f + b))),
                    _ => "-".into(),
                };
                println!(
                    "{:<12} {:<5} {:<36} {:>9} {:>9} {:>9.1} {:>11} {:>8.2}x {:>12.1}x",
                    format!("{n}x{v}"),
                    format!("{dtype:?}").to_lowercase(),
                    r.name,
                    opt(r.forward),
                    opt(r.backward),
                    ms(r.end_to_end),
                    adds,
                    r.peak_extra as f64 / bytes as f64,
                    reference.map_or(f64::NAN, |t| t.as_secs_f64() / r.end_to_end.as_secs_f64())
                );
            }
        }
    }
}
