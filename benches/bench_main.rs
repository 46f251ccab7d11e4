//! Criterion benches: forward + backward of our loss (fused and primitive)
//! against `candle_nn::loss::cross_entropy`, throughput in bytes of logits.
//! The side-by-side table with floors and memory is `benches/ce_table.rs`.

use candle::{DType, Device, Tensor, Var};
use candle_chunked_ce::ChunkedCrossEntropy;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Shapes small enough for criterion's repeated sampling on 2 cores.
const SHAPES: [(usize, usize); 2] = [(256, 32000), (512, 50257)];

fn inputs(rows: usize, vocab: usize, dtype: DType) -> (Tensor, Tensor) {
    let device = Device::Cpu;
    let logits = Tensor::randn(0f32, 2.0, (rows, vocab), &device).unwrap().to_dtype(dtype).unwrap();
    let labels = Tensor::rand(0f32, vocab as f32, rows, &device).unwrap().to_dtype(DType::U32).unwrap();
    (logits, labels)
}

fn backward(logits: &Tensor, loss_fn: impl Fn(&Tensor) -> candle::Result<Tensor>) {
    let var = Var::from_tensor(logits).unwrap();
    let grads = loss_fn(var.as_tensor()).unwrap().backward().unwrap();
    std::hint::black_box(grads.get(var.as_tensor()).unwrap());
}

fn forward_backward(c: &mut Criterion) {
    for dtype in [DType::F32, DType::BF16] {
        let mut group = c.benchmark_group(format!("cross_entropy_fwd_bwd_{dtype:?}").to_lowercase());
        group.sample_size(10);
        for (rows, vocab) in SHAPES {
            let (logits, labels) = inputs(rows, vocab, dtype);
            group.throughput(Throughput::Bytes((rows * vocab * dtype.size_in_bytes()) as u64));
            let id = format!("{rows}x{vocab}");
            for compile in [true, false] {
                let ce = ChunkedCrossEntropy::default().compile(compile);
                let name = if compile { "ours_fused" } else { "ours_primitive" };
                group.bench_with_input(BenchmarkId::new(name, &id), &logits, |b, logits| {
                    b.iter(|| backward(logits, |x| ce.forward(x, &labels, None)))
                });
            }
            group.bench_with_input(BenchmarkId::new("candle_nn", &id), &logits, |b, logits| {
                b.iter(|| backward(logits, |x| candle_nn::loss::cross_entropy(&x.to_dtype(DType::F32)?, &labels)))
            });
        }
        group.finish();
    }
}

fn forward_only(c: &mut Criterion) {
    let mut group = c.benchmark_group("cross_entropy_fwd_f32");
    group.sample_size(10);
    for (rows, vocab) in SHAPES {
        let (logits, labels) = inputs(rows, vocab, DType::F32);
        group.throughput(Throughput::Bytes((rows * vocab * 4) as u64));
        let ce = ChunkedCrossEntropy::default();
        group.bench_with_input(BenchmarkId::new("ours_fused", format!("{rows}x{vocab}")), &logits, |b, logits| {
            b.iter(|| ce.forward(logits, &labels, None).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, forward_backward, forward_only);
criterion_main!(benches);
