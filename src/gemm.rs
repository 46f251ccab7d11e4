//! The three matrix products of the linear loss on the CPU, over contiguous
//! row-major `f32` / `f64` slices, by the pure-Rust
//! [`gemm`](https://crates.io/crates/gemm) crate (the one inside candle's CPU
//! matmul), the transposes expressed through strides (no copies), on rayon's
//! threads. Its AVX-512 kernels come with this crate's default `gemm-avx512`
//! feature (the gemm crate's `x86-v4`, chosen at run time, so the build runs
//! on any x86-64); without it the gemm crate stops at AVX2/FMA, and a
//! training step of the linear loss takes 1.6x longer on a CPU with AVX-512. The system OpenBLAS was measured
//! beside it and was no faster on these shapes (BENCHMARKS.md).
//!
//! For a chunk of `rows` rows of the linear loss (hidden `H`, vocabulary `V`):
//!
//! - logits = X · Wᵀ: [`matmul_nt`] with `(m, n, k) = (rows, V, H)`;
//! - dX = G · W: [`matmul_nn`] with `(m, n, k) = (rows, H, V)`, split along
//!   `V` between the threads (see [`inner_splits`]);
//! - dWᵀ += Xᵀ · G: [`add_matmul_tn`] with `(m, n, k) = (H, V, rows)`, the
//!   weight gradient accumulated transposed, `[H, V]`: the gemm crate runs
//!   that orientation about 1.3x faster than `dW += Gᵀ · X` into `[V, H]`.
//!
//! Every function takes the output's shape `[m, n]` and the inner dimension
//! `k`, and panics if a slice's length is not that of its matrix.

/// The element types of the products: `f32` and `f64`.
pub(crate) trait Scalar: Copy + Send + Sync + num_traits::Zero + num_traits::One + 'static {}

impl Scalar for f32 {}

impl Scalar for f64 {}

/// `C = A · Bᵀ`: `c` `[m, n]`, `a` `[m, k]`, `b` `[n, k]` (the logits
/// `X · Wᵀ`: `(m, n, k) = (rows, V, H)`).
pub(crate) fn matmul_nt<T: Scalar>(c: &mut [T], a: &[T], b: &[T], (m, n, k): (usize, usize, usize)) {
    product(Product { m, n, k, a_transposed: false, b_transposed: true, accumulate: false }, c, a, b)
}

/// `C = A · B`: `c` `[m, n]`, `a` `[m, k]`, `b` `[k, n]` (the input gradient
/// `G · W`: `(m, n, k) = (rows, H, V)`).
pub(crate) fn matmul_nn<T: Scalar>(c: &mut [T], a: &[T], b: &[T], (m, n, k): (usize, usize, usize)) {
    product(Product { m, n, k, a_transposed: false, b_transposed: false, accumulate: false }, c, a, b)
}

/// `C += Aᵀ · B` in place: `c` `[m, n]`, `a` `[k, m]`, `b` `[k, n]` (one
/// chunk's transposed weight gradient `Xᵀ · G`: `(m, n, k) = (H, V, rows)`).
pub(crate) fn add_matmul_tn<T: Scalar>(c: &mut [T], a: &[T], b: &[T], (m, n, k): (usize, usize, usize)) {
    product(Product { m, n, k, a_transposed: true, b_transposed: false, accumulate: true }, c, a, b)
}

/// A 16-bit float that a sum in f32 is rounded to: the weight gradient of a
/// `low_memory` linear loss, summed in the weight's dtype.
pub(crate) trait Rounded: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn round_from(x: f32) -> Self;
}

