use super::*;

/// Deterministic values in [-1, 1), exactly representable in f32.
fn values<T: Scalar + From<f32>>(len: usize, seed: u64) -> Vec<T> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            T::from((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// `op(A) · op(B)` by the triple loop, in f64, `[m, n]` row-major.
fn naive<T: Scalar + Into<f64>>(p: Product, a: &[T], b: &[T]) -> Vec<f64> {
    let a_at = |i: usize, l: usize| if p.a_transposed { a[l * p.m + i] } else { a[i * p.k + l] }.into();
    let b_at = |l: usize, j: usize| if p.b_transposed { b[j * p.k + l] } else { b[l * p.n + j] }.into();
    let mut c = vec![0.0; p.m * p.n];
    for i in 0..p.m {
        for j in 0..p.n {
            c[i * p.n + j] = (0..p.k).map(|l| a_at(i, l) * b_at(l, j)).sum();
        }
    }
    c
}

/// Every layout against the triple loop; `tol` relative to `k`.
fn check<T: Scalar + From<f32> + Into<f64>>(tol: f64) {
    // (3, 5, 97) and (2, 1, 40): a long inner dimension, split by `product` too.
    let shapes = [
        (37, 19, 23),
        (1, 1, 1),
        (5, 1, 9),
        (1, 7, 3),
        (64, 33, 129),
        (3, 5, 97),
        (2, 1, 40),
        (3, 4, 0),
        (0, 4, 3),
        (4, 0, 3),
    ];
    for (m, n, k) in shapes {
        for (a_transposed, b_transposed) in [(false, true), (false, false), (true, false), (true, true)] {
            for accumulate in [false, true] {
                let p = Product { m, n, k, a_transposed, b_transposed, accumulate };
                let (a, b) = (values::<T>(m * k, 1), values::<T>(k * n, 2));
                let start = values::<T>(m * n, 3);
                let mut want = naive(p, &a, &b);
                if accumulate {
                    want.iter_mut().zip(&start).for_each(|(w, &s)| *w += s.into());
                }
                // The product as the library runs it, and split along `k` in 2 and 3.
                for splits in [0, 2, 3] {
                    // NaN where `C` is overwritten: a product that reads it fails.
                    let mut c = if accumulate { start.clone() } else { vec![T::from(f32::NAN); m * n] };
                    match splits {
                        0 => product(p, &mut c, &a, &b),
                        _ => product_split_inner(splits, p, &mut c, &a, &b),
                    }
                    for (idx, (&got, &want)) in c.iter().zip(&want).enumerate() {
                        let got: f64 = got.into();
                        let what = format!("{p:?}, {splits} splits: c[{idx}] = {got}, want {want}");
                        assert!((got - want).abs() <= tol * (k as f64 + 1.0), "{what}");
                    }
                }
            }
        }
    }
}

#[test]
fn products_match_the_triple_loop_f32() {
    check::<f32>(1e-6);
}

#[test]
fn products_match_the_triple_loop_f64() {
    check::<f64>(1e-13);
}

#[test]
fn the_three_products_of_the_linear_loss() {
    // X [rows, H], W [V, H], G [rows, V], dWᵀ [H, V], at odd sizes.
    let (rows, h, v) = (37, 19, 23);
    let (x, w, g) = (values::<f32>(rows * h, 4), values::<f32>(v * h, 5), values::<f32>(rows * v, 6));
    let close = |got: &[f32], want: &[f64]| {
        assert_eq!(got.len(), want.len());
        got.iter().zip(want).all(|(&g, &w)| (f64::from(g) - w).abs() <= 1e-4)
    };

    let mut logits = vec![f32::NAN; rows * v];
    matmul_nt(&mut logits, &x, &w, (rows, v, h));
    let p = Product { m: rows, n: v, k: h, a_transposed: false, b_transposed: true, accumulate: false };
    assert!(close(&logits, &naive(p, &x, &w)), "logits = X · Wᵀ");

    let mut dx = vec![f32::NAN; rows * h];
    matmul_nn(&mut dx, &g, &w, (rows, h, v));
    let p = Product { m: rows, n: h, k: v, a_transposed: false, b_transposed: false, accumulate: false };
    assert!(close(&dx, &naive(p, &g, &w)), "dX = G · W");

    // Two chunks accumulated, transposed: rows [0, 20) then [20, 37).
    let mut dw_t = vec![0f32; h * v];
    add_matmul_tn(&mut dw_t, &x[..20 * h], &g[..20 * v], (h, v, 20));
    add_matmul_tn(&mut dw_t, &x[20 * h..], &g[20 * v..], (h, v, rows - 20));
    let p = Product { m: h, n: v, k: rows, a_transposed: true, b_transposed: false, accumulate: false };
    assert!(close(&dw_t, &naive(p, &x, &g)), "dWᵀ = Σ Xᵀ · G over chunks");
}

/// Each element of a 16-bit `C` is rounded once per call, from the f32
/// sum of its value before the call and the product: two calls, each
/// against the triple loop (in f64) added to what `C` held and rounded,
/// with bands of `C`'s rows smaller than `m` (n = 200_000 makes a band
/// 20 rows). The values are multiples of 1/8 in [-1, 1], so every f32
/// product and sum is exact and the result must be too.
#[test]
fn rounded_accumulation_rounds_once_per_call() {
    use half::bf16;
    let eighths = |len: usize, seed: u64| -> Vec<f32> {
        values::<f64>(len, seed).into_iter().map(|x| ((x * 8.0).round() / 8.0) as f32).collect()
    };
    for (m, n, k) in [(37, 23, 19), (29, 200_000, 3), (5, 1, 0)] {
        let mut c: Vec<bf16> = eighths(m * n, 11).into_iter().map(bf16::from_f32).collect();
        for seed in [7, 9] {
            let (a, b) = (eighths(k * m, seed), eighths(k * n, seed + 1));
            let p = Product { m, n, k, a_transposed: true, b_transposed: false, accumulate: false };
            let before = c.clone();
            let product = naive(p, &a, &b);
            add_matmul_tn_rounded(&mut c, &a, &b, (m, n, k));
            for (i, &got) in c.iter().enumerate() {
                let want = bf16::from_f64(before[i].to_f64() + product[i]);
                assert_eq!(got, want, "({m}, {n}, {k}) call {seed}: c[{i}]");
            }
        }
    }
}

#[test]
#[should_panic(expected = "gemm: slices")]
fn wrong_lengths_panic() {
    let mut c = vec![0f32; 6];
    matmul_nn(&mut c, &[0.0; 6], &[0.0; 5], (2, 3, 3));
}
