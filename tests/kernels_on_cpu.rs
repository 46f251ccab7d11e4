//! The CUDA kernels of `cuda/cross_entropy.cu`, compiled unchanged for the CPU
//! with HIP-CPU (`$HIP_CPU_DIR`, else `../shared/hip-cpu`), g++ and TBB
//! through the include shim in `tests/hip_cpu/`, launched with the argument
//! lists that `src/kernel_abi/` builds for the cudarc launcher, and held
//! against the crate's fused CPU engine.
//!
//! This finds logic bugs in the kernels (shuffle offsets, barriers, atomics,
//! indexing, the head/pack/tail split, argument order) without a GPU. It
//! cannot find races between blocks, PTX or register problems, or speed.
//! Without HIP-CPU, a C++ compiler or TBB each test prints one line saying why
//! it skips (`SKIP ...`, shown by `cargo test` beside the test's `ok`); with
//! `CHUNKED_CE_REQUIRE_HIP_CPU=1` (set by `.ci/run`) it fails instead.
//!
//! The kernels compile as 8 translation units in parallel (each compiles only
//! the entries it launches; see `tests/hip_cpu/library.rs`), once per change
//! of the kernels or the shim (the library is cached by a hash of them). As
//! one unit the compile had grown to 586 s (37 entries, 2026-12-05); as 8
//! it takes 120 s on 2 cores with the test (issue 22).
//!
//! Here the tests; in `tests/kernels_on_cpu/`, `launch.rs` builds the kernels
//! and launches one, `case.rs` runs one case against the CPU engine, and
//! `tolerance.rs` says how far the two may differ.
#![cfg(target_os = "linux")]

#[path = "kernels_on_cpu/case.rs"]
mod case;
#[path = "common/checkout.rs"]
mod checkout;
mod common;
#[path = "hip_cpu/library.rs"]
mod hip_library;
#[path = "kernels_on_cpu/launch.rs"]
mod launch;
#[path = "kernels_on_cpu/tolerance.rs"]
mod tolerance;

use candle::{DType, Device, Result, Tensor};
use candle_chunked_ce::kernel_abi::{
    self, KernelOptions, LabelGeometry, LaunchShape, MaskElements, RowGeometry, UnitFactors,
};
use case::{random_logits, Case};
use common::Rng;
use launch::{acc, kernels, run, storage_bytes, Buffer, Operands};
use std::process::Command;

// ---------------------------------------------------------------------------
// Inputs.
// ---------------------------------------------------------------------------

const DTYPES: [DType; 4] = [DType::F32, DType::BF16, DType::F16, DType::F64];

