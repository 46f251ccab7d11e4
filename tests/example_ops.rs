//! The `finetune_gpt2` example's ops with their own backward, against
//! candle's primitives: the causal softmax (`softmax.rs`) against scale, add
//! the causal mask and `candle_nn::ops::softmax`, for a `T` that is no
//! multiple of a warp and for `T = 1`; the layer norm (`layer_norm.rs`)
//! against `candle_nn::ops::layer_norm_slow`, for widths below, at and above a
//! warp's multiple; GPT-2's GELU (`gelu.rs`) against candle's `gelu` (whose
//! backward rounds the constants to six digits) and against its definition
//! in f64; the Conv1D bias (`bias.rs`)
//! against `broadcast_add`; the token embedding (`embedding.rs`) against
//! `index_select` and, bit for bit, its backward against `index_add`; the
//! column sums of their backward (`column_sums.rs`) against candle's `sum(0)`
//! (bit for bit on the CPU). Values and every input's
//! gradient under a random upstream
//! gradient. The clipping's sum of squares (`sum_squares.rs`) against one
//! formed in f64 on the host. On the CPU, and on CUDA (their kernels) when a GPU is there
//! (skipping without one, failing with `CHUNKED_CE_REQUIRE_CUDA` set).

#[path = "../examples/finetune_gpt2/bias.rs"]
mod bias;
#[path = "../examples/finetune_gpt2/column_sums.rs"]
mod column_sums;
#[path = "../examples/finetune_gpt2/embedding.rs"]
mod embedding;
#[path = "../examples/finetune_gpt2/gelu.rs"]
mod gelu;
#[path = "../examples/finetune_gpt2/layer_norm.rs"]
mod layer_norm;
#[path = "../examples/finetune_gpt2/softmax.rs"]
mod softmax;
#[path = "../examples/finetune_gpt2/storage.rs"]
#[allow(dead_code)]
mod storage;
#[path = "../examples/finetune_gpt2/sum_squares.rs"]
mod sum_squares;

use candle::{DType, Device, Tensor, Var, D};

/// The primitives' causal softmax of `[.., T, T]` scores.
fn primitive(scores: &Tensor, scale: f64) -> candle::Result<Tensor> {
    let t = scores.dim(D::Minus1)?;
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask, (t, t), scores.device())?;
    candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&mask)?, D::Minus1)
}

fn max_diff(a: &Tensor, b: &Tensor) -> candle::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn matches_the_primitives(device: &Device) -> candle::Result<()> {
    for dims in [[2usize, 3, 37, 37], [1, 1, 1, 1], [1, 2, 70, 70]] {
        let scores = Var::from_tensor(&(Tensor::randn(0f32, 3.0, &dims, device)?))?;
        let upstream = Tensor::randn(0f32, 1.0, &dims, device)?;
        let scale = 0.125;
        let ours = softmax::causal_softmax(scores.as_tensor(), scale)?;
        let theirs = primitive(scores.as_tensor(), scale)?;
        let what = format!("{dims:?} on {:?}", device.location());
        assert!(max_diff(&ours, &theirs)? <= 1e-6, "{what}: probabilities differ by {}", max_diff(&ours, &theirs)?);
        let grad = |probs: &Tensor| -> candle::Result<Tensor> {
            let grads = (probs * &upstream)?.sum_all()?.backward()?;
            Ok(grads.get(scores.as_tensor()).expect("a gradient for the scores").clone())
        };
        let (ours, theirs) = (grad(&ours)?, grad(&theirs)?);
        let scale_of = theirs.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let diff = max_diff(&ours, &theirs)?;
        assert!(diff <= 1e-5 * scale_of.max(1.0), "{what}: gradients differ by {diff} (largest {scale_of})");
        // Above the diagonal: nothing, exactly.
        let t = dims[3];
        let above: Vec<f32> = ours.flatten_all()?.to_vec1::<f32>()?;
        assert!(above.iter().enumerate().all(|(k, &x)| (k % t) <= (k / t) % t || x == 0.0), "{what}: masked gradient");
    }
    let f64_scores = Tensor::zeros((1, 1, 4, 4), DType::F64, device)?;
    let err = softmax::causal_softmax(&f64_scores, 1.0).expect_err("f64 scores").to_string();
    assert!(err.contains("f32"), "{err}");
    let err =
        softmax::causal_softmax(&Tensor::zeros((1, 4, 5), DType::F32, device)?, 1.0).expect_err("[4, 5]").to_string();
    assert!(err.contains("[.., T, T]"), "{err}");
    Ok(())
}

