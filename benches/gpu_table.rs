//! The GPU table (feature `cuda`, run on a lent GPU by `scripts/gpu-check.sh`):
//! forward+backward of our loss (fused and primitive, gradient in place or
//! not, formed in the forward pass or in backward) at the shapes, with synchronised timers (warm-up, median of
//! rotating inputs), peak device memory from the CUDA memory pool, and the
//! measured device-to-device copy bandwidth with the floors it implies.
//! PyTorch's figures come from `scripts/torch_ce_bench.py` in the same call.
//!
//! `gpu_table [NxV ...] [--reps R] [--dtype bf16|f32] [--retain-freed]
//! [--row-threads T] [--row-splits S]` (both dtypes unless `--dtype` names one;
//! `--retain-freed` keeps freed memory in CUDA's pool: the allocation lead of
//! issue 21, timed against the default in the same call; `--row-threads`
//! launches blocks of T threads where a block shares a row, instead of
//! `kernel_abi::MAX_ROW_BLOCK`; `--row-splits` has S blocks share each such
//! row in the backward, instead of one); `gpu_table --linear [NxHxV] [--reps R]
//! [--only TEXT] [--ignore-every K]` (default 8192x4096x128256, bf16;
//! `--only`: the rows whose name contains TEXT; every K-th label ignored, 10
//! by default as in PyTorch's script, 0 for none) times `LinearCrossEntropy` instead, against
//! issue 5's memory target (the bf16 weight gradient plus 1 GiB); PyTorch's
//! figures for it come from `scripts/torch_linear_ce_bench.py`.

use candle::cuda_backend::cudarc::driver::sys;
use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::{ChunkedCrossEntropy, LinearCrossEntropy, LinearGradAccumulator};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

const SETS: usize = 2;
const WARMUP: usize = 3;

/// The CUDA default memory pool that candle's stream-ordered allocations use.
/// Every query is fallible: a driver that refuses one costs the memory
/// column, not the GPU run.
struct Pool(Option<sys::CUmemoryPool>);

impl Pool {
    fn new() -> Self {
        let mut device: sys::CUdevice = 0;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: plain driver queries with valid out-pointers; candle initialised the driver.
        let ok = unsafe {
            sys::cuDeviceGet(&mut device, 0) == sys::CUresult::CUDA_SUCCESS
                && sys::cuDeviceGetDefaultMemPool(&mut pool, device) == sys::CUresult::CUDA_SUCCESS
        };
        if !ok {
            eprintln!("memory pool unavailable: peak memory will read 0");
        }
        Self(ok.then_some(pool))
    }

