//! The `finetune_gpt2` example's kernels, compiled for the CPU with HIP-CPU
//! (`tests/hip_cpu/library.rs`) and launched with the arguments the example's
//! launchers pass (module `cuda` of `adamw.rs` and `softmax.rs`): AdamW's
//! (`adamw.cu`) against candle-nn's update written with candle's tensor
//! operations on the CPU, bit for bit, for a parameter longer than the grid
//! (the kernels' grid-stride loops) and of a length no block size divides;
//! the causal softmax's (`softmax.cu`), the layer norm's (`layer_norm.cu`)
//! the GELU's (`gelu.cu`) and the Conv1D bias's (`bias.cu`) against their
//! ops' CPU engines, forward and
//! backward, with more rows (elements) than the grid holds warps (threads);
//! the clipping's sum of squares (`sum_squares.cu`) block by block against
//! the host's f64 sums of the same grid-stride shares; the token embedding's
//! backward (`embedding.cu`) against its op on the CPU, bit for bit; the
//! column sums (`column_sums.cu`) against the host's sums in the kernels'
//! order, bit for bit.
//!
//! Without HIP-CPU, a C++ compiler or TBB the test prints why it skips; with
//! `CHUNKED_CE_REQUIRE_HIP_CPU=1` (set by `.ci/run`) it fails instead.
//!
//! Here the tests; `tests/example_kernels_on_cpu/harness.rs` builds the
//! kernels, launches one and makes the inputs.
#![cfg(target_os = "linux")]

#[path = "../examples/finetune_gpt2/bias.rs"]
mod bias;
#[path = "common/checkout.rs"]
mod checkout;
#[path = "../examples/finetune_gpt2/column_sums.rs"]
mod column_sums;
#[path = "../examples/finetune_gpt2/embedding.rs"]
#[allow(dead_code)]
mod embedding;
#[path = "../examples/finetune_gpt2/gelu.rs"]
mod gelu;
#[path = "example_kernels_on_cpu/harness.rs"]
mod harness;
#[path = "hip_cpu/library.rs"]
mod hip_library;
#[path = "../examples/finetune_gpt2/layer_norm.rs"]
mod layer_norm;
#[path = "../examples/finetune_gpt2/softmax.rs"]
mod softmax;
#[path = "../examples/finetune_gpt2/storage.rs"]
#[allow(dead_code)]
mod storage;

use candle::{Device, Tensor};
use harness::{launch, launcher, values, Arg};

#[test]
fn adamw_kernels_are_candle_nns_update_bit_for_bit() -> candle::Result<()> {
    let Some(launch_fn) = launcher("adamw_kernels_are_candle_nns_update_bit_for_bit") else { return Ok(()) };
    let n = 1000;
    let (mut theta, mut m, mut v, g) = (values(n, 1), values(n, 2), values(n, 3), values(n, 4));
    v.iter_mut().for_each(|x| *x = x.abs());
    g.iter().zip(&mut m).step_by(7).for_each(|(_, m)| *m = 0.0);
    let (beta1, beta2, lr, weight_decay, eps, t) = (0.9f64, 0.999f64, 3e-2f64, 0.1f64, 1e-8f64, 3);
    let scale_m = 1.0 / (1.0 - beta1.powi(t));
    let scale_v = 1.0 / (1.0 - beta2.powi(t));
    let decay = 1.0 - lr * weight_decay;

    // The gradients' scale (a clipping factor) that the moments apply first.
    let scale = 0.37f32;

    // candle-nn's AdamW step, operation by operation, on the CPU, on the
    // gradients scaled by broadcast_mul.
    let tensor = |x: &[f32]| Tensor::new(x, &Device::Cpu);
    let (t_theta, t_m, t_v) = (tensor(&theta)?, tensor(&m)?, tensor(&v)?);
    let t_g = tensor(&g)?.broadcast_mul(&Tensor::new(scale, &Device::Cpu)?)?;
    let next_m = ((&t_m * beta1)? + (&t_g * (1.0 - beta1))?)?;
    let next_v = ((&t_v * beta2)? + (t_g.sqr()? * (1.0 - beta2))?)?;
    let adjusted = ((&next_m * scale_m)? / ((&next_v * scale_v)?.sqrt()? + eps)?)?;
    let next_theta = ((&t_theta * decay)? - (adjusted * lr)?)?;

    // The kernels, on a grid of 3 x 64 threads: each thread visits several elements.
    let (blocks, threads, len) = (3, 64, n as i64);
    let f = |x: f64| x as f32;
    launch(
        launch_fn,
        "adamw_first_moment",
        blocks,
        threads,
        &mut [
            Arg::Floats(&mut m),
            Arg::Floats(&mut g.clone()),
            Arg::Floats(&mut [scale]),
            Arg::I64(len),
            Arg::F32(f(beta1)),
            Arg::F32(f(1.0 - beta1)),
        ],
    );
    launch(
        launch_fn,
        "adamw_second_moment",
        blocks,
        threads,
        &mut [
            Arg::Floats(&mut v),
            Arg::Floats(&mut g.clone()),
            Arg::Floats(&mut [scale]),
            Arg::I64(len),
            Arg::F32(f(beta2)),
            Arg::F32(f(1.0 - beta2)),
        ],
    );
    let coefficients = [scale_m, scale_v, eps, decay, lr].map(|c| Arg::F32(f(c)));
    let (mut m_read, mut v_read) = (m.clone(), v.clone());
    let mut args = vec![Arg::Floats(&mut theta), Arg::Floats(&mut m_read), Arg::Floats(&mut v_read), Arg::I64(len)];
    args.extend(coefficients);
    launch(launch_fn, "adamw_update", blocks, threads, &mut args);

    for (what, got, want) in [("m", &m, &next_m), ("v", &v, &next_v), ("theta", &theta, &next_theta)] {
        let want = want.to_vec1::<f32>()?;
        let differ: Vec<usize> = (0..n).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
        assert!(
            differ.is_empty(),
            "{what}: {} of {n} differ, first at {}: {} vs {}",
            differ.len(),
            differ[0],
            got[differ[0]],
            want[differ[0]]
        );
    }
    Ok(())
}