/// `|a - b| <= tol max(|b|, 1)` over all elements.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) -> candle::Result<()> {
    let largest = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let diff = max_diff(a, b)?;
    assert!(diff <= tol * largest.max(1.0), "{what}: differ by {diff} (largest {largest})");
    Ok(())
}

fn layer_norm_matches_the_primitives(device: &Device) -> candle::Result<()> {
    for (rows, width) in [(5usize, 7usize), (3, 64), (4, 768), (1, 1)] {
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (2, rows, width), device)? + 3.0)?)?;
        let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.5, width, device)?)?;
        let beta = Var::from_tensor(&Tensor::randn(0f32, 0.5, width, device)?)?;
        let upstream = Tensor::randn(0f32, 1.0, (2, rows, width), device)?;
        let what = format!("[2, {rows}, {width}] on {:?}", device.location());
        let run = |ours: bool| -> candle::Result<[Tensor; 4]> {
            let y = if ours {
                layer_norm::layer_norm(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5)?
            } else {
                candle_nn::ops::layer_norm_slow(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5)?
            };
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            let grad = |v: &Var| grads.get(v.as_tensor()).expect("a gradient").clone();
            Ok([y.clone(), grad(&x), grad(&gamma), grad(&beta)])
        };
        let (ours, theirs) = (run(true)?, run(false)?);
        for (name, (a, b)) in ["y", "dx", "dgamma", "dbeta"].iter().zip(ours.iter().zip(&theirs)) {
            assert_close(&format!("{what}: {name}"), a, b, 2e-5)?;
        }
    }
    let x = Tensor::zeros((2, 4), DType::F32, device)?;
    let err =
        layer_norm::layer_norm(&x, &Tensor::ones(3, DType::F32, device)?, &Tensor::zeros(4, DType::F32, device)?, 1e-5)
            .expect_err("a [3] gain for width 4")
            .to_string();
    assert!(err.contains("must be [4]"), "{err}");
    let err = layer_norm::layer_norm(&x.to_dtype(DType::F64)?, &x, &x, 1e-5).expect_err("f64").to_string();
    assert!(err.contains("f32"), "{err}");
    Ok(())
}

fn on_every_device(test: fn(&Device) -> candle::Result<()>) -> candle::Result<()> {
    test(&Device::Cpu)?;
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(device) => test(&device)?,
        Err(e) => {
            assert!(std::env::var_os("CHUNKED_CE_REQUIRE_CUDA").is_none(), "no CUDA device: {e}");
            eprintln!("SKIP the CUDA half: no CUDA device");
        }
    }
    Ok(())
}

fn gelu_matches_candles(device: &Device) -> candle::Result<()> {
    // Both tails, the bend near 0 and an odd length.
    let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, 1001, device)?))?;
    let upstream = Tensor::randn(0f32, 1.0, 1001, device)?;
    let run = |ours: bool| -> candle::Result<[Tensor; 2]> {
        let y = if ours { gelu::gelu(x.as_tensor())? } else { x.as_tensor().gelu()? };
        let grads = (&y * &upstream)?.sum_all()?.backward()?;
        Ok([y.clone(), grads.get(x.as_tensor()).expect("a gradient").clone()])
    };
    let ([y, dx], [want_y, want_dx]) = (run(true)?, run(false)?);
    let what = format!("gelu on {:?}", device.location());
    assert_close(&format!("{what}: y"), &y, &want_y, 1e-6)?;
    // candle's six-digit constants: about 1e-6 of the slope.
    assert_close(&format!("{what}: dx"), &dx, &want_dx, 1e-5)?;
    let err = gelu::gelu(&x.as_tensor().to_dtype(DType::F64)?).expect_err("f64").to_string();
    assert!(err.contains("f32"), "{err}");
    Ok(())
}