    fn attribute(&self, attr: sys::CUmemPool_attribute) -> u64 {
        let Some(pool) = self.0 else { return 0 };
        let mut value = 0u64;
        // SAFETY: the USED_MEM_* attributes are u64 (cuuint64_t) values.
        let rc = unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut value as *mut u64).cast()) };
        if rc == sys::CUresult::CUDA_SUCCESS {
            value
        } else {
            0
        }
    }

    /// Bytes in use now.
    fn used(&self) -> u64 {
        self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// Resets the high-water mark to the current use.
    fn reset_peak(&self) {
        let Some(pool) = self.0 else { return };
        let mut zero = 0u64;
        // SAFETY: setting USED_MEM_HIGH to 0 resets it, as documented for the attribute.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        };
    }

    fn peak(&self) -> u64 {
        self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// How `copy_bandwidth` measures, for the table's header.
const COPY_METHOD: &str =
    "driver memcpy (cuMemcpyDtoDAsync) between two preallocated 1 GiB buffers, CUDA events, median of 10";

/// Device-to-device copy bandwidth in bytes/s (read + write counted), timed as
/// PyTorch's `scripts/torch_ce_bench.py` times its `dst.copy_(src)`: a driver
/// memcpy between two buffers allocated once, on candle's stream, between CUDA
/// events, after a warm-up. (Candle's `Tensor::copy` allocates its output on
/// every call, which measured 3.5x slower on an H200 and made the floors lenient.)
fn copy_bandwidth(device: &Device) -> f64 {
    use candle::cuda_backend::cudarc::driver::sys::CUevent_flags;
    const BYTES: usize = 1 << 30;
    let stream = device.as_cuda_device().expect("a CUDA device").cuda_stream();
    let src = stream.alloc_zeros::<u8>(BYTES).expect("1 GiB for the copy's source");
    let mut dst = stream.alloc_zeros::<u8>(BYTES).expect("1 GiB for the copy's destination");
    for _ in 0..WARMUP {
        stream.memcpy_dtod(&src, &mut dst).unwrap();
    }
    stream.synchronize().unwrap();
    let times = (0..10)
        .map(|_| {
            let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
            stream.memcpy_dtod(&src, &mut dst).unwrap();
            let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
            end.synchronize().unwrap();
            Duration::from_secs_f64(f64::from(start.elapsed_ms(&end).unwrap()) / 1e3)
        })
        .collect();
    2.0 * BYTES as f64 / median(times).as_secs_f64()
}

struct Timing {
    forward: Duration,
    backward: Duration,
    end_to_end: Duration,
    peak: u64,
}

/// `loss().backward()` between device synchronisations: its time, and the
/// memory pool's peak above what was in use before it.
fn timed_with_peak(device: &Device, pool: &Pool, loss: impl FnOnce() -> candle::Result<Tensor>) -> (Duration, u64) {
    timed_call_with_peak(device, pool, || loss().unwrap().backward().unwrap())
}

/// `call()` between device synchronisations: its time, and the memory
/// pool's peak above what was in use before it (what it returns is dropped
/// after both are read).
fn timed_call_with_peak<T>(device: &Device, pool: &Pool, call: impl FnOnce() -> T) -> (Duration, u64) {
    device.synchronize().unwrap();
    let base = pool.used();
    pool.reset_peak();
    let start = Instant::now();
    let out = call();
    device.synchronize().unwrap();
    let elapsed = start.elapsed();
    let peak = pool.peak().saturating_sub(base);
    drop(out);
    (elapsed, peak)
}

fn measure(ce: &ChunkedCrossEntropy, inputs: &[Tensor], labels: &Tensor, reps: usize, pool: &Pool) -> Timing {
    let device = inputs[0].device();
    let inplace = format!("{ce:?}").contains("inplace_grad: true");
    let (mut fwd, mut bwd, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    let mut peak = 0;
    for i in 0..WARMUP + reps {
        let logits = &inputs[i % inputs.len()];
        let fresh = if inplace { logits.copy().unwrap() } else { logits.clone() };
        let (f, b, grad) = ce.bench_ops(&fresh, labels).unwrap();
        drop(grad);
        // A fresh variable (a copy) each run, so in-place runs never see a gradient as logits.
        let var = Var::from_tensor(logits).unwrap();
        let (t, p) = timed_with_peak(device, pool, || ce.forward(var.as_tensor(), labels, None));
        peak = p;
        if i >= WARMUP {
            fwd.push(f);
            bwd.push(b);
            e2e.push(t);
        }
    }
    Timing { forward: median(fwd), backward: median(bwd), end_to_end: median(e2e), peak }
}

/// `LinearCrossEntropy` forward+backward into hidden and weight (bf16), median
/// time and peak device memory above the inputs, with the weight gradient's
/// size that the memory target is stated against: through candle's autograd
/// (automatic: one chunk summed straight into bf16 here, see
/// `LinearCrossEntropy::chunk_len`; 2048-row chunks, automatic before, and
/// 4096-row ones, each chunk a pass over the f32 accumulator),
/// `loss_and_grads` (automatic and 2048-row chunks; the gradients handed over), and `accumulate_grads` into an f32 accumulator made beforehand;
/// then autograd and `loss_and_grads` with `low_memory` (the weight's gradient
/// summed in bf16, smaller chunks), against Liger's peak.
/// The rows of the linear table: `[n, h]` hidden states and a `[v, h]`
/// weight, every `ignore_every`-th label ignored (0: none), as
/// `scripts/torch_linear_ce_bench.py --ignore-every` ignores PyTorch's.
struct LinearShape {
    n: usize,
    h: usize,
    v: usize,
    ignore_every: usize,
}

fn linear_table(shape: LinearShape, reps: usize, only: Option<&str>, pool: &Pool, device: &Device) {
    let LinearShape { n, h, v, ignore_every } = shape;
    let dtype = DType::BF16;
    let hidden = Tensor::randn(0f32, 1.0, (n, h), device).unwrap().to_dtype(dtype).unwrap();
    let weight = Tensor::randn(0f32, 0.02, (v, h), device).unwrap().to_dtype(dtype).unwrap();
    let ignored = |i: usize| ignore_every > 0 && i.is_multiple_of(ignore_every);
    let labels: Vec<i64> = (0..n).map(|i| if ignored(i) { -100 } else { (i * 7919 % v) as i64 }).collect();
    let labels = Tensor::from_vec(labels, n, device).unwrap();
    let weight_grad_gib = (v * h * dtype.size_in_bytes()) as f64 / (1u64 << 30) as f64;
    let share = if ignore_every > 0 { format!("1 in {ignore_every}") } else { "no".into() };
    println!(
        "linear: N={n} H={h} V={v} bf16, {share} label ignored; weight gradient {weight_grad_gib:.2} GiB, target peak <= {:.2} GiB",
        weight_grad_gib + 1.0
    );
    println!("| implementation | fwd+bwd ms | peak extra GiB |");
    println!("|---|---:|---:|");
    let mut acc = LinearGradAccumulator::new(&weight, None).unwrap();
    let paths = [
        ("ours LinearCrossEntropy (automatic chunks)", None, false, Path::Autograd),
        ("ours, 2048-row chunks (automatic before, f32 accumulator)", Some(2048), false, Path::Autograd),
        ("ours, 4096-row chunks (f32 accumulator)", Some(4096), false, Path::Autograd),
        ("ours loss_and_grads (automatic chunks)", None, false, Path::LossAndGrads),
        ("ours loss_and_grads, 2048-row chunks (automatic before)", Some(2048), false, Path::LossAndGrads),
        ("ours accumulate_grads (f32 accumulator kept)", None, false, Path::Accumulate),
        ("ours LinearCrossEntropy, low_memory", None, true, Path::Autograd),
        ("ours loss_and_grads, low_memory", None, true, Path::LossAndGrads),
    ];
    for (name, chunk_len, low_memory, path) in paths {
        if only.is_some_and(|only| !name.contains(only)) {
            continue;
        }
        let ce = LinearCrossEntropy::default().chunk_len(chunk_len).low_memory(low_memory);
        let cell = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let (mut times, mut peak) = (Vec::new(), 0);
            for i in 0..WARMUP + reps {
                let (x, w) = (Var::from_tensor(&hidden).unwrap(), Var::from_tensor(&weight).unwrap());
                // What each path returns is dropped inside the call: the pool's peak is read
                // after it, and a free lowers no high-water mark.
                let (t, p) = timed_call_with_peak(device, pool, || match path {
                    Path::Autograd => drop(ce.forward(x.as_tensor(), w.as_tensor(), &labels, None).unwrap().backward()),
                    Path::LossAndGrads => drop(ce.loss_and_grads(&hidden, &weight, None, &labels, None).unwrap()),
                    Path::Accumulate => {
                        drop(ce.accumulate_grads(&hidden, &weight, None, &labels, None, None, &mut acc).unwrap())
                    }
                });
                peak = p;
                if i >= WARMUP {
                    times.push(t);
                }
            }
            (median(times), peak)
        }));
        match cell {
            Ok((t, peak)) => println!("| {name} | {:.2} | {:.2} |", ms(t), peak as f64 / (1u64 << 30) as f64),
            Err(_) => println!("| {name} | failed (see stderr) | - |"),
        }
    }
}