/// Both softmax kernels on 2 x 3 x 37 x 37 scores, a grid of 4 blocks of 8
/// warps (32 rows at a time, 222 rows), against the op on the CPU: the same
/// formula, summed in another order.
#[test]
fn causal_softmax_kernels_match_the_cpu_op() -> candle::Result<()> {
    let Some(launch_fn) = launcher("causal_softmax_kernels_match_the_cpu_op") else { return Ok(()) };
    let (t, rows) = (37usize, 2 * 3 * 37);
    let scale = 0.125f32;
    let scores = values(rows * t, 5).into_iter().map(|x| 6.0 * x).collect::<Vec<f32>>();
    let upstream = values(rows * t, 6);
    let var = candle::Var::from_tensor(&Tensor::from_vec(scores.clone(), (2, 3, t, t), &Device::Cpu)?)?;
    let want_probs = softmax::causal_softmax(var.as_tensor(), f64::from(scale))?;
    let upstream_t = Tensor::from_vec(upstream.clone(), (2, 3, t, t), &Device::Cpu)?;
    let grads = (&want_probs * &upstream_t)?.sum_all()?.backward()?;
    let want_grad = grads.get(var.as_tensor()).expect("a gradient").flatten_all()?.to_vec1::<f32>()?;
    let want_probs = want_probs.flatten_all()?.to_vec1::<f32>()?;

    let (blocks, threads) = (4, 256);
    let mut probs = vec![f32::NAN; rows * t];
    let (rows_arg, t_arg) = (rows as i64, t as i32);
    let mut scores_in = scores.clone();
    launch(
        launch_fn,
        "causal_softmax_fwd",
        blocks,
        threads,
        &mut [
            Arg::Floats(&mut scores_in),
            Arg::Floats(&mut probs),
            Arg::I64(rows_arg),
            Arg::I32(t_arg),
            Arg::F32(scale),
        ],
    );
    let mut grad = vec![f32::NAN; rows * t];
    let (mut probs_in, mut upstream_in) = (probs.clone(), upstream.clone());
    launch(
        launch_fn,
        "causal_softmax_bwd",
        blocks,
        threads,
        &mut [
            Arg::Floats(&mut probs_in),
            Arg::Floats(&mut upstream_in),
            Arg::Floats(&mut grad),
            Arg::I64(rows_arg),
            Arg::I32(t_arg),
            Arg::F32(scale),
        ],
    );
    for (what, got, want) in [("probabilities", &probs, &want_probs), ("gradient", &grad, &want_grad)] {
        let largest = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * largest.max(1.0),
                "{what}[{i}] (row {}, column {}): {g} vs {w}",
                i / t,
                i % t
            );
        }
    }
    Ok(())
}