/// Block shapes to run besides the launcher's: a 1024-thread block per row (512
/// for f64, its largest), 1024 threads with a warp per row, and 3 blocks of 64
/// threads sharing each row in the backward, 5 blocks in all (so that each
/// block takes splits of several rows, and some splits of short rows have no
/// packs, or only the head or tail).
fn shapes(dtype: DType) -> Vec<Option<LaunchShape>> {
    let threads = kernel_abi::max_threads(dtype);
    let max_blocks = kernel_abi::MAX_BLOCKS;
    vec![
        None,
        Some(LaunchShape { threads, rows_per_block: 1, max_blocks, row_splits: 1 }),
        Some(LaunchShape { threads, rows_per_block: threads / 32, max_blocks, row_splits: 1 }),
        Some(LaunchShape { threads: 64, rows_per_block: 1, max_blocks: 5, row_splits: 3 }),
    ]
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[test]
fn every_dtype_and_block_shape_matches_the_cpu_engine() -> Result<()> {
    let Some(kernels) = kernels("every_dtype_and_block_shape_matches_the_cpu_engine") else { return Ok(()) };
    // 300: a warp per row in the launcher's shape; 4099 and 50257: a block per row,
    // odd lengths, so that rows start off 16-byte boundaries.
    for (vocab, rows) in [(300, 13), (4099, 9), (50257, 3)] {
        for dtype in DTYPES {
            for shape in shapes(dtype) {
                let mut case = Case::random(
                    format!("{dtype:?} V={vocab} {shape:?}"),
                    vocab as u64,
                    &[rows, vocab],
                    dtype,
                    rows,
                    vocab,
                )?;
                case.shape = shape;
                case.check(kernels)?;
            }
        }
    }
    Ok(())
}

/// The row's deciding logits sit where only a correct warp reduction finds
/// them: the largest logit, and the target, in lanes 16-31 of a warp that is
/// not the first (a shuffle offset of 8 instead of 16 would leave them out of
/// lane 0's result), and a tie with the target before it (accuracy 0).
#[test]
fn deciding_logits_in_the_upper_half_of_a_warp() -> Result<()> {
    let Some(kernels) = kernels("deciding_logits_in_the_upper_half_of_a_warp") else { return Ok(()) };
    for dtype in DTYPES {
        let pack = 16 / dtype.size_in_bytes();
        for shape in shapes(dtype) {
            let threads = shape.map_or(256, |s| if s.rows_per_block == 1 { s.threads as usize } else { 32 });
            // Whole packs per row, so that every row starts 16-byte aligned and pack k
            // belongs to lane k % threads.
            let vocab = pack * threads * 3;
            let rows = 4;
            let mut values = vec![0f64; rows * vocab];
            let index_of_lane = |lane: usize| (threads * 2 + lane) * pack + 1;
            let labels: Vec<i64> = vec![
                index_of_lane(20) as i64, // the largest logit is the target (accuracy 1)
                3,                        // the largest logit is elsewhere (accuracy 0)
                index_of_lane(29) as i64, // the target ties an earlier logit in lane 18 (accuracy 0)
                index_of_lane(17) as i64, // the target ties a later logit (accuracy 1)
            ];
            let row = |r: usize, j: usize| r * vocab + j;
            values[row(0, index_of_lane(20))] = 9.0;
            values[row(1, index_of_lane(23))] = 9.0;
            values[row(2, index_of_lane(18))] = 7.0;
            values[row(2, index_of_lane(29))] = 7.0;
            values[row(3, index_of_lane(17))] = 6.0;
            values[row(3, index_of_lane(26))] = 6.0;
            let base = Tensor::from_vec(values, (rows, vocab), &Device::Cpu)?.to_dtype(dtype)?;
            let mut case = Case::new(format!("{dtype:?} {shape:?}"), base, labels);
            case.shape = shape;
            case.check(kernels)?;
        }
    }
    Ok(())
}

#[test]
fn more_rows_than_blocks() -> Result<()> {
    let Some(kernels) = kernels("more_rows_than_blocks") else { return Ok(()) };
    for dtype in DTYPES {
        for (vocab, rows_per_block) in [(200, 8), (3001, 1)] {
            let rows = 57;
            let mut case = Case::random(format!("{dtype:?} V={vocab}"), 7, &[rows, vocab], dtype, rows, vocab)?;
            case.shape = Some(LaunchShape { threads: 256, rows_per_block, max_blocks: 3, row_splits: 1 });
            case.check(kernels)?;
        }
    }
    Ok(())
}

#[test]
fn strided_views_in_place() -> Result<()> {
    let Some(kernels) = kernels("strided_views_in_place") else { return Ok(()) };
    fn shifted(t: &Tensor) -> Result<Tensor> {
        // [B, S-1, V] of [B, S, V]: the logits that predict the next token.
        t.narrow(1, 0, t.dim(1)? - 1)
    }
    fn columns(t: &Tensor) -> Result<Tensor> {
        // Rows that start one element in and skip the last: every row off a 16-byte boundary.
        t.narrow(1, 1, t.dim(1)? - 3)
    }
    for dtype in DTYPES {
        for vocab in [301, 4104] {
            let (b, s) = (3, 5);
            let mut case =
                Case::random(format!("{dtype:?} [B, S-1, V={vocab}]"), 11, &[b, s, vocab], dtype, b * (s - 1), vocab)?;
            case.view = shifted;
            case.check(kernels)?;
            let rows = 7;
            let mut case =
                Case::random(format!("{dtype:?} columns of V={vocab}"), 12, &[rows, vocab], dtype, rows, vocab - 3)?;
            case.view = columns;
            case.check(kernels)?;
        }
    }
    Ok(())
}

#[test]
fn ignored_and_out_of_range_labels() -> Result<()> {
    let Some(kernels) = kernels("ignored_and_out_of_range_labels") else { return Ok(()) };
    for dtype in DTYPES {
        for vocab in [100, 5000] {
            let base = random_logits(3, &[6, vocab], dtype)?;
            // Ignored rows (the default -100, and a custom ignore_index of 2).
            let case = Case::new(format!("{dtype:?} ignored"), base.clone(), vec![-100, 1, -100, 0, -100, 7]);
            case.check(kernels)?;
            let mut case = Case::new(format!("{dtype:?} ignore_index 2"), base.clone(), vec![2, 1, 2, 0, -100, 2]);
            case.options.ignore_index = 2;
            case.labels[4] = 3;
            case.check(kernels)?;
            // Out of range: the first bad row is reported, whatever follows.
            for labels in [vec![0, 1, vocab as i64, -5, 2, 3], vec![0, -100, -1, 1, 99999, 0]] {
                Case::new(format!("{dtype:?} bad {labels:?}"), base.clone(), labels).check(kernels)?;
            }
        }
    }
    Ok(())
}

#[test]
fn nan_and_infinite_logits() -> Result<()> {
    let Some(kernels) = kernels("nan_and_infinite_logits") else { return Ok(()) };
    for dtype in DTYPES {
        for vocab in [90, 3000] {
            let rows = 7;
            let mut values = random_logits(5, &[rows, vocab], DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            // The last row: all -inf with label 0, the first largest logit as argmax picks it.
            let labels = vec![4, 4, 4, 4, 4, 4, 0];
            values[vocab + 50] = f64::NAN; // a NaN off the target
            values[2 * vocab + 4] = f64::NAN; // a NaN target
            values[3 * vocab + 60] = f64::INFINITY;
            values[4 * vocab + 70] = f64::NEG_INFINITY;
            values[4 * vocab + 4] = f64::NEG_INFINITY; // a -inf target
            for v in &mut values[5 * vocab..] {
                *v = f64::NEG_INFINITY; // rows of -inf
            }
            let base = Tensor::from_vec(values, (rows, vocab), &Device::Cpu)?.to_dtype(dtype)?;
            Case::new(format!("{dtype:?} V={vocab}"), base, labels).check(kernels)?;
        }
    }
    Ok(())
}

#[test]
fn every_option() -> Result<()> {
    let Some(kernels) = kernels("every_option") else { return Ok(()) };
    // z-loss only changes the upstream gradients, which the cases draw at random.
    for dtype in DTYPES {
        for vocab in [257, 5003] {
            for (softcap, logit_sum) in [(None, true), (Some(5.0), false), (Some(30.0), true)] {
                let rows = 8;
                let mut case = Case::random(
                    format!("{dtype:?} V={vocab} softcap {softcap:?} logit_sum {logit_sum}"),
                    21,
                    &[rows, vocab],
                    dtype,
                    rows,
                    vocab,
                )?;
                case.options.softcap = softcap;
                case.options.logit_sum = logit_sum;
                for shape in shapes(dtype) {
                    case.shape = shape;
                    case.check(kernels)?;
                }
            }
        }
    }
    Ok(())
}

/// Nothing to compute, nothing launched: no launch is described for zero rows
/// or zero classes, in any dtype, entry or block shape; rows that are all
/// ignored are launched and get zero statistics and zero gradients.
#[test]
fn empty_problems() -> Result<()> {
    let Some(kernels) = kernels("empty_problems") else { return Ok(()) };
    let unit = UnitFactors { ce: 1.0, lse: 0.0, lse_squared: 0.0, logit_sum: 0.0 };
    for dtype in DTYPES {
        for dims in [[0, 300], [0, 5000], [4, 0], [0, 0]] {
            let base = Tensor::zeros(&dims[..], dtype, &Device::Cpu)?;
            let geometry = RowGeometry::new(base.layout())?;
            let options = KernelOptions { ignore_index: -100, softcap: None, logit_sum: false, sum_weights: None };
            for shape in shapes(dtype) {
                let shape = shape.unwrap_or_else(|| LaunchShape::for_vocab(dtype, dims[1]));
                assert!(kernel_abi::forward(&geometry, dtype, &options, shape)?.is_none(), "{dims:?}: forward");
                for in_place in [false, true] {
                    let with_grad = kernel_abi::forward_with_grad(&geometry, dtype, &options, &unit, in_place, shape)?;
                    assert!(with_grad.is_none(), "{dims:?}: forward with gradient");
                }
                for in_place in [false, true] {
                    assert!(kernel_abi::backward(&geometry, dtype, &options, in_place, shape)?.is_none(), "{dims:?}");
                }
            }
        }
        for vocab in [300, 5000] {
            let base = random_logits(9, &[6, vocab], dtype)?;
            Case::new(format!("{dtype:?} V={vocab} every row ignored"), base, vec![-100; 6]).check(kernels)?;
        }
    }
    Ok(())
}

/// The labels' conversion (`ce_labels_*`) against the loss's own on the CPU
/// (the same values widened to i64): every label dtype, contiguous and
/// strided, without and with a mask of each kind (1 to 8 bytes, integer or
/// float, strided too: its -0.0 is 0, its NaN is not), more labels than
/// threads, and none.
#[test]
fn labels_of_every_dtype_and_mask() -> Result<()> {
    let Some(kernels) = kernels("labels_of_every_dtype_and_mask") else { return Ok(()) };
    let (b, s) = (3, 700);
    let mut rng = Rng::new(77);
    let values: Vec<i64> = (0..b * (s + 1)).map(|_| rng.below(250) as i64).collect();
    let keep: Vec<f64> = (0..b * (s + 2)).map(|i| [0.0, 1.0, -0.0, 2.5, f64::NAN, 7.0][i % 6]).collect();
    let masks = [
        Tensor::from_vec(keep.iter().map(|&k| u8::from(k != 0.0)).collect::<Vec<_>>(), (b, s + 2), &Device::Cpu)?,
        Tensor::from_vec(
            keep.iter().map(|&k| if k != 0.0 { 1i64 << 40 } else { 0 }).collect::<Vec<_>>(),
            (b, s + 2),
            &Device::Cpu,
        )?,
        Tensor::from_vec(keep.iter().map(|&k| half::bf16::from_f64(k)).collect::<Vec<_>>(), (b, s + 2), &Device::Cpu)?,
        Tensor::from_vec(keep.iter().map(|&k| k as f32).collect::<Vec<_>>(), (b, s + 2), &Device::Cpu)?,
        Tensor::from_vec(keep.clone(), (b, s + 2), &Device::Cpu)?,
    ];
    for dtype in common::LABEL_DTYPES {
        let wide = common::labels_as(&values, &[b, s + 1], dtype, &Device::Cpu)?;
        for (labels, layout) in [(wide.narrow(1, 1, s)?, "strided"), (wide.narrow(1, 1, s)?.copy()?, "contiguous")] {
            let flat: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
            let mask_views = masks.iter().map(|m| m.narrow(1, 2, s)).collect::<Result<Vec<_>>>()?;
            for mask in std::iter::once(None).chain(mask_views.iter().map(Some)) {
                let what = format!("{dtype:?} {layout} labels, mask {:?}", mask.map(|m| m.dtype()));
                let want: Vec<i64> = match mask {
                    None => flat.clone(),
                    Some(m) => {
                        let keep: Vec<f64> = m.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
                        flat.iter().zip(&keep).map(|(&l, &k)| if k != 0.0 { l } else { -7 }).collect()
                    }
                };
                let elements = mask.map(|m| MaskElements::of(m.dtype())).transpose()?;
                let geometry = LabelGeometry::new(labels.layout(), mask.map(|m| m.layout()).zip(elements))?;
                let launch = kernel_abi::labels(&geometry, dtype, -7)?.expect("labels to convert");
                let mut caller = Buffer::from_bytes(&storage_bytes(&labels)?);
                let mut mask_buffer =
                    mask.map(|m| Ok::<_, candle::Error>(Buffer::from_bytes(&storage_bytes(m)?))).transpose()?;
                let mut out = Buffer::filled(want.len(), &0x5a5a5a5a5a5a5a5au64.to_ne_bytes());
                let operands = Operands {
                    caller_labels: Some(&mut caller),
                    mask: mask_buffer.as_mut(),
                    labels: Some(&mut out),
                    ..Default::default()
                };
                run(kernels, &launch, operands);
                let got: Vec<i64> = out
                    .bytes(8 * want.len())
                    .chunks_exact(8)
                    .map(|c| i64::from_ne_bytes(c.try_into().unwrap()))
                    .collect();
                assert_eq!(got, want, "{what}");
            }
        }
        let none = LabelGeometry::new(Tensor::zeros(0, dtype, &Device::Cpu)?.layout(), None)?;
        assert!(kernel_abi::labels(&none, dtype, -100)?.is_none(), "{dtype:?}: no labels, no launch");
    }
    Ok(())
}

/// `[V]` class weights in `dtype`: uniform in `[0, 3)`, about a quarter of
/// them 0, and 0 at each class of `zero_at` (targets, so that the target's
/// `g_sum c_y` term is checked at 0 as well).
fn class_weights(seed: u64, vocab: usize, zero_at: &[i64], dtype: DType) -> Result<Tensor> {
    let mut rng = Rng::new(seed ^ 0xc1a55);
    let mut values: Vec<f64> = (0..vocab).map(|_| if rng.below(4) == 0 { 0.0 } else { 3.0 * rng.unit() }).collect();
    for &class in zero_at {
        values[class as usize] = 0.0;
    }
    Tensor::from_vec(values, vocab, &Device::Cpu)?.to_dtype(dtype)
}

/// Label smoothing with class weights: the class-weighted logit sum, and
/// `g_sum c_j` in every gradient (the forward with gradient, the backward out
/// of place and in place), in every dtype and block shape, with and without
/// the soft-cap. Without the logit sum the forward leaves the weights unread
/// (the plain entry) and the gradients still apply them, as on the CPU.
#[test]
fn class_weighted_logit_sum() -> Result<()> {
    let Some(kernels) = kernels("class_weighted_logit_sum") else { return Ok(()) };
    for dtype in DTYPES {
        for vocab in [257, 5003] {
            for (softcap, logit_sum) in [(None, true), (Some(5.0), true), (None, false)] {
                let rows = 8;
                let mut case = Case::random(
                    format!("{dtype:?} V={vocab} class weights, softcap {softcap:?} logit_sum {logit_sum}"),
                    31,
                    &[rows, vocab],
                    dtype,
                    rows,
                    vocab,
                )?;
                let weights = class_weights(vocab as u64, vocab, &case.labels[..2], acc(dtype))?;
                case.options = KernelOptions { softcap, logit_sum, sum_weights: Some(weights), ..case.options };
                for shape in shapes(dtype) {
                    case.shape = shape;
                    case.check(kernels)?;
                }
            }
        }
    }
    Ok(())
}

/// A marshalling mistake is caught before the kernel runs.
#[test]
fn mismatched_arguments_are_refused() -> Result<()> {
    let Some(kernels) = kernels("mismatched_arguments_are_refused") else { return Ok(()) };
    let logits = random_logits(1, &[2, 8], DType::F32)?;
    let options = KernelOptions { ignore_index: -100, softcap: None, logit_sum: false, sum_weights: None };
    let geometry = RowGeometry::new(logits.layout())?;
    let mut launch = kernel_abi::forward(&geometry, DType::F32, &options, LaunchShape::for_vocab(DType::F32, 8))?
        .expect("2 x 8 has a launch");
    launch.args.swap(5, 6); // rows (i64) and vocab (int)
    let mut buffers: [Buffer; 4] = std::array::from_fn(|_| Buffer::filled(64, &[0]));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let [logits, labels, stats, first_bad_row] = buffers.each_mut();
        let operands = Operands {
            logits: Some(logits),
            labels: Some(labels),
            stats: Some(stats),
            first_bad_row: Some(first_bad_row),
            ..Default::default()
        };
        run(kernels, &launch, operands)
    }));
    let message = caught.expect_err("a swapped argument must be refused");
    let message = message.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("argument 5"), "{message}");
    Ok(())
}