/// How [`linear_table`] takes the gradients.
#[derive(Clone, Copy)]
enum Path {
    Autograd,
    LossAndGrads,
    Accumulate,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps = args.iter().position(|a| a == "--reps").map_or(20, |i| args[i + 1].parse().unwrap());
    if args.iter().any(|a| a == "--linear") {
        let dims: Vec<usize> = args
            .iter()
            .find(|a| a.matches('x').count() == 2)
            .map_or(vec![8192, 4096, 128256], |s| s.split('x').map(|d| d.parse().unwrap()).collect());
        let device = Device::new_cuda(0).expect("a CUDA device");
        if args.iter().any(|a| a == "--retain-freed") {
            candle_chunked_ce::retain_freed_memory(&device).expect("the pool's release threshold");
            println!("memory pool: freed memory retained (candle_chunked_ce::retain_freed_memory)");
        }
        let only = args.iter().position(|a| a == "--only").map(|i| args.get(i + 1).expect("--only TEXT").as_str());
        let ignore_every = args
            .iter()
            .position(|a| a == "--ignore-every")
            .map_or(10, |i| args.get(i + 1).and_then(|k| k.parse().ok()).expect("--ignore-every K"));
        let shape = LinearShape { n: dims[0], h: dims[1], v: dims[2], ignore_every };
        linear_table(shape, reps.min(10), only, &Pool::new(), &device);
        return;
    }
    let mut shapes: Vec<(usize, usize)> =
        args.iter().filter_map(|a| a.split_once('x')).map(|(n, v)| (n.parse().unwrap(), v.parse().unwrap())).collect();
    if shapes.is_empty() {
        // The headline shape first: a run cut short still has it.
        shapes = vec![(8192, 128256), (8192, 32000), (16384, 128256), (8192, 262144)];
    }
    let device = Device::new_cuda(0).expect("a CUDA device");
    let pool = Pool::new();
    if args.iter().any(|a| a == "--retain-freed") {
        candle_chunked_ce::retain_freed_memory(&device).expect("the pool's release threshold");
        println!("memory pool: freed memory retained (candle_chunked_ce::retain_freed_memory)");
    }
    if let Some(i) = args.iter().position(|a| a == "--row-threads") {
        let threads: u32 = args[i + 1].parse().expect("--row-threads T");
        candle_chunked_ce::kernel_abi::set_row_block_threads(Some(threads)).expect("a block size");
        println!("row blocks: {threads} threads (kernel_abi::set_row_block_threads)");
    }
    if let Some(i) = args.iter().position(|a| a == "--row-splits") {
        let splits: u32 = args[i + 1].parse().expect("--row-splits S");
        candle_chunked_ce::kernel_abi::set_row_splits(Some(splits)).expect("a split count");
        println!("backward rows: {splits} blocks a row (kernel_abi::set_row_splits)");
    }
    let dtypes = match args.iter().position(|a| a == "--dtype").map(|i| args[i + 1].as_str()) {
        None => vec![DType::BF16, DType::F32],
        Some("bf16") => vec![DType::BF16],
        Some("f32") => vec![DType::F32],
        Some(other) => panic!("--dtype bf16 or f32, got {other}"),
    };
    let bandwidth = copy_bandwidth(&device);
    println!(
        "device-to-device copy bandwidth: {:.0} GB/s (read + write; {COPY_METHOD}); {reps} timed runs per cell (median)",
        bandwidth / 1e9
    );
    println!("in_forward=1 (grad_in_forward): the fwd op column times the one op that forms the statistics and the gradient; its bwd op is 0");
    println!(
        "| N x V | dtype | ours | fwd op ms | bwd op ms | ops ms | e2e ms | candle share of e2e | peak extra / logits | 2-pass floor ms | ops / floor |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (n, v) in shapes {
        for &dtype in &dtypes {
            let bytes = (n * v * dtype.size_in_bytes()) as f64;
            let floor = 2.0 * bytes / bandwidth;
            let inputs: Vec<Tensor> = (0..SETS)
                .map(|_| Tensor::randn(0f32, 2.0, (n, v), &device).unwrap().to_dtype(dtype).unwrap())
                .collect();
            let labels = Tensor::rand(0f32, v as f32, n, &device).unwrap().to_dtype(DType::I64).unwrap();
            // The primitive engine launches ~20 candle kernels per chunk of 32 rows: time it
            // at the smallest shape only, to keep the call short.
            let primitive = n * v <= 8192 * 32000;
            // (compile, inplace_grad, grad_in_forward)
            for (compile, inplace, in_forward) in [
                (true, false, false),
                (true, true, false),
                (true, false, true),
                (true, true, true),
                (false, false, false),
            ] {
                if !compile && !primitive {
                    continue;
                }
                let ce =
                    ChunkedCrossEntropy::default().compile(compile).inplace_grad(inplace).grad_in_forward(in_forward);
                let ours =
                    format!("compile={} inplace={} in_forward={}", compile as u8, inplace as u8, in_forward as u8);
                let reps = if compile { reps } else { 3 };
                // One failing cell (out of memory, say) must not cost the rest of the GPU run.
                let cell = std::panic::catch_unwind(AssertUnwindSafe(|| measure(&ce, &inputs, &labels, reps, &pool)));
                let Ok(t) = cell else {
                    println!("| {n}x{v} | {dtype:?} | {ours} | failed (see stderr) |");
                    continue;
                };
                let ops = t.forward + t.backward;
                println!(
                    "| {n}x{v} | {dtype:?} | {ours} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0}% | {:.2}x | {:.3} | {:.2}x |",
                    ms(t.forward),
                    ms(t.backward),
                    ms(ops),
                    ms(t.end_to_end),
                    100.0 * (1.0 - ops.as_secs_f64() / t.end_to_end.as_secs_f64()).max(0.0),
                    t.peak as f64 / bytes,
                    floor * 1e3,
                    ops.as_secs_f64() / floor
                );
            }
        }
    }
}
