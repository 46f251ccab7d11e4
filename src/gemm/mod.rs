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

pub(crate) mod ops;
#[cfg(test)]
mod tests;