/// Both layer-norm kernels on 2 x 37 rows of 70 (more rows than the grid's 2 x
/// 8 warps, a width no warp divides), against the op on the CPU: the output,
/// then `dx` and `dy n` (whose row sums are the gain's gradient).
#[test]
fn layer_norm_kernels_match_the_cpu_op() -> candle::Result<()> {
    let Some(launch_fn) = launcher("layer_norm_kernels_match_the_cpu_op") else { return Ok(()) };
    let (rows, width, eps) = (74usize, 70usize, 1e-5f32);
    let x = values(rows * width, 7).into_iter().map(|v| 3.0 * v + 1.0).collect::<Vec<f32>>();
    let (gamma, beta, dy) = (values(width, 8), values(width, 9), values(rows * width, 10));
    let cpu = |v: &[f32], dims: &[usize]| Tensor::from_vec(v.to_vec(), dims, &Device::Cpu);
    let xv = candle::Var::from_tensor(&cpu(&x, &[2, 37, width])?)?;
    let gv = candle::Var::from_tensor(&cpu(&gamma, &[width])?)?;
    let want_y = layer_norm::layer_norm(xv.as_tensor(), gv.as_tensor(), &cpu(&beta, &[width])?, f64::from(eps))?;
    let grads = (&want_y * cpu(&dy, &[2, 37, width])?)?.sum_all()?.backward()?;
    let want_dx = grads.get(xv.as_tensor()).expect("dx").flatten_all()?.to_vec1::<f32>()?;
    let want_dgamma = grads.get(gv.as_tensor()).expect("dgamma").to_vec1::<f32>()?;
    let want_y = want_y.flatten_all()?.to_vec1::<f32>()?;

    let (blocks, threads) = (2, 256);
    let (rows_arg, width_arg) = (rows as i64, width as i32);
    let mut y = vec![f32::NAN; rows * width];
    let (mut x_in, mut gamma_in, mut beta_in) = (x.clone(), gamma.clone(), beta.clone());
    launch(
        launch_fn,
        "layer_norm_fwd",
        blocks,
        threads,
        &mut [
            Arg::Floats(&mut x_in),
            Arg::Floats(&mut gamma_in),
            Arg::Floats(&mut beta_in),
            Arg::Floats(&mut y),
            Arg::I64(rows_arg),
            Arg::I32(width_arg),
            Arg::F32(eps),
        ],
    );
    let mut out = vec![f32::NAN; 2 * rows * width];
    let mut dy_in = dy.clone();
    launch(
        launch_fn,
        "layer_norm_bwd",
        blocks,
        threads,
        &mut [
            Arg::Floats(&mut x_in),
            Arg::Floats(&mut gamma_in),
            Arg::Floats(&mut dy_in),
            Arg::Floats(&mut out),
            Arg::I64(rows_arg),
            Arg::I32(width_arg),
            Arg::F32(eps),
        ],
    );
    let (dx, dy_n) = out.split_at(rows * width);
    let dgamma: Vec<f32> = (0..width).map(|j| (0..rows).map(|r| dy_n[r * width + j]).sum()).collect();
    for (what, got, want) in
        [("y", &y[..], &want_y[..]), ("dx", dx, &want_dx[..]), ("dgamma", &dgamma[..], &want_dgamma[..])]
    {
        let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 2e-5 * largest.max(1.0), "{what}[{i}]: {g} vs {w}");
        }
    }
    Ok(())
}

/// Both GELU kernels over 1000 elements on 2 x 64 threads (the grid-stride
/// loop), against the op on the CPU.
#[test]
fn gelu_kernels_match_the_cpu_op() -> candle::Result<()> {
    let Some(launch_fn) = launcher("gelu_kernels_match_the_cpu_op") else { return Ok(()) };
    let n = 1000usize;
    let x = values(n, 11).into_iter().map(|v| 5.0 * v).collect::<Vec<f32>>();
    let dy = values(n, 12);
    let xv = candle::Var::from_tensor(&Tensor::from_vec(x.clone(), n, &Device::Cpu)?)?;
    let want_y = gelu::gelu(xv.as_tensor())?;
    let grads = (&want_y * Tensor::from_vec(dy.clone(), n, &Device::Cpu)?)?.sum_all()?.backward()?;
    let want_dx = grads.get(xv.as_tensor()).expect("dx").to_vec1::<f32>()?;
    let want_y = want_y.to_vec1::<f32>()?;
    let (mut x_in, mut dy_in) = (x.clone(), dy.clone());
    let (mut y, mut dx) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    launch(launch_fn, "gelu_fwd", 2, 64, &mut [Arg::Floats(&mut x_in), Arg::Floats(&mut y), Arg::I64(n as i64)]);
    let mut args = [Arg::Floats(&mut x_in), Arg::Floats(&mut dy_in), Arg::Floats(&mut dx), Arg::I64(n as i64)];
    launch(launch_fn, "gelu_bwd", 2, 64, &mut args);
    for (what, got, want) in [("y", &y, &want_y), ("dx", &dx, &want_dx)] {
        for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{what}[{i}] at x = {}: {g} vs {w}", x[i]);
        }
    }
    Ok(())
}

