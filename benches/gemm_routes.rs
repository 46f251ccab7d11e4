//! GFLOP/s of the three products of the linear loss (`H = 768`, `V = 50257`,
//! f32) per GEMM route, side by side in one process, the routes interleaved
//! round by round so that a drifting machine moves them all alike:
//!
//! 1. logits = X · Wᵀ (`X` `[n, H]`, `W` `[V, H]`) into `[n, V]`;
//! 2. dX = G · W (`G` `[n, V]`) into `[n, H]`;
//! 3. dW += Gᵀ · X into `[V, H]` (in place, beta = 1), or transposed, dWᵀ
//!    += Xᵀ · G into `[H, V]`, as `src/gemm/` accumulates it.
//!
//! Routes: candle's `matmul` (which allocates its output, and for product 3
//! does not accumulate); the `gemm` crate called directly through
//! `src/gemm/` (strides, no copies, `Parallelism::Rayon(threads)`; product 2,
//! whose inner dimension `V` is long, split along `V` into one single-threaded
//! product per thread, and also not split) and with
//! other `Parallelism` settings; for product 1 also with `Wᵀ` copied once to
//! `[H, V]` (the copy not timed, as once per pass it is amortised over the
//! chunks; its time is printed apart); for products 2 and 3 also into the
//! transposed output (compared after transposing it back); and PyTorch's
//! `mm` in a Python worker process that takes its turn in every round
//! (`GEMM_ROUTES_PYTHON=/path/to/python` with torch;
//! `torch.set_num_threads(rayon's threads)`). The system OpenBLAS (Debian's
//! 0.3.21) was measured here too and was no faster (BENCHMARKS.md).
//!
//! `cargo bench --bench gemm_routes [--no-default-features] -- [rows,rows,..] [rounds]`
//! (default `1024,4096` and 3 timed rounds after one warm-up round). Prints
//! the median seconds and GFLOP/s per route, the ratios to candle and to
//! torch, and the time of a rayon pass over the `[n, V]` logits run right
//! after each product-1 route (a BLAS's spinning threads would slow it).

#[path = "../src/gemm/mod.rs"]
#[allow(dead_code)]
mod routes;

use candle::{Device, Tensor};
use rayon::prelude::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// The end of the name of a route whose output is the transpose of the others'.
const TRANSPOSED: &str = "(transposed)";
const H: usize = 768;
const V: usize = 50257;
/// Pause before each timed call, so that the previous route's spinning
/// threads (rayon's, OpenBLAS's, OpenMP's) have gone to sleep.
const SETTLE: Duration = Duration::from_millis(150);

/// Deterministic values in [-scale, scale).
fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

/// PyTorch's `mm` on the same shapes, in a worker process timed per call.
struct Torch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    version: String,
}

const TORCH_WORKER: &str = r#"
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
H, V = int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
W = (torch.rand(V, H) * 2 - 1) * 0.05
bufs = {}
print("ready", torch.__version__, torch.get_num_threads(), torch.backends.mkldnn.is_available(), flush=True)
for line in sys.stdin:
    p, n = line.split()
    n = int(n)
    if n not in bufs:
        bufs.clear()
        X = torch.rand(n, H) * 2 - 1
        G = (torch.rand(n, V) * 2 - 1) * 1e-3
        bufs[n] = (X, G, torch.empty(n, V), torch.empty(n, H), torch.zeros(V, H))
    X, G, L, dX, dW = bufs[n]
    t = time.perf_counter()
    if p == "1":
        torch.mm(X, W.t(), out=L)
    elif p == "2":
        torch.mm(G, W, out=dX)
    else:
        dW.addmm_(G.t(), X)
    print(time.perf_counter() - t, flush=True)
"#;

