//! The linear loss's tables: against its floor and materialised logits, by
//! mode, its training steps, its direct gradients, and the probes of what its
//! design works around.

use crate::memory::{reset_rss_peak, rss_kib, total_memory, with_peak};
use crate::{first_touch, median, ms, routes};
use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{ChunkedCrossEntropy, LinearCrossEntropy, LinearGradAccumulator};
use std::time::{Duration, Instant};

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
pub(crate) fn linear_table(n: usize, h: usize, v: usize, runs: usize) {
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
pub(crate) fn probes_table(runs: usize) {
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
pub(crate) fn linear_inputs(n: usize, h: usize, v: usize, ignore_every: usize) -> (Tensor, Tensor, Tensor) {
    let device = Device::Cpu;
    let hidden = Tensor::randn(0f32, 1.0, (n, h), &device).unwrap();
    let weight = Tensor::randn(0f32, 0.05, (v, h), &device).unwrap();
    let ignored = |i: usize| ignore_every > 0 && i.is_multiple_of(ignore_every);
    let labels: Vec<i64> = (0..n).map(|i| if ignored(i) { -100 } else { ((i * 7919) % v) as i64 }).collect();
    (hidden, weight, Tensor::new(labels.as_slice(), &device).unwrap())
}

/// "1 in K" or "no", for the tables' titles.
pub(crate) fn ignored_share(ignore_every: usize) -> String {
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
pub(crate) fn training_steps(runs: usize, chunk_lens: &[usize], ignore_every: usize) {
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
pub(crate) fn linear_modes_table(n: usize, h: usize, v: usize, runs: usize, ignore_every: usize) {
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
pub(crate) fn direct_table(n: usize, h: usize, v: usize, runs: usize, ignore_every: usize, dtype: DType) {
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
pub(crate) enum Direct {
    Autograd,
    LossAndGrads,
    Accumulate,
    LowMemory,
}

/// The floor of [`linear_table`]: per chunk of rows, the logits matmul, our
/// fused forward and in-place gradient, `G · W` and `Gᵀ · H`, each timed
/// alone; the median over `runs` of their sum.
pub(crate) fn linear_floor(hidden: &Tensor, weight: &Tensor, labels: &Tensor, chunk: usize, runs: usize) -> Duration {
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