/// The bias kernel over 37 rows of 70 on 2 x 64 threads, against the op on the CPU.
#[test]
fn add_bias_kernel_matches_the_cpu_op() -> candle::Result<()> {
    let Some(launch_fn) = launcher("add_bias_kernel_matches_the_cpu_op") else { return Ok(()) };
    let (rows, width) = (37usize, 70usize);
    let (x, b) = (values(rows * width, 13), values(width, 14));
    let want = bias::add_bias(
        &Tensor::from_vec(x.clone(), (rows, width), &Device::Cpu)?,
        &Tensor::from_vec(b.clone(), width, &Device::Cpu)?,
    )?
    .flatten_all()?
    .to_vec1::<f32>()?;
    let (mut x_in, mut b_in, mut y) = (x.clone(), b.clone(), vec![f32::NAN; rows * width]);
    let mut args = [
        Arg::Floats(&mut x_in),
        Arg::Floats(&mut b_in),
        Arg::Floats(&mut y),
        Arg::I64((rows * width) as i64),
        Arg::I32(width as i32),
    ];
    launch(launch_fn, "add_bias", 2, 64, &mut args);
    assert_eq!(y, want, "x + b, exactly");
    Ok(())
}

/// The sum-of-squares kernel over 6221 elements on 4 x 256 threads (the
/// launcher's block size; several elements a thread): each block's partial
/// sum against the host's f64 sum of the elements its threads stride over,
/// and no slot written past the grid's.
#[test]
fn sum_squares_kernel_sums_each_blocks_share() -> candle::Result<()> {
    let Some(launch_fn) = launcher("sum_squares_kernel_sums_each_blocks_share") else { return Ok(()) };
    let (n, blocks, threads) = (6221usize, 4usize, 256usize);
    let mut x: Vec<f32> = values(n, 15).into_iter().map(|v| 3.0 * v).collect();
    let mut want = vec![0f64; blocks];
    for (i, &v) in x.iter().enumerate() {
        want[i % (blocks * threads) / threads] += f64::from(v) * f64::from(v);
    }
    let mut partials = vec![f64::NAN; blocks + 1];
    let mut args = [Arg::Floats(&mut x), Arg::I64(n as i64), Arg::Doubles(&mut partials)];
    launch(launch_fn, "sum_squares", blocks as u32, threads as u32, &mut args);
    for (b, (&got, &want)) in partials.iter().zip(&want).enumerate() {
        assert!((got - want).abs() <= 1e-12 * want, "block {b}: {got} vs {want}");
    }
    assert!(partials[blocks].is_nan(), "a slot past the grid's was written: {}", partials[blocks]);
    Ok(())
}