impl Torch {
    fn start(python: &str, threads: usize) -> Option<Self> {
        let mut child = Command::new(python)
            .args(["-c", TORCH_WORKER, &threads.to_string(), &H.to_string(), &V.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| eprintln!("torch worker: cannot run {python}: {e}"))
            .ok()?;
        let stdin = child.stdin.take()?;
        let mut stdout = BufReader::new(child.stdout.take()?);
        let mut line = String::new();
        stdout.read_line(&mut line).ok()?;
        let version = line.strip_prefix("ready ")?.trim().to_string();
        Some(Self { child, stdin, stdout, version })
    }

    /// Seconds of one call of product `p` at `rows` rows, timed in Python.
    fn time(&mut self, p: usize, rows: usize) -> f64 {
        writeln!(self.stdin, "{p} {rows}").expect("torch worker stdin");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("torch worker stdout");
        line.trim().parse().unwrap_or_else(|_| panic!("torch worker said {line:?}"))
    }
}

impl Drop for Torch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The operands of one row count, as slices and as candle tensors.
struct Operands {
    rows: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    w_t: Vec<f32>,
    g: Vec<f32>,
    logits: Vec<f32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
    tx: Tensor,
    tw: Tensor,
    tg: Tensor,
}

impl Operands {
    fn new(rows: usize, w: &[f32]) -> candle::Result<Self> {
        let x = values(rows * H, 2, 1.0);
        let g = values(rows * V, 3, 1e-3);
        let mut w_t = vec![0f32; H * V];
        transpose(&mut w_t, w, (V, H)); // first touch
        let start = Instant::now();
        transpose(&mut w_t, w, (V, H));
        println!("        (W [V, H] -> W^T [H, V] copy, transpose: {:.3} s)", start.elapsed().as_secs_f64());
        let dev = Device::Cpu;
        Ok(Self {
            rows,
            tx: Tensor::from_slice(&x, (rows, H), &dev)?,
            tw: Tensor::from_slice(w, (V, H), &dev)?,
            tg: Tensor::from_slice(&g, (rows, V), &dev)?,
            x,
            w: w.to_vec(),
            w_t,
            g,
            logits: vec![0f32; rows * V],
            dx: vec![0f32; rows * H],
            dw: vec![0f32; V * H],
        })
    }
}

/// A route of one product: its name and a call, given the operands.
type Call = Box<dyn FnMut(&mut Operands) -> candle::Result<()>>;

fn product_routes(product: usize, threads: usize) -> Vec<(String, Call)> {
    use gemm::Parallelism::Rayon;
    let nt = |o: &Operands| routes::Product {
        m: o.rows,
        n: V,
        k: H,
        a_transposed: false,
        b_transposed: true,
        accumulate: false,
    };
    let nn = |o: &Operands| routes::Product {
        m: o.rows,
        n: H,
        k: V,
        a_transposed: false,
        b_transposed: false,
        accumulate: false,
    };
    let tn = |o: &Operands| routes::Product {
        m: V,
        n: H,
        k: o.rows,
        a_transposed: true,
        b_transposed: false,
        accumulate: true,
    };
    let mut out: Vec<(String, Call)> = Vec::new();
    match product {
        1 => {
            out.push((
                "candle matmul".into(),
                Box::new(|o| {
                    std::hint::black_box(o.tx.matmul(&o.tw.t()?)?);
                    Ok(())
                }),
            ));
            out.push((
                format!("gemm Rayon({threads}) [gemm.rs]"),
                Box::new(move |o| {
                    routes::product(nt(o), &mut o.logits, &o.x, &o.w);
                    Ok(())
                }),
            ));
            out.push((
                format!("gemm Rayon({})", 2 * threads),
                Box::new(move |o| {
                    routes::product_with(Rayon(2 * threads), nt(o), &mut o.logits, &o.x, &o.w);
                    Ok(())
                }),
            ));
            out.push((
                format!("gemm Rayon({threads}), W^T copied [H,V]"),
                Box::new(move |o| {
                    let p = routes::Product { b_transposed: false, ..nt(o) };
                    routes::product_with(Rayon(threads), p, &mut o.logits, &o.x, &o.w_t);
                    Ok(())
                }),
            ));
        }
        2 => {
            out.push((
                "candle matmul".into(),
                Box::new(|o| {
                    std::hint::black_box(o.tg.matmul(&o.tw)?);
                    Ok(())
                }),
            ));
            out.push((
                format!("gemm, V split in {threads} [gemm.rs]"),
                Box::new(move |o| {
                    routes::product(nn(o), &mut o.dx, &o.g, &o.w);
                    Ok(())
                }),
            ));
            out.push((
                format!("gemm Rayon({threads}), not split"),
                Box::new(move |o| {
                    routes::product_with(Rayon(threads), nn(o), &mut o.dx, &o.g, &o.w);
                    Ok(())
                }),
            ));
            out.push((
                format!("gemm Rayon({})", 2 * threads),
                Box::new(move |o| {
                    routes::product_with(Rayon(2 * threads), nn(o), &mut o.dx, &o.g, &o.w);
                    Ok(())
                }),
            ));
            out.push((
                format!("gemm, V split, dX^T = W^T G^T {TRANSPOSED}"),
                Box::new(move |o| {
                    let p = routes::Product {
                        m: H,
                        n: o.rows,
                        k: V,
                        a_transposed: true,
                        b_transposed: true,
                        accumulate: false,
                    };
                    routes::product(p, &mut o.dx, &o.w, &o.g);
                    Ok(())
                }),
            ));
        }
        _ => {
            out.push((
                "candle G^T.matmul(X) (no +=)".into(),
                Box::new(|o| {
                    std::hint::black_box(o.tg.t()?.matmul(&o.tx)?);
                    Ok(())
                }),
            ));
            out.push((
                format!("gemm Rayon({threads}), dW += G^T X"),
                Box::new(move |o| {
                    routes::product(tn(o), &mut o.dw, &o.g, &o.x);
                    Ok(())
                }),
            ));
            out.push((
                format!("gemm Rayon({threads}) [gemm.rs] {TRANSPOSED}"),
                Box::new(move |o| {
                    routes::add_matmul_tn(&mut o.dw, &o.x, &o.g, (H, V, o.rows));
                    Ok(())
                }),
            ));
            out.push((
                format!("gemm Rayon({})", 2 * threads),
                Box::new(move |o| {
                    routes::product_with(Rayon(2 * threads), tn(o), &mut o.dw, &o.g, &o.x);
                    Ok(())
                }),
            ));
        }
    }
    out
}

/// `dst = srcᵀ`: `src` `[rows, cols]`, `dst` `[cols, rows]`, row-major, in
/// tiles on rayon's threads.
fn transpose<T: Copy + Send + Sync>(dst: &mut [T], src: &[T], (rows, cols): (usize, usize)) {
    assert!(src.len() == rows * cols && dst.len() == rows * cols, "transpose: slices of the wrong length");
    if rows == 0 || cols == 0 {
        return;
    }
    const TILE: usize = 32;
    dst.par_chunks_mut(TILE * rows).enumerate().for_each(|(tile, block)| {
        let (c0, width) = (tile * TILE, block.len() / rows);
        for r0 in (0..rows).step_by(TILE) {
            for c in 0..width {
                let out = &mut block[c * rows..(c + 1) * rows];
                for r in r0..(r0 + TILE).min(rows) {
                    out[r] = src[r * cols + c0 + c];
                }
            }
        }
    });
}

/// A rayon pass over the logits, as the loss's kernels make after product 1.
fn rayon_pass(logits: &mut [f32]) -> f64 {
    let start = Instant::now();
    logits.par_chunks_mut(V).for_each(|row| {
        for x in row.iter_mut() {
            *x = (*x * 1e-3).exp();
        }
    });
    start.elapsed().as_secs_f64()
}

/// `some avg10=..` of `/proc/pressure/cpu` (Linux), to flag a run disturbed by other processes.
fn cpu_pressure() -> String {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).map(str::to_string))
        .unwrap_or_else(|| "n/a".into())
}