/// A skip shows in `cargo test`'s output, not as a plain `ok`: one test of this
/// binary, run with its output captured (as by default) and no HIP-CPU, puts
/// its `SKIP` line on the process's stderr, which `cargo test` passes to the
/// terminal; with `CHUNKED_CE_REQUIRE_HIP_CPU` set, the same test fails.
#[test]
fn a_skip_shows_in_the_test_output() {
    let test = "mismatched_arguments_are_refused";
    let run = |require: bool| {
        let mut command = Command::new(std::env::current_exe().expect("the test binary's path"));
        command.args(["--exact", test]).env("HIP_CPU_DIR", "/nonexistent").env_remove("RUST_TEST_NOCAPTURE");
        if require {
            command.env("CHUNKED_CE_REQUIRE_HIP_CPU", "1");
        } else {
            command.env_remove("CHUNKED_CE_REQUIRE_HIP_CPU");
        }
        command.output().expect("the test binary runs")
    };
    let skipped = run(false);
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "a skip passes: {stderr}");
    assert!(stderr.contains(&format!("SKIP {test}: HIP-CPU not found at /nonexistent")), "stderr: {stderr}");
    let required = run(true);
    let stdout = String::from_utf8_lossy(&required.stdout);
    assert!(!required.status.success(), "CHUNKED_CE_REQUIRE_HIP_CPU=1 fails the test: {stdout}");
    assert!(
        stdout.contains("HIP-CPU not found at /nonexistent (set HIP_CPU_DIR) (CHUNKED_CE_REQUIRE_HIP_CPU"),
        "{stdout}"
    );
}