/// GELU and its slope from their definition (`gelu.rs`'s module docs) in f64.
fn gelu_f64(x: f64) -> (f64, f64) {
    let a = (2.0 / std::f64::consts::PI).sqrt();
    let t = (a * (x + 0.044715 * x * x * x)).tanh();
    (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * a * (1.0 + 3.0 * 0.044715 * x * x))
}

fn gelu_is_accurate(device: &Device) -> candle::Result<()> {
    // Where tanh u nears ±1 (|x| from 3 to 6) the tanh form's `1 - tanh² u`
    // cancels: its slope is off by up to 1.2e-6 there, this op's by 2e-7.
    // Far below 0, where e^(-2u) would overflow: 0, not a slope growing with x³.
    let far = [-30.0, -1e3, -1e13, -1e19, 30.0, 1e3, 1e19];
    let xs: Vec<f32> = (-6000..=6000).map(|i| i as f32 * 2e-3).chain(far).collect();
    let x = Var::from_tensor(&Tensor::new(xs.as_slice(), device)?)?;
    let y = gelu::gelu(x.as_tensor())?;
    let grads = y.sum_all()?.backward()?;
    let slope = grads.get(x.as_tensor()).expect("a gradient").to_vec1::<f32>()?;
    for ((&x, y), slope) in xs.iter().zip(y.to_vec1::<f32>()?).zip(slope) {
        let (want_y, want_slope) = gelu_f64(f64::from(x));
        let what = format!("gelu at x = {x} on {:?}", device.location());
        assert!((f64::from(y) - want_y).abs() <= 4e-7 * want_y.abs().max(1.0), "{what}: {y} vs {want_y}");
        assert!((f64::from(slope) - want_slope).abs() <= 4e-7, "{what}: slope {slope} vs {want_slope}");
    }
    Ok(())
}

fn add_bias_matches_broadcast_add(device: &Device) -> candle::Result<()> {
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, 70), device)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 70, device)?)?;
    let upstream = Tensor::randn(0f32, 1.0, (3, 5, 70), device)?;
    let run = |ours: bool| -> candle::Result<[Tensor; 3]> {
        let y = if ours {
            bias::add_bias(x.as_tensor(), b.as_tensor())?
        } else {
            x.as_tensor().broadcast_add(b.as_tensor())?
        };
        let grads = (&y * &upstream)?.sum_all()?.backward()?;
        let grad = |v: &Var| grads.get(v.as_tensor()).expect("a gradient").clone();
        Ok([y.clone(), grad(&x), grad(&b)])
    };
    let (ours, theirs) = (run(true)?, run(false)?);
    for (name, (a, b)) in ["y", "dx", "dbias"].iter().zip(ours.iter().zip(&theirs)) {
        assert_close(&format!("add_bias on {:?}: {name}", device.location()), a, b, 1e-6)?;
    }
    let err = bias::add_bias(x.as_tensor(), &Tensor::zeros(69, DType::F32, device)?).expect_err("[69]").to_string();
    assert!(err.contains("bias [70]"), "{err}");
    Ok(())
}

/// Ids `[n]` over a vocabulary of `vocab`: most from its first 7 (each many
/// times, in every tile of 256 positions), one first seen past position 300,
/// one only at the last position, `vocab - 1` never (a zero row), and two
/// positions with no row (`u32::MAX`).
fn repeated_ids(n: usize, vocab: u32) -> Vec<u32> {
    assert!(vocab >= 10 && n > 400);
    let mut ids: Vec<u32> = (0..n).map(|i| ((i * i + 3 * i) % 7) as u32).collect();
    (ids[301], ids[377], ids[n - 1]) = (7, 7, 8);
    (ids[5], ids[260]) = (u32::MAX, u32::MAX);
    ids
}