fn median(xs: &[f64]) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The largest |a - b| relative to max |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f32, |m, &x| m.max(x.abs())).max(f32::MIN_POSITIVE) as f64;
    a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x - y).abs() as f64)) / scale
}

fn main() -> candle::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let rows: Vec<usize> = args
        .first()
        .map(|a| a.split(',').map(|r| r.parse().expect("rows: 1024,4096")).collect())
        .unwrap_or_else(|| vec![1024, 4096]);
    let rounds: usize = args.get(1).map(|r| r.parse().expect("rounds")).unwrap_or(3);
    let threads = rayon::current_num_threads();
    let mut torch = std::env::var("GEMM_ROUTES_PYTHON").ok().and_then(|py| Torch::start(&py, threads));

    println!(
        "gemm_routes: H = {H}, V = {V}, f32; {threads} rayon threads; gemm x86-v4 (avx512) feature: {}; torch: {}",
        cfg!(feature = "gemm-avx512"),
        torch.as_ref().map_or("off (set GEMM_ROUTES_PYTHON)", |t| t.version.as_str()),
    );
    println!("{rounds} timed rounds after 1 warm-up; median seconds; routes interleaved within each round\n");
    println!(
        "{:>7} {:>5} {:<34} {:>8} {:>8} {:>9} {:>8} {:>10} {:>9}",
        "product", "rows", "route", "median s", "min s", "GFLOP/s", "x candle", "x torch", "rel diff"
    );

    let w = values(V * H, 1, 0.05);
    for &n in &rows {
        let mut o = Operands::new(n, &w)?;
        let flop = 2.0 * (n * H * V) as f64;
        for product in 1..=3 {
            let mut routes = product_routes(product, threads);
            let routes_names: Vec<String> = routes.iter().map(|(name, _)| name.clone()).collect();
            let mut times = vec![Vec::new(); routes.len()];
            let mut torch_times = Vec::new();
            let mut after = vec![Vec::new(); routes.len()];
            let mut alone = Vec::new();
            let mut diffs = vec![f64::NAN; routes.len()];
            let mut reference: Option<Vec<f32>> = None;
            for round in 0..=rounds {
                for (i, (_, call)) in routes.iter_mut().enumerate() {
                    std::thread::sleep(SETTLE);
                    let start = Instant::now();
                    call(&mut o)?;
                    let t = start.elapsed().as_secs_f64();
                    if round == 0 && i >= 1 {
                        // Correctness against the first direct route (index 1):
                        // the outputs written in place (candle's are not).
                        let out = match product {
                            1 => &o.logits,
                            2 => &o.dx,
                            _ => &o.dw,
                        };
                        // A transposed output, back to the others' layout.
                        let (rows, cols) = if product == 2 { (H, n) } else { (H, V) };
                        let mut back = vec![0f32; out.len()];
                        let out = if routes_names[i].ends_with(TRANSPOSED) {
                            transpose(&mut back, out, (rows, cols));
                            &back
                        } else {
                            out
                        };
                        match &reference {
                            None => {
                                diffs[i] = 0.0;
                                reference = Some(out.clone());
                            }
                            Some(r) => diffs[i] = rel_diff(out, r),
                        }
                    }
                    if product == 3 {
                        // Each route accumulates into the same (zero) dW.
                        o.dw.fill(0.0);
                    }
                    let pass = if product == 1 { rayon_pass(&mut o.logits) } else { 0.0 };
                    if round > 0 {
                        times[i].push(t);
                        after[i].push(pass);
                    }
                }
                if product == 1 {
                    std::thread::sleep(SETTLE);
                    let pass = rayon_pass(&mut o.logits);
                    if round > 0 {
                        alone.push(pass);
                    }
                }
                if let Some(torch) = torch.as_mut() {
                    std::thread::sleep(SETTLE);
                    let t = torch.time(product, n);
                    if round > 0 {
                        torch_times.push(t);
                    }
                }
            }
            let candle = median(&times[0]);
            let torch_s = (!torch_times.is_empty()).then(|| median(&torch_times));
            let row = |name: &str, med: f64, min: f64, diff: f64| {
                let vs_torch = torch_s.map_or("-".to_string(), |t| format!("{:.2}", t / med));
                println!(
                    "{product:>7} {n:>5} {name:<34} {med:>8.3} {min:>8.3} {:>9.1} {:>8.2} {vs_torch:>10} {:>9}",
                    flop / med / 1e9,
                    candle / med,
                    if diff.is_nan() { "-".to_string() } else { format!("{diff:.1e}") }
                );
            };
            for (i, (name, _)) in routes.iter().enumerate() {
                let min = times[i].iter().copied().fold(f64::INFINITY, f64::min);
                row(name, median(&times[i]), min, diffs[i]);
            }
            if let Some(t) = torch_s {
                let min = torch_times.iter().copied().fold(f64::INFINITY, f64::min);
                row("torch mm", t, min, f64::NAN);
            }
            println!("        (CPU pressure from other processes and ours, /proc/pressure/cpu: {})", cpu_pressure());
            if product == 1 {
                let alone = median(&alone);
                print!("        rayon pass over [n, V] right after the call (s; alone {alone:.3}):");
                for (i, (name, _)) in routes.iter().enumerate() {
                    print!(" {}: {:.3}", name.split(" [").next().unwrap_or(name), median(&after[i]));
                }
                println!();
            }
        }
        println!();
    }
    Ok(())
}