impl Rounded for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn round_from(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

impl Rounded for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn round_from(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

/// `C = round(C + Aᵀ · B)` in place, `C` `[m, n]` of a 16-bit float, `a`
/// `[k, m]` and `b` `[k, n]` f32: the product and the sum in f32, each
/// element rounded once, as cuBLAS does with a 16-bit `C` and `beta = 1`
/// (`cuda_gemm.rs`). Runs a band of `C`'s rows at a time through an f32
/// buffer of about 16 MiB, so that no `[m, n]` f32 product exists. Panics on
/// slices of the wrong length.
pub(crate) fn add_matmul_tn_rounded<C: Rounded>(c: &mut [C], a: &[f32], b: &[f32], (m, n, k): (usize, usize, usize)) {
    use rayon::prelude::*;
    assert!(
        c.len() == m * n && a.len() == k * m && b.len() == k * n,
        "gemm: slices of {}, {} and {} elements for [{m}, {n}] += [{k}, {m}]ᵀ x [{k}, {n}]",
        c.len(),
        a.len(),
        b.len(),
    );
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let band = ((4 << 20) / n).clamp(1, m);
    let (mut a_band, mut product_band) = (vec![0f32; k * band], vec![0f32; band * n]);
    for start in (0..m).step_by(band) {
        let rows = band.min(m - start);
        // A's columns [start, start + rows), contiguous: `[k, rows]`.
        let a_band = &mut a_band[..k * rows];
        a_band
            .par_chunks_mut(rows)
            .zip(a.par_chunks(m))
            .for_each(|(dst, src)| dst.copy_from_slice(&src[start..start + rows]));
        let product_band = &mut product_band[..rows * n];
        add_matmul_tn_into(product_band, a_band, b, (rows, n, k));
        c[start * n..(start + rows) * n]
            .par_iter_mut()
            .zip(product_band.par_iter())
            .for_each(|(c, &p)| *c = C::round_from(c.to_f32() + p));
    }
}

/// `C = Aᵀ · B` (overwritten): `c` `[m, n]`, `a` `[k, m]`, `b` `[k, n]`.
fn add_matmul_tn_into<T: Scalar>(c: &mut [T], a: &[T], b: &[T], (m, n, k): (usize, usize, usize)) {
    product(Product { m, n, k, a_transposed: true, b_transposed: false, accumulate: false }, c, a, b)
}

/// One row-major product `C (+)= op(A) · op(B)`, `C` `[m, n]`: `A` is stored
/// `[m, k]`, or `[k, m]` if `a_transposed`; `B` is stored `[k, n]`, or
/// `[n, k]` if `b_transposed`. `accumulate` adds to `C`, else `C` is overwritten.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Product {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) a_transposed: bool,
    pub(crate) b_transposed: bool,
    pub(crate) accumulate: bool,
}

/// Computes `p` (see [`Product`]) on rayon's threads; panics on slices of
/// the wrong length. A product whose inner dimension is long against its
/// output (see [`inner_splits`]) is split along it instead.
pub(crate) fn product<T: Scalar>(p: Product, c: &mut [T], a: &[T], b: &[T]) {
    let threads = rayon::current_num_threads();
    let splits = inner_splits(p, threads);
    if splits > 1 {
        return product_split_inner(splits, p, c, a, b);
    }
    let parallelism = if threads > 1 { ::gemm::Parallelism::Rayon(threads) } else { ::gemm::Parallelism::None };
    product_with(parallelism, p, c, a, b)
}

/// An inner dimension at least this many times the output's larger side is
/// "long" (see [`inner_splits`]).
const LONG_INNER: usize = 4;

/// Into how many ranges of `k` to split `p` on `threads` threads: one per
/// thread when `k` is long against the output (`k >= LONG_INNER * max(m,
/// n)`, and each range still is), else 1. The input gradient `G · W` (`(m, n,
/// k) = (1024, 768, 50257)`) runs at 284 GFLOP/s with the gemm crate
/// threading its small output, and at 307 (`torch.mm`: 304) split in two along
/// `V`, one single-threaded product per thread (2 threads, `cargo bench
/// --bench gemm_routes`, BENCHMARKS.md). The logits and weight-gradient
/// products, whose `k` is short, gained nothing from splitting their output
/// between threads that way instead.
fn inner_splits(p: Product, threads: usize) -> usize {
    let side = p.m.max(p.n).max(1);
    threads.min(p.k / (LONG_INNER * side)).max(1)
}

/// `p` as `splits` products over consecutive ranges of `k`, run as rayon
/// tasks, each single-threaded: the first into `c` (adding to it if
/// `p.accumulate`), the others into zeroed `[m, n]` partials that are then
/// added to `c`. Panics on slices of the wrong length.
pub(crate) fn product_split_inner<T: Scalar>(splits: usize, p: Product, c: &mut [T], a: &[T], b: &[T]) {
    use rayon::prelude::*;
    check_lengths(p, c, a, b);
    let splits = splits.clamp(1, p.k.max(1));
    let range = |s: usize| (s * p.k / splits, (s + 1) * p.k / splits);
    let mut partials: Vec<Vec<T>> = (1..splits).map(|_| vec![T::zero(); p.m * p.n]).collect();
    let outputs = std::iter::once(&mut *c).chain(partials.iter_mut().map(Vec::as_mut_slice));
    outputs.enumerate().collect::<Vec<_>>().into_par_iter().for_each(|(s, out)| {
        let (start, end) = range(s);
        let part = Product { k: end - start, accumulate: p.accumulate && s == 0, ..p };
        // SAFETY: `check_lengths` checked `a` and `b` against `p`; the range
        // `[start, end)` of `k` addresses, from offsets `start * a_cs` and `start *
        // b_rs`, only elements of op(A)'s columns and op(B)'s rows in that range,
        // all inside the slices; `out` holds `m * n` elements and is written by
        // this task alone.
        unsafe { strided_product(::gemm::Parallelism::None, p, part, out, a, b, start) }
    });
    let width = p.n.max(1);
    c.par_chunks_mut(width).enumerate().for_each(|(row, c_row)| {
        for partial in &partials {
            c_row.iter_mut().zip(&partial[row * width..(row + 1) * width]).for_each(|(x, &y)| *x = *x + y);
        }
    });
}

/// Panics unless `c`, `a` and `b` hold exactly the elements of `p`'s matrices.
fn check_lengths<T>(p: Product, c: &[T], a: &[T], b: &[T]) {
    assert!(
        c.len() == p.m * p.n && a.len() == p.m * p.k && b.len() == p.k * p.n,
        "gemm: slices of {}, {} and {} elements for [{m}, {n}] = [{m}, {k}] x [{k}, {n}]",
        c.len(),
        a.len(),
        b.len(),
        m = p.m,
        n = p.n,
        k = p.k,
    );
}

/// [`product`] with the gemm crate's `parallelism` (the benchmarks try
/// others than rayon's thread count), never split.
pub(crate) fn product_with<T: Scalar>(parallelism: ::gemm::Parallelism, p: Product, c: &mut [T], a: &[T], b: &[T]) {
    check_lengths(p, c, a, b);
    // SAFETY: the lengths were checked against `p`, and the whole of `k` is taken.
    unsafe { strided_product(parallelism, p, p, c, a, b, 0) }
}

/// The gemm crate's product `part` (the same `m`, `n` as `whole`, and `part.k`
/// of `whole`'s inner dimension starting at `k_start`) on row-major operands
/// laid out for `whole`.
///
/// # Safety
/// `a`, `b` and `c` must hold `whole`'s `[m, k]`, `[k, n]` and `[m, n]`
/// matrices, and `k_start + part.k <= whole.k`.
unsafe fn strided_product<T: Scalar>(
    parallelism: ::gemm::Parallelism,
    whole: Product,
    part: Product,
    c: &mut [T],
    a: &[T],
    b: &[T],
    k_start: usize,
) {
    let p = part;
    if p.m == 0 || p.n == 0 {
        return;
    }
    if p.k == 0 {
        // An empty sum.
        if !p.accumulate {
            c.fill(T::zero());
        }
        return;
    }
    let (m, n, k) = (whole.m as isize, whole.n as isize, whole.k as isize);
    // (column stride, row stride) of each row-major operand.
    let (a_cs, a_rs) = if p.a_transposed { (m, 1) } else { (1, k) };
    let (b_cs, b_rs) = if p.b_transposed { (k, 1) } else { (1, n) };
    // SAFETY: the caller's contract: `c`, `a` and `b` hold exactly the `m * n`,
    // `m * k` and `k * n` elements these strides address (every index `i * rs +
    // j * cs` with `i`, `j` in range is in bounds), and columns `k_start..k_start +
    // part.k` of op(A) and rows of op(B) lie within them; `c` is borrowed
    // mutably, so it overlaps neither input.
    unsafe {
        ::gemm::gemm(
            p.m,
            p.n,
            p.k,
            c.as_mut_ptr(),
            1,
            n,
            p.accumulate,
            a.as_ptr().offset(k_start as isize * a_cs),
            a_cs,
            a_rs,
            b.as_ptr().offset(k_start as isize * b_rs),
            b_cs,
            b_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The products as candle ops on CPU storages, for the linear loss's chunks:
/// f32 and f64, contiguous operands. Other devices and dtypes are not theirs
/// (see [`takes`]).
pub(crate) mod ops {
    use super::Scalar;
    use candle::{bail, CpuStorage, InplaceOp3, Layout, Result, Tensor};

    /// Whether [`matmul_into`] and [`AddTransposedProduct`] take these operands:
    /// on the CPU, f32 or f64, contiguous.
    pub(crate) fn takes(operands: &[&Tensor]) -> bool {
        operands.iter().all(|t| {
            t.device().is_cpu() && matches!(t.dtype(), candle::DType::F32 | candle::DType::F64) && t.is_contiguous()
        })
    }

    /// `out = a · bᵀ` (`b_transposed`: `a` `[m, k]`, `b` `[n, k]`) or `out = a
    /// · b` (`b` `[k, n]`), written into `out` `[m, n]` in place through this
    /// build's route, nothing recorded; `Ok(false)` (and nothing written) for
    /// operands [`takes`] refuses: the caller then uses candle's matmul.
    pub(crate) fn matmul_into(out: &Tensor, a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<bool> {
        if !takes(&[out, a, b]) {
            return Ok(false);
        }
        out.inplace_op3(a, b, &MatmulInto { b_transposed })?;
        Ok(true)
    }

    struct MatmulInto {
        b_transposed: bool,
    }

    impl MatmulInto {
        fn product<T: Scalar>(&self, out: &mut [T], a: &[T], b: &[T], dims: (usize, usize, usize)) {
            if self.b_transposed {
                super::matmul_nt(out, a, b, dims)
            } else {
                super::matmul_nn(out, a, b, dims)
            }
        }
    }

    impl InplaceOp3 for MatmulInto {
        fn name(&self) -> &'static str {
            "chunked-linear-cross-entropy-matmul"
        }

        fn cpu_fwd(
            &self,
            out: &mut CpuStorage,
            out_layout: &Layout,
            a: &CpuStorage,
            a_layout: &Layout,
            b: &CpuStorage,
            b_layout: &Layout,
        ) -> Result<()> {
            let (Some(o), Some(l), Some(r)) =
                (out_layout.contiguous_offsets(), a_layout.contiguous_offsets(), b_layout.contiguous_offsets())
            else {
                bail!("{}: the operands must be contiguous", self.name())
            };
            let ((m, n), (a_m, k), (b0, b1)) =
                (out_layout.shape().dims2()?, a_layout.shape().dims2()?, b_layout.shape().dims2()?);
            let (b_k, b_n) = if self.b_transposed { (b1, b0) } else { (b0, b1) };
            if (a_m, b_k, b_n) != (m, k, n) {
                bail!(
                    "{}: {:?} = {:?} · {:?}{} does not fit",
                    self.name(),
                    out_layout.shape(),
                    a_layout.shape(),
                    b_layout.shape(),
                    if self.b_transposed { "ᵀ" } else { "" }
                )
            }
            match (out, a, b) {
                (CpuStorage::F32(out), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                    self.product(&mut out[o.0..o.1], &a[l.0..l.1], &b[r.0..r.1], (m, n, k))
                }
                (CpuStorage::F64(out), CpuStorage::F64(a), CpuStorage::F64(b)) => {
                    self.product(&mut out[o.0..o.1], &a[l.0..l.1], &b[r.0..r.1], (m, n, k))
                }
                _ => bail!("{}: the operands must all be f32 or all f64", self.name()),
            }
            Ok(())
        }
    }

    /// `acc += lhsᵀ · rhs` in place (`acc` `[m, n]`, `lhs` `[k, m]`, `rhs`
    /// `[k, n]`, contiguous; all f32 or all f64, or a bf16/f16 `acc` with
    /// f32 operands, each element rounded once, see
    /// [`add_matmul_tn_rounded`](super::add_matmul_tn_rounded)): a chunk's
    /// weight gradient added to the accumulator with no `[V, H]` product in
    /// between.
    pub(crate) struct AddTransposedProduct;

    impl InplaceOp3 for AddTransposedProduct {
        fn name(&self) -> &'static str {
            "chunked-linear-cross-entropy-weight-grad"
        }

        fn cpu_fwd(
            &self,
            acc: &mut CpuStorage,
            acc_layout: &Layout,
            lhs: &CpuStorage,
            lhs_layout: &Layout,
            rhs: &CpuStorage,
            rhs_layout: &Layout,
        ) -> Result<()> {
            let (Some(a), Some(l), Some(r)) =
                (acc_layout.contiguous_offsets(), lhs_layout.contiguous_offsets(), rhs_layout.contiguous_offsets())
            else {
                bail!("{}: the operands must be contiguous", self.name())
            };
            let (m, n) = acc_layout.shape().dims2()?;
            let ((k, lhs_m), (rhs_k, rhs_n)) = (lhs_layout.shape().dims2()?, rhs_layout.shape().dims2()?);
            if (lhs_m, rhs_k, rhs_n) != (m, k, n) {
                bail!(
                    "{}: {:?} += {:?}ᵀ · {:?} does not fit",
                    self.name(),
                    acc_layout.shape(),
                    lhs_layout.shape(),
                    rhs_layout.shape()
                )
            }
            match (acc, lhs, rhs) {
                (CpuStorage::F32(acc), CpuStorage::F32(lhs), CpuStorage::F32(rhs)) => {
                    super::add_matmul_tn(&mut acc[a.0..a.1], &lhs[l.0..l.1], &rhs[r.0..r.1], (m, n, k))
                }
                (CpuStorage::F64(acc), CpuStorage::F64(lhs), CpuStorage::F64(rhs)) => {
                    super::add_matmul_tn(&mut acc[a.0..a.1], &lhs[l.0..l.1], &rhs[r.0..r.1], (m, n, k))
                }
                (CpuStorage::BF16(acc), CpuStorage::F32(lhs), CpuStorage::F32(rhs)) => {
                    super::add_matmul_tn_rounded(&mut acc[a.0..a.1], &lhs[l.0..l.1], &rhs[r.0..r.1], (m, n, k))
                }
                (CpuStorage::F16(acc), CpuStorage::F32(lhs), CpuStorage::F32(rhs)) => {
                    super::add_matmul_tn_rounded(&mut acc[a.0..a.1], &lhs[l.0..l.1], &rhs[r.0..r.1], (m, n, k))
                }
                _ => bail!(
                    "{}: the operands must all be f32 or all f64, or a bf16/f16 acc with f32 operands",
                    self.name()
                ),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
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
}