/// The embedding's backward over 700 positions of repeated ids (an id first
/// seen in the second tile of 256, one only at the last position, one never,
/// `u32::MAX` and one outside the vocabulary) and rows of 300 (more than a
/// block's threads), added into sums that start nonzero, on 37 blocks (fewer
/// than the positions: the grid-stride loop) of 256 and of 128 threads,
/// against the op on the CPU bit for bit, without the outside id's row (the
/// kernel skips it; the CPU op refuses it).
#[test]
fn embedding_kernel_sums_rows_as_the_cpu_op() -> candle::Result<()> {
    let Some(launch_fn) = launcher("embedding_kernel_sums_rows_as_the_cpu_op") else { return Ok(()) };
    let (n, vocab, width) = (700usize, 11usize, 300usize);
    let mut ids: Vec<u32> = (0..n).map(|i| ((i * i + 3 * i) % 7) as u32).collect();
    (ids[301], ids[377], ids[n - 1], ids[500], ids[9]) = (7, 7, 8, vocab as u32, u32::MAX);
    let (grad, start) = (values(n * width, 16), values(vocab * width, 17));
    let inside: Vec<usize> = (0..n).filter(|&i| ids[i] as usize != vocab).collect();
    let want = Tensor::from_vec(start.clone(), (vocab, width), &Device::Cpu)?;
    embedding::add_embedding_grad(
        &want,
        &Tensor::new(inside.iter().map(|&i| ids[i]).collect::<Vec<_>>().as_slice(), &Device::Cpu)?,
        &Tensor::from_vec(
            inside.iter().flat_map(|&i| grad[i * width..][..width].to_vec()).collect(),
            (inside.len(), width),
            &Device::Cpu,
        )?,
    )?;
    let want = want.flatten_all()?.to_vec1::<f32>()?;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for threads in [256, 128] {
        let (mut grad_in, mut sums) = (grad.clone(), start.clone());
        let mut args = [
            Arg::Floats(&mut grad_in),
            Arg::U32s(&mut ids),
            Arg::Floats(&mut sums),
            Arg::I64(n as i64),
            Arg::I32(width as i32),
            Arg::I64(vocab as i64),
        ];
        launch(launch_fn, "embedding_bwd", 37, threads, &mut args);
        assert_eq!(bits(&sums), bits(&want), "{threads} threads: the sums, bit for bit");
    }
    Ok(())
}

/// The column sums' two kernels over 300 x 70 (three blocks of 32 columns,
/// the last short) in segments of 64 rows (the last short), on 256 and 128
/// threads a block, and over 5000 x 70 as `cuda_plan` splits it: the
/// partial sums and the sums against the host's in the kernels' order
/// (warp w adds rows w, w + warps, .. of its segment; the warps' sums in
/// warp order; the segments' in segment order), bit for bit, and within f32
/// rounding of candle's `sum(0)`.
#[test]
fn column_sums_kernels_sum_in_their_order() -> candle::Result<()> {
    let Some(launch_fn) = launcher("column_sums_kernels_sum_in_their_order") else { return Ok(()) };
    let width = 70usize;
    let planned = column_sums::cuda_plan(5000, width);
    for (rows, (segment, parts), threads) in [(300usize, (64, 5), 256usize), (300, (64, 5), 128), (5000, planned, 256)]
    {
        let what = format!("{rows} x {width}, segments of {segment}, {threads} threads");
        assert_eq!(parts, rows.div_ceil(segment), "{what}: parts");
        let mut x = values(rows * width, 18);
        let warps = threads / 32;
        let mut want_partials = vec![0f32; parts * width];
        for (part, partials) in want_partials.chunks_mut(width).enumerate() {
            let segment_rows: Vec<usize> = (part * segment..rows.min((part + 1) * segment)).collect();
            for (column, partial) in partials.iter_mut().enumerate() {
                let warp_sum =
                    |w: usize| segment_rows.iter().skip(w).step_by(warps).fold(0f32, |s, &r| s + x[r * width + column]);
                *partial = (0..warps).fold(0f32, |s, w| s + warp_sum(w));
            }
        }
        let want: Vec<f32> =
            (0..width).map(|c| (0..parts).fold(0f32, |s, p| s + want_partials[p * width + c])).collect();
        let mut partials = vec![f32::NAN; parts * width];
        let blocks = (width.div_ceil(32) * parts) as u32;
        let mut args = [
            Arg::Floats(&mut x),
            Arg::I64(rows as i64),
            Arg::I32(width as i32),
            Arg::I64(segment as i64),
            Arg::Floats(&mut partials),
        ];
        launch(launch_fn, "column_sums_partial", blocks, threads as u32, &mut args);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&partials), bits(&want_partials), "{what}: the partial sums, bit for bit");
        let mut sums = vec![f32::NAN; width];
        let mut args =
            [Arg::Floats(&mut partials), Arg::I32(parts as i32), Arg::I32(width as i32), Arg::Floats(&mut sums)];
        launch(launch_fn, "column_sums_finish", 1, 64, &mut args);
        assert_eq!(bits(&sums), bits(&want), "{what}: the sums, bit for bit");
        let candle_sums = Tensor::from_vec(x, (rows, width), &Device::Cpu)?.sum(0)?.to_vec1::<f32>()?;
        for (c, (&got, &expected)) in sums.iter().zip(&candle_sums).enumerate() {
            // Values in [-1, 1): reordered f32 sums differ by 1e-5 or so; an element lost or
            // added, by its value.
            assert!((got - expected).abs() <= 1e-3, "{what}: column {c}: {got} vs candle's {expected}");
        }
    }
    Ok(())
}
