//! One table: our cross-entropy (fused and primitive, gradient in place or not)
//! against `candle_nn::loss::cross_entropy`, on the same inputs in one process,
//! with the machine's bandwidth and first-touch floors.
//!
//! `cargo bench --bench ce_table` (all shapes), or with arguments
//! `cargo bench --bench ce_table -- 2048x50257 [runs]`.
//! Peak extra memory is counted by a global allocator: bytes live above those
//! at the start of the measured call, as a multiple of the logits' size.

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::ChunkedCrossEntropy;
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

/// Read+write bandwidth of a warm 256 MiB copy, in bytes per second (each
/// copied byte counted twice).
fn copy_bandwidth() -> f64 {
    let len = 256 << 20;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src);
    let times: Vec<Duration> = (0..5)
        .map(|_| {
            let start = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            start.elapsed()
        })
        .collect();
    std::hint::black_box(&dst);
    2.0 * len as f64 / median(times).as_secs_f64()
}

/// Time to first-touch a fresh `bytes` buffer (one write per 4 KiB page).
fn first_touch(bytes: usize) -> Duration {
    let times = (0..3)
        .map(|_| {
            let mut buf = vec![0u8; bytes];
            let start = Instant::now();
            for page in buf.chunks_mut(4096) {
                page[0] = 1;
            }
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

fn ours(runs: usize, logits: &Tensor, labels: &Tensor, compile: bool, inplace: bool) -> Row {
    let ce = ChunkedCrossEntropy::default().compile(compile).inplace_grad(inplace);
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
    let name = format!("ours compile={} inplace={}", compile as u8, inplace as u8);
    Row { name, forward: Some(median(fwd)), backward: Some(median(bwd)), end_to_end: e2e, peak_extra }
}

fn candle_nn(runs: usize, logits: &Tensor, labels_u32: &Tensor) -> Row {
    let (e2e, peak_extra) =
        end_to_end(runs, logits, |x| candle_nn::loss::cross_entropy(&x.to_dtype(DType::F32)?, labels_u32));
    let name = if logits.dtype() == DType::F32 { "candle-nn".into() } else { "candle-nn (upcast to f32)".into() };
    Row { name, forward: None, backward: None, end_to_end: e2e, peak_extra }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let shapes: Vec<(usize, usize)> = match args.first() {
        Some(s) => {
            let (n, v) = s.split_once('x').expect("shape as NxV");
            vec![(n.parse().unwrap(), v.parse().unwrap())]
        }
        None => vec![(1024, 32000), (2048, 50257), (4096, 128256)],
    };
    let runs: usize = args.get(1).map_or(5, |r| r.parse().unwrap());
    let device = Device::Cpu;
    let bandwidth = copy_bandwidth();
    println!(
        "CPU kernels: {}, rayon threads: {}, read+write bandwidth {:.1} GB/s, runs per cell: {runs} (median)",
        candle_chunked_ce::instruction_set(),
        rayon::current_num_threads(),
        bandwidth / 1e9
    );
    println!(
        "{:<12} {:<5} {:<30} {:>9} {:>9} {:>9} {:>11} {:>9} {:>13}",
        "N x V", "dtype", "implementation", "fwd op", "bwd op", "e2e", "candle adds", "peak", "vs candle-nn"
    );
    for (n, v) in shapes {
        for dtype in [DType::F32, DType::BF16] {
            let logits = Tensor::randn(0f32, 2.0, (n, v), &device).unwrap().to_dtype(dtype).unwrap();
            let labels = Tensor::rand(0f32, v as f32, n, &device).unwrap().to_dtype(DType::I64).unwrap();
            let labels_u32 = labels.to_dtype(DType::U32).unwrap();
            let bytes = n * v * dtype.size_in_bytes();
            let pass = bytes as f64 / bandwidth;
            let touch = first_touch(bytes);
            println!(
                "{n}x{v} {dtype:?}: logits {:.0} MB; floors: fwd op 1 pass {:.1} ms; bwd op 2 passes {:.1} ms + first touch of the gradient {:.1} ms (in place: none); e2e 3 passes {:.1} ms",
                bytes as f64 / 1e6,
                pass * 1e3,
                2.0 * pass * 1e3,
                ms(touch),
                3.0 * pass * 1e3
            );
            let mut rows = vec![candle_nn(runs.min(3), &logits, &labels_u32)];
            for (compile, inplace) in [(true, false), (true, true), (false, false)] {
                rows.push(ours(if compile { runs } else { runs.min(3) }, &logits, &labels, compile, inplace));
            }
            let reference = rows[0].end_to_end;
            for r in &rows {
                let opt = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1}", ms(d)));
                let adds = match (r.forward, r.backward) {
                    (Some(f), Some(b)) => format!("{:.1}", ms(r.end_to_end.saturating_sub(f + b))),
                    _ => "-".into(),
                };
                println!(
                    "{:<12} {:<5} {:<30} {:>9} {:>9} {:>9.1} {:>11} {:>8.2}x {:>12.1}x",
                    format!("{n}x{v}"),
                    format!("{dtype:?}").to_lowercase(),
                    r.name,
                    opt(r.forward),
                    opt(r.backward),
                    ms(r.end_to_end),
                    adds,
                    r.peak_extra as f64 / bytes as f64,
                    reference.as_secs_f64() / r.end_to_end.as_secs_f64()
                );
            }
        }
    }
}