/// The embedding's rows are `index_select`'s, exactly (a zero row for
/// `u32::MAX`); the table's gradient, through candle's backward and from
/// `embedding_grad`, is `index_add`'s into zeros bit for bit (the same
/// additions in the same order, `u32::MAX` skipped), and `add_embedding_grad`
/// into another gradient is that gradient plus those sums, bit for bit, for
/// 700 positions of repeated ids and rows wider than a CUDA block. An id
/// outside the vocabulary (on the CPU), a wrong dtype, width or layout are
/// refused by name.
fn embedding_matches_index_select_and_index_add(device: &Device) -> candle::Result<()> {
    let (n, vocab, width) = (700usize, 11usize, 300usize);
    let what = format!("on {:?}", device.location());
    let table = Var::from_tensor(&Tensor::randn(0f32, 1.0, (vocab, width), device)?)?;
    let ids = Tensor::new(repeated_ids(n, vocab as u32).as_slice(), device)?;
    let upstream = Tensor::randn(0f32, 1.0, (n, width), device)?;
    let rows = embedding::embedding(table.as_tensor(), &ids)?;
    let want_rows = table.as_tensor().index_select(&ids, 0)?;
    assert_eq!(rows.to_vec2::<f32>()?, want_rows.to_vec2::<f32>()?, "{what}: rows");
    let sums = table.zeros_like()?.index_add(&ids, &upstream, 0)?;
    let want = sums.to_vec2::<f32>()?;
    let direct = embedding::embedding_grad(&ids, &upstream, vocab)?.to_vec2::<f32>()?;
    let bits = |m: &[Vec<f32>]| m.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&direct), bits(&want), "{what}: embedding_grad against index_add, bit for bit");
    assert!(want[vocab - 1].iter().all(|&v| v == 0.0), "{what}: the test wants an unused id");
    let grads = (&rows * &upstream)?.sum_all()?.backward()?;
    let through_graph = grads.get(table.as_tensor()).expect("the table's gradient").to_vec2::<f32>()?;
    assert_eq!(through_graph, want, "{what}: through candle's backward");
    // Into another gradient, in place: what candle's backward adds when the table has one.
    let head = Tensor::randn(0f32, 1.0, (vocab, width), device)?;
    let want_added = (&head + &sums)?.to_vec2::<f32>()?;
    let added = head.copy()?;
    embedding::add_embedding_grad(&added, &ids, &upstream)?;
    assert_eq!(bits(&added.to_vec2::<f32>()?), bits(&want_added), "{what}: added in place, bit for bit");
    let outside = Tensor::new(&[3u32, vocab as u32], device)?;
    if device.is_cpu() {
        let err = embedding::embedding_grad(&outside, &upstream.narrow(0, 0, 2)?, vocab).expect_err("id 11");
        assert!(err.to_string().contains("id 11 is outside the vocabulary of 11"), "{what}: {err}");
    }
    let err = embedding::embedding(&table.to_dtype(DType::F64)?, &ids).expect_err("f64").to_string();
    assert!(err.contains("an f32 table"), "{what}: {err}");
    let err = embedding::add_embedding_grad(&head.narrow(1, 0, 7)?, &ids, &upstream).expect_err("width");
    assert!(err.to_string().contains("sums [V, 300] f32"), "{what}: {err}");
    let transposed = Tensor::zeros((width, vocab), DType::F32, device)?.t()?;
    let err = embedding::add_embedding_grad(&transposed, &ids, &upstream).expect_err("strided").to_string();
    assert!(err.contains("must be contiguous"), "{what}: {err}");
    Ok(())
}

/// Column sums of `[3, 333, 70]` (a width no band of 16 divides), of a
/// transposed matrix (copied contiguous first), of one long column and of no
/// rows, against candle's `sum` over the leading dimensions: on the CPU bit
/// for bit (the same additions in the same order); on CUDA within the
/// rounding of the same terms summed in another order (`column_sums.cu`).
fn column_sums_are_candles_sums(device: &Device) -> candle::Result<()> {
    let what = format!("on {:?}", device.location());
    let x = Tensor::randn(0f32, 1.0, (3, 333, 70), device)?;
    let transposed = Tensor::randn(0f32, 1.0, (70, 999), device)?.t()?;
    let column = Tensor::randn(0f32, 1.0, (100_003, 1), device)?;
    let none = Tensor::zeros((0, 70), DType::F32, device)?;
    for (name, t) in [("[3, 333, 70]", &x), ("transposed", &transposed), ("one column", &column), ("no rows", &none)] {
        let width = t.dim(D::Minus1)?;
        let got = column_sums::column_sums(t)?.to_vec1::<f32>()?;
        let want = t.reshape(((), width))?.sum(0)?.to_vec1::<f32>()?;
        if device.is_cpu() {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{what}: {name}");
        } else {
            // n N(0, 1) terms summed in two orders: their roundings differ by well under n eps
            // (`tests/example_kernels_on_cpu.rs` holds the kernels' own order bit for bit).
            let rows = t.elem_count() / width.max(1);
            let bound = (rows as f32 * f32::EPSILON).max(1e-5);
            for (c, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= bound, "{what}: {name}, column {c}: {g} vs candle's {w}");
            }
        }
    }
    let err = column_sums::column_sums(&x.to_dtype(DType::F64)?).expect_err("f64").to_string();
    assert!(err.contains("f32 only"), "{what}: {err}");
    Ok(())
}

