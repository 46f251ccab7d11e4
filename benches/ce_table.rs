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

//!
//! Here the logits loss's tables and `main`; in `benches/ce_table/`,
//! `linear.rs` the linear loss's, `memory.rs` the counting allocator.

#[path = "ce_table/linear.rs"]
mod linear;
#[path = "ce_table/memory.rs"]
mod memory;
#[path = "../src/gemm/mod.rs"]
#[allow(dead_code)]
mod routes;

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::ChunkedCrossEntropy;
use linear::{direct_table, linear_modes_table, linear_table, probes_table, training_steps};
use memory::{total_memory, with_peak};
use rayon::prelude::*;
use std::time::{Duration, Instant};

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub(crate) fn ms(d: Duration) -> f64 {
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
pub(crate) fn first_touch(bytes: usize, threads: usize) -> Duration {
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