#[test]
fn column_sums_are_candles_sums_on_every_device() -> candle::Result<()> {
    on_every_device(column_sums_are_candles_sums)
}

#[test]
fn embedding_matches_index_select_and_index_add_on_every_device() -> candle::Result<()> {
    on_every_device(embedding_matches_index_select_and_index_add)
}

/// The sum of squares of f32 tensors contiguous or not (longer than the CPU's
/// tasks and the CUDA grid, so that both split them), f64, and empty, against
/// the host's sum of each square in f64: within f64 rounding (an f32 sum is
/// 1e-5 off here), the same on a second call, 0 for no tensors; a tensor
/// that is not float, or on another device, is refused.
fn sum_of_squares_matches_an_f64_sum(device: &Device) -> candle::Result<()> {
    let long = Tensor::randn(0f32, 1.0, (1 << 20) + 77, device)?;
    let square = Tensor::randn(0f32, 3.0, (37, 41), device)?;
    let transposed = square.t()?;
    let narrowed = square.narrow(0, 5, 7)?;
    let wide = Tensor::randn(0f64, 2.0, 1000, device)?;
    let empty = Tensor::zeros(0, DType::F32, device)?;
    let tensors = [&long, &transposed, &narrowed, &wide, &empty];
    let mut want = 0f64;
    for t in tensors {
        want += t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.iter().map(|v| v * v).sum::<f64>();
    }
    let what = format!("on {:?}", device.location());
    let got = sum_squares::sum_of_squares(&tensors, device)?;
    assert_eq!((got.dims(), got.dtype()), (&[][..], DType::F64), "{what}: an f64 scalar");
    let got = got.to_scalar::<f64>()?;
    assert!((got - want).abs() <= 1e-12 * want, "{what}: {got} vs {want} (relative {:e})", (got - want) / want);
    let again = sum_squares::sum_of_squares(&tensors, device)?.to_scalar::<f64>()?;
    assert_eq!(got.to_bits(), again.to_bits(), "{what}: a second call differs");
    assert_eq!(sum_squares::sum_of_squares(&[], device)?.to_scalar::<f64>()?, 0.0, "{what}: no tensors");
    let ids = Tensor::zeros(3, DType::U32, device)?;
    let err = sum_squares::sum_of_squares(&[&long, &ids], device).expect_err("u32").to_string();
    assert!(err.contains("float tensors only"), "{what}: {err}");
    if !device.is_cpu() {
        let err = sum_squares::sum_of_squares(&[&long, &long.to_device(&Device::Cpu)?], device).expect_err("cpu");
        assert!(err.to_string().contains("a tensor on Cpu"), "{what}: {err}");
    }
    Ok(())
}

#[test]
fn sum_of_squares_matches_an_f64_sum_on_every_device() -> candle::Result<()> {
    on_every_device(sum_of_squares_matches_an_f64_sum)
}

#[test]
fn add_bias_matches_broadcast_add_on_every_device() -> candle::Result<()> {
    on_every_device(add_bias_matches_broadcast_add)
}

#[test]
fn gelu_is_accurate_on_every_device() -> candle::Result<()> {
    on_every_device(gelu_is_accurate)
}

#[test]
fn gelu_matches_candles_on_every_device() -> candle::Result<()> {
    on_every_device(gelu_matches_candles)
}

#[test]
fn causal_softmax_matches_the_primitives() -> candle::Result<()> {
    on_every_device(matches_the_primitives)
}

#[test]
fn layer_norm_matches_the_primitives_on_every_device() -> candle::Result<()> {
    on_every_device(layer_norm_matches_the_primitives)
}
