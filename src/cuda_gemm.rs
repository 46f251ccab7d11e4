//! `acc += lhsᵀ · rhs` on CUDA in one cuBLAS call (feature `cuda`): the
//! linear loss's weight gradient `dW += Gᵀ · H`, accumulated chunk by chunk
//! into its `[V, H]` accumulator in place (f32, or, for a `low_memory` loss or
//! a bf16 weight in one chunk, the gradient itself in the operands' dtype),
//! straight from the chunk's bf16/f16/f32 operands. No operand is converted to
//! f32 and no `[V, H]` product or sum is allocated: `cublasGemmEx` reads the
//! half-precision operands, multiplies and accumulates in f32
//! (`CUBLAS_COMPUTE_32F`) and adds into the output with `beta = 1` (for a
//! 16-bit output, `acc + product` is formed in f32 and rounded once per
//! element), or, for a sum's first chunk, writes it with `beta = 0`
//! ([`write_transposed_product`]): the sum needs no zeros beforehand, and its
//! first product does not read them.
//!
//! It runs through the cuBLAS handle that candle's `CudaDevice` holds, which is
//! bound to the device's stream, so it is ordered with candle's own kernels
//! and matmuls like any other candle op (no host sync).

use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
use candle::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle::cuda_backend::{CudaDType, WrapErr};
use candle::{bail, CpuStorage, CudaStorage, DType, Layout, Result, Tensor};
use half::{bf16, f16};
use std::ffi::{c_int, c_void};

const WHAT: &str = "linear cross-entropy (cuda): acc += lhsᵀ · rhs";

/// `acc += lhsᵀ · rhs` in place, on CUDA: `acc` `[m, n]` f32 or of the
/// operands' dtype, `lhs` `[k, m]` and `rhs` `[k, n]` of one dtype among f32,
/// bf16 and f16, all three contiguous (any start offset) on one CUDA device.
/// Products and sums are in f32; f32 operands' products use TF32 where
/// candle's own f32 matmuls do (see [`compute_type`]); a 16-bit `acc` is
/// rounded once per element and call.
///
/// # Errors
/// Shapes that do not match, other dtypes, non-contiguous operands, operands
/// not on the same CUDA device, dimensions beyond cuBLAS's `int`, and
/// cuBLAS's own errors.
pub(crate) fn add_transposed_product(acc: &Tensor, lhs: &Tensor, rhs: &Tensor) -> Result<()> {
    transposed_product(acc, lhs, rhs, CublasTransposedProduct { add: true })
}

/// `acc = lhsᵀ · rhs` in place, on CUDA: as [`add_transposed_product`], but
/// `acc`'s elements are overwritten, never read (cuBLAS with `beta = 0` does
/// not read C), so `acc` may be uninitialised (`Tensor::empty`).
///
/// # Errors
/// Those of [`add_transposed_product`].
pub(crate) fn write_transposed_product(acc: &Tensor, lhs: &Tensor, rhs: &Tensor) -> Result<()> {
    transposed_product(acc, lhs, rhs, CublasTransposedProduct { add: false })
}

fn transposed_product(acc: &Tensor, lhs: &Tensor, rhs: &Tensor, op: CublasTransposedProduct) -> Result<()> {
    let (m, n) = match acc.dims() {
        [m, n] => (*m, *n),
        _ => bail!("{WHAT}: acc must be [m, n], got {:?}", acc.shape()),
    };
    match (lhs.dims(), rhs.dims()) {
        ([lk, lm], [rk, rn]) if lk == rk && *lm == m && *rn == n => {}
        _ => bail!(
            "{WHAT}: for acc [{m}, {n}], lhs must be [k, {m}] and rhs [k, {n}] with one k, got lhs {:?} and rhs {:?}",
            lhs.shape(),
            rhs.shape()
        ),
    }
    if lhs.dtype() != rhs.dtype() || !matches!(lhs.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        bail!(
            "{WHAT}: lhs and rhs must share one dtype among f32, bf16 and f16, got {:?} and {:?}",
            lhs.dtype(),
            rhs.dtype()
        )
    }
    if acc.dtype() != DType::F32 && acc.dtype() != lhs.dtype() {
        bail!("{WHAT}: acc must be f32 or the operands' {:?}, got {:?}", lhs.dtype(), acc.dtype())
    }
    for (name, t) in [("acc", acc), ("lhs", lhs), ("rhs", rhs)] {
        if !t.is_contiguous() {
            bail!("{WHAT}: {name} {:?} must be contiguous (strides {:?})", t.shape(), t.stride())
        }
    }
    if !acc.device().is_cuda() {
        bail!("{WHAT}: acc must be on a CUDA device, got {:?}", acc.device().location())
    }
    for (name, t) in [("lhs", lhs), ("rhs", rhs)] {
        if !t.device().same_device(acc.device()) {
            bail!(
                "{WHAT}: {name} must be on acc's device {:?}, got {:?}",
                acc.device().location(),
                t.device().location()
            )
        }
    }
    if !op.add && lhs.dim(0)? == 0 {
        // An empty product overwrites with zeros.
        return acc.zero_set();
    }
    acc.inplace_op3(lhs, rhs, &op)
}

/// The in-place op behind [`add_transposed_product`] (`add`) and
/// [`write_transposed_product`], for its access to the storages (candle locks
/// them, and refuses an operand that aliases `acc`).
struct CublasTransposedProduct {
    add: bool,
}

impl candle::InplaceOp3 for CublasTransposedProduct {
    fn name(&self) -> &'static str {
        "chunked-linear-cross-entropy-weight-grad-cublas"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("{}: runs on CUDA only (add_transposed_product checks the device)", self.name())
    }

    fn cuda_fwd(
        &self,
        acc: &mut CudaStorage,
        acc_layout: &Layout,
        lhs: &CudaStorage,
        lhs_layout: &Layout,
        rhs: &CudaStorage,
        rhs_layout: &Layout,
    ) -> Result<()> {
        let operands =
            Operands { beta: if self.add { 1.0 } else { 0.0 }, ..Operands::new(acc_layout, lhs_layout, rhs_layout)? };
        use sys::cudaDataType_t::{CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F};
        match (acc.dtype(), lhs.dtype(), rhs.dtype()) {
            (DType::F32, DType::F32, DType::F32) => operands.gemm::<f32, f32>(acc, lhs, rhs, CUDA_R_32F, CUDA_R_32F),
            (DType::F32, DType::BF16, DType::BF16) => {
                operands.gemm::<bf16, f32>(acc, lhs, rhs, CUDA_R_16BF, CUDA_R_32F)
            }
            (DType::F32, DType::F16, DType::F16) => operands.gemm::<f16, f32>(acc, lhs, rhs, CUDA_R_16F, CUDA_R_32F),
            (DType::BF16, DType::BF16, DType::BF16) => {
                operands.gemm::<bf16, bf16>(acc, lhs, rhs, CUDA_R_16BF, CUDA_R_16BF)
            }
            (DType::F16, DType::F16, DType::F16) => operands.gemm::<f16, f16>(acc, lhs, rhs, CUDA_R_16F, CUDA_R_16F),
            (a, l, r) => bail!("{WHAT}: lhs, rhs one of f32, bf16, f16 and acc f32 or theirs; got {a:?}, {l:?}, {r:?}"),
        }
    }
}

/// cuBLAS's compute type for operands of `data_type`: f32 throughout
/// (`CUBLAS_COMPUTE_32F`), but for f32 operands when candle's f32 matmuls may
/// use TF32 (`tf32`: `candle::cuda::set_gemm_reduced_precision_f32(true)`),
/// TF32 products as theirs (`CUBLAS_COMPUTE_32F_FAST_TF32`): the linear loss's
/// logits and input gradient are candle matmuls, and its weight gradient
/// follows them. 16-bit operands' products always sum in f32 here, whatever
/// candle's 16-bit switches allow its own matmuls: each sums a whole chunk of
/// rows, where 16-bit sums would lose the small rows' terms.
fn compute_type(data_type: sys::cudaDataType_t, tf32: bool) -> sys::cublasComputeType_t {
    if tf32 && data_type == sys::cudaDataType_t::CUDA_R_32F {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
    }
}

/// The element ranges of the three contiguous operands and the product's
/// `(m, n, k)`, checked against each other, and `beta`: 1 adds the product
/// into `acc`, 0 overwrites it.
struct Operands {
    acc: (usize, usize),
    lhs: (usize, usize),
    rhs: (usize, usize),
    m: usize,
    n: usize,
    k: usize,
    beta: f32,
}

impl Operands {
    fn new(acc: &Layout, lhs: &Layout, rhs: &Layout) -> Result<Self> {
        let (Some(acc_range), Some(lhs_range), Some(rhs_range)) =
            (acc.contiguous_offsets(), lhs.contiguous_offsets(), rhs.contiguous_offsets())
        else {
            bail!("{WHAT}: operands must be contiguous")
        };
        let (m, n) = acc.shape().dims2()?;
        let (k, lm) = lhs.shape().dims2()?;
        let (rk, rn) = rhs.shape().dims2()?;
        if (lm, rk, rn) != (m, k, n) {
            bail!("{WHAT}: acc {:?}, lhs {:?} and rhs {:?} do not match", acc.shape(), lhs.shape(), rhs.shape())
        }
        Ok(Self { acc: acc_range, lhs: lhs_range, rhs: rhs_range, m, n, k, beta: 1.0 })
    }

    /// One `cublasGemmEx` on the device's stream, through its cuBLAS handle.
    ///
    /// cuBLAS is column-major; our buffers are row-major, and a row-major
    /// `[r, c]` buffer is, read column-major, the `[c, r]` matrix (its
    /// transpose) with leading dimension `c`. So:
    ///
    /// - `acc` (row-major `[m, n]`) is the column-major `n × m` matrix `accᵀ`,
    ///   `ldc = n`;
    /// - `rhs` (row-major `[k, n]`) is the column-major `n × k` matrix `rhsᵀ`,
    ///   `lda = n`, taken as is (`transa = N`);
    /// - `lhs` (row-major `[k, m]`) is the column-major `m × k` matrix `lhsᵀ`,
    ///   `ldb = m`, taken transposed (`transb = T`) to give `lhs` (`k × m`).
    ///
    /// `acc += lhsᵀ · rhs` is `accᵀ += rhsᵀ · lhs`, i.e. in cuBLAS's terms
    /// `C = 1 · op(A) · op(B) + beta · C` with `(M, N, K) = (n, m, k)`,
    /// `A = rhs` (`N`), `B = lhs` (`T`), `C = acc`.
    fn gemm<T: CudaDType, C: CudaDType>(
        &self,
        acc: &mut CudaStorage,
        lhs: &CudaStorage,
        rhs: &CudaStorage,
        data_type: sys::cudaDataType_t,
        acc_type: sys::cudaDataType_t,
    ) -> Result<()> {
        let Self { m, n, k, beta, .. } = *self;
        // Nothing to add (k = 0; `transposed_product` zeroes an overwritten
        // `acc` itself), or nothing to write: no call (cuBLAS also wants every
        // leading dimension at least 1).
        if m == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        let int = |what: &str, v: usize| -> Result<c_int> {
            match c_int::try_from(v) {
                Ok(v) => Ok(v),
                Err(_) => bail!("{WHAT}: {what} = {v} exceeds cuBLAS's int"),
            }
        };
        let (m, n, k) = (int("m", m)?, int("n", n)?, int("k", k)?);
        let device = acc.device().clone();
        let stream = device.cuda_stream();
        let blas = device.cublas_handle();
        let lhs = lhs.as_cuda_slice::<T>()?.slice(self.lhs.0..self.lhs.1);
        let rhs = rhs.as_cuda_slice::<T>()?.slice(self.rhs.0..self.rhs.1);
        let mut acc = acc.as_cuda_slice_mut::<C>()?.slice_mut(self.acc.0..self.acc.1);
        // The guards make the stream wait for pending writes (reads, for acc)
        // by other streams, and record our use when dropped after the call.
        let (lhs, _lhs_guard) = lhs.device_ptr(&stream);
        let (rhs, _rhs_guard) = rhs.device_ptr(&stream);
        let (acc, _acc_guard) = acc.device_ptr_mut(&stream);
        let alpha = 1f32;
        let compute = compute_type(data_type, candle::cuda::gemm_reduced_precision_f32());
        // SAFETY: `blas` is candle's live handle for this device, bound to
        // `stream`, in its default host pointer mode (candle never changes it),
        // so cuBLAS reads `alpha` and `beta` (f32, as both compute types want)
        // before returning. The three pointers are this device's memory, kept
        // alive by the storages borrowed for this call (and, for the queued
        // kernel, by the stream ordering of candle's stream-ordered frees) and
        // exactly as large as the cuBLAS arguments say: `rhs` holds k × n
        // elements of `data_type` (n × k column-major, lda = n), `lhs` k × m (m
        // × k column-major, ldb = m), `acc` m × n of `acc_type` (n × m
        // column-major, ldc = n); `Operands::new` checked those shapes against
        // the contiguous ranges sliced above, `T` and `C` are the dtypes
        // `data_type` and `acc_type` name (matched in `cuda_fwd`), and `acc` is
        // borrowed mutably, so no operand aliases it. With `beta = 0` cuBLAS
        // does not read `acc`, which may then be uninitialised.
        unsafe {
            gemm_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_T,
                n,
                m,
                k,
                std::ptr::from_ref(&alpha).cast::<c_void>(),
                rhs as *const c_void,
                data_type,
                n,
                lhs as *const c_void,
                data_type,
                m,
                std::ptr::from_ref(&beta).cast::<c_void>(),
                acc as *mut c_void,
                acc_type,
                n,
                compute,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .w()
    }
}

/// `x *= alpha` in place on CUDA (`cublasSscal`/`cublasDscal`, or for bf16
/// and f16 `cublasScalEx` in f32, each element rounded once, on the device's
/// stream): scales a gradient only its caller holds (the linear loss's sums,
/// a logits gradient formed in the forward pass) by the upstream gradient,
/// without a second gradient-sized buffer (`precomputed::ScaleInPlace`). `x` must be a contiguous f32, f64, bf16
/// or f16 range of `storage` (`layout`).
///
/// # Errors
/// Another dtype, a non-contiguous layout, and cuBLAS's own errors.
pub(crate) fn scale_in_place(storage: &mut CudaStorage, layout: &Layout, alpha: f64) -> Result<()> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("linear cross-entropy (cuda): the scaled gradient must be contiguous")
    };
    let len = (end - start) as i64;
    if len == 0 {
        return Ok(());
    }
    let device = storage.device().clone();
    let stream = device.cuda_stream();
    let blas = device.cublas_handle();
    match storage.dtype() {
        DType::F32 => {
            let mut x = storage.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
            let (x, _guard) = x.device_ptr_mut(&stream);
            let alpha = alpha as f32;
            // SAFETY: `blas` is candle's live handle for this device, bound to
            // `stream`, in host pointer mode (cuBLAS reads `alpha` before
            // returning); `x` points at `len` f32 of this device's memory,
            // borrowed mutably for the call (the guard orders it on `stream`).
            unsafe { sys::cublasSscal_v2_64(*blas.handle(), len, &alpha, x as *mut f32, 1) }.result().w()
        }
        DType::F64 => {
            let mut x = storage.as_cuda_slice_mut::<f64>()?.slice_mut(start..end);
            let (x, _guard) = x.device_ptr_mut(&stream);
            // SAFETY: as for f32 above, with `len` f64.
            unsafe { sys::cublasDscal_v2_64(*blas.handle(), len, &alpha, x as *mut f64, 1) }.result().w()
        }
        DType::BF16 => scale_16bit::<bf16>(storage, (start, end), alpha, sys::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => scale_16bit::<f16>(storage, (start, end), alpha, sys::cudaDataType_t::CUDA_R_16F),
        other => bail!("linear cross-entropy (cuda): only float gradients are scaled in place, got {other:?}"),
    }
}

/// `x *= alpha` over `storage`'s elements `range` of the 16-bit type `T`
/// (`x_type`), by `cublasScalEx` in f32, each element rounded once.
fn scale_16bit<T: CudaDType>(
    storage: &mut CudaStorage,
    (start, end): (usize, usize),
    alpha: f64,
    x_type: sys::cudaDataType_t,
) -> Result<()> {
    let device = storage.device().clone();
    let stream = device.cuda_stream();
    let blas = device.cublas_handle();
    let mut x = storage.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
    let (x, _guard) = x.device_ptr_mut(&stream);
    let alpha = alpha as f32;
    // SAFETY: `blas` is candle's live handle for this device, bound to `stream`,
    // in host pointer mode (cuBLAS reads `alpha`, an f32 as the f32 execution
    // type wants, before returning); `x` points at `end - start` elements of
    // `T`, the type `x_type` names (the callers match the storage's dtype), of
    // this device's memory, borrowed mutably for the call (the guard orders it
    // on `stream`).
    unsafe {
        sys::cublasScalEx_64(
            *blas.handle(),
            (end - start) as i64,
            std::ptr::from_ref(&alpha).cast::<c_void>(),
            sys::cudaDataType_t::CUDA_R_32F,
            x as *mut c_void,
            x_type,
            1,
            sys::cudaDataType_t::CUDA_R_32F,
        )
    }
    .result()
    .w()
}

#[cfg(test)]
mod tests {
    use super::{add_transposed_product, compute_type, write_transposed_product};
    use candle::cuda_backend::cudarc::cublas::sys::{cublasComputeType_t, cudaDataType_t};
    use candle::{DType, Device, Result, Tensor};

    /// TF32 for f32 operands only, and only where candle's f32 matmuls use it.
    #[test]
    fn tf32_only_for_f32_and_only_when_allowed() {
        use cublasComputeType_t::{CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32};
        for data_type in [cudaDataType_t::CUDA_R_32F, cudaDataType_t::CUDA_R_16BF, cudaDataType_t::CUDA_R_16F] {
            assert_eq!(compute_type(data_type, false), CUBLAS_COMPUTE_32F, "{data_type:?}");
        }
        assert_eq!(compute_type(cudaDataType_t::CUDA_R_32F, true), CUBLAS_COMPUTE_32F_FAST_TF32);
        assert_eq!(compute_type(cudaDataType_t::CUDA_R_16BF, true), CUBLAS_COMPUTE_32F);
        assert_eq!(compute_type(cudaDataType_t::CUDA_R_16F, true), CUBLAS_COMPUTE_32F);
    }

    fn error(acc: &Tensor, lhs: &Tensor, rhs: &Tensor) -> String {
        match add_transposed_product(acc, lhs, rhs) {
            Ok(()) => panic!("accepted acc {:?}, lhs {:?}, rhs {:?}", acc.shape(), lhs.shape(), rhs.shape()),
            Err(e) => e.to_string(),
        }
    }

    /// The checks that come before any device work, on CPU tensors (they run
    /// without a GPU).
    #[test]
    fn bad_operands_are_refused() -> Result<()> {
        let cpu = Device::Cpu;
        let acc = Tensor::zeros((3, 5), DType::F32, &cpu)?;
        let lhs = Tensor::zeros((4, 3), DType::BF16, &cpu)?;
        let rhs = Tensor::zeros((4, 5), DType::BF16, &cpu)?;
        assert!(error(&acc, &lhs, &rhs).contains("acc must be on a CUDA device"));
        assert!(error(&acc.flatten_all()?, &lhs, &rhs).contains("acc must be [m, n]"));
        assert!(error(&acc, &rhs, &lhs).contains("lhs must be [k, 3] and rhs [k, 5]"));
        assert!(error(&acc, &lhs.narrow(0, 0, 3)?, &rhs).contains("with one k"));
        assert!(error(&acc.to_dtype(DType::F16)?, &lhs, &rhs).contains("acc must be f32 or the operands' BF16"));
        assert!(error(&acc, &lhs, &rhs.to_dtype(DType::F16)?).contains("share one dtype"));
        let f64s = (lhs.to_dtype(DType::F64)?, rhs.to_dtype(DType::F64)?);
        assert!(error(&acc, &f64s.0, &f64s.1).contains("among f32, bf16 and f16"));
        let strided = Tensor::zeros((3, 4), DType::BF16, &cpu)?.t()?;
        assert!(error(&acc, &strided, &rhs).contains("lhs [4, 3] must be contiguous"));
        Ok(())
    }

    /// `acc += lhsᵀ · rhs` against an f64 product on the host, for operands
    /// at non-zero offsets in larger buffers, an `acc` that starts non-zero,
    /// and dimensions that are not multiples of 8; `acc = lhsᵀ · rhs` over NaNs,
    /// and over anything with an empty product. Needs a GPU; skips without one
    /// (fails with `CHUNKED_CE_REQUIRE_CUDA` set).
    #[test]
    fn matches_host_product() -> Result<()> {
        let device = match Device::new_cuda(0) {
            Ok(device) => device,
            Err(e) => {
                assert!(std::env::var_os("CHUNKED_CE_REQUIRE_CUDA").is_none(), "no CUDA device: {e}");
                eprintln!("SKIP cuda_gemm::matches_host_product: no CUDA device");
                return Ok(());
            }
        };
        let (m, n, k) = (1003, 72, 37);
        let cases = [(DType::F32, DType::F32), (DType::BF16, DType::F32), (DType::F16, DType::F32)];
        let rounded = [(DType::BF16, DType::BF16), (DType::F16, DType::F16)];
        for (dtype, acc_dtype) in cases.into_iter().chain(rounded) {
            // Values exact in every dtype (small multiples of 1/8), so the
            // products are exact in f32 and only the summation order differs.
            let exact = |len: usize, salt: usize| -> Result<Tensor> {
                let v: Vec<f32> = (0..len).map(|i| ((i * 7 + salt * 13) % 17) as f32 / 8.0 - 1.0).collect();
                Tensor::from_vec(v, len, &Device::Cpu)
            };
            let lhs_host = exact((k + 2) * m, 1)?.reshape((k + 2, m))?.narrow(0, 2, k)?;
            let rhs_host = exact((k + 1) * n, 2)?.reshape((k + 1, n))?.narrow(0, 1, k)?;
            let acc_host = exact((m + 3) * n, 3)?.reshape((m + 3, n))?;
            let on_device = |t: &Tensor, dtype: DType| t.to_dtype(dtype)?.to_device(&device);
            let (lhs_full, rhs_full) =
                (on_device(&exact((k + 2) * m, 1)?, dtype)?, on_device(&exact((k + 1) * n, 2)?, dtype)?);
            let lhs = lhs_full.reshape((k + 2, m))?.narrow(0, 2, k)?;
            let rhs = rhs_full.reshape((k + 1, n))?.narrow(0, 1, k)?;
            let acc_full = on_device(&acc_host, acc_dtype)?;
            let acc = acc_full.narrow(0, 2, m)?;
            add_transposed_product(&acc, &lhs, &rhs)?;
            add_transposed_product(&acc, &lhs, &rhs)?;
            let f64 = |t: &Tensor| t.to_dtype(DType::F64);
            let product = f64(&lhs_host)?.t()?.matmul(&f64(&rhs_host)?)?;
            // Each call's sum is exact in f32 (multiples of 1/64 below 2^8),
            // so a 16-bit acc holds it rounded once per call, like this.
            let once = (f64(&acc_host.narrow(0, 2, m)?)? + &product)?.to_dtype(acc_dtype)?;
            let want = (f64(&once)? + &product)?.to_dtype(acc_dtype)?;
            let got = f64(&acc.to_device(&Device::Cpu)?)?;
            let diff = (got - f64(&want)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff <= 1e-5, "{dtype:?} into {acc_dtype:?}: max |diff| {diff:e}");
            // The rows around `acc` in its buffer are untouched.
            let full = f64(&acc_full.to_device(&Device::Cpu)?)?;
            let acc_host = f64(&acc_host.to_dtype(acc_dtype)?)?;
            for (start, len) in [(0, 2), (m + 2, 1)] {
                let diff = (full.narrow(0, start, len)? - acc_host.narrow(0, start, len)?)?.abs()?.max_all()?;
                assert_eq!(diff.to_scalar::<f64>()?, 0.0, "{dtype:?}: rows {start}..{} written", start + len);
            }
            // Written over NaNs (what an uninitialised sum may hold: beta = 0
            // must not read them), then added to: the product rounded once, then
            // twice the product, as above from zeros.
            let nans = Tensor::full(f32::NAN, (m + 3, n), &Device::Cpu)?.to_dtype(acc_dtype)?.to_device(&device)?;
            let acc = nans.narrow(0, 1, m)?;
            write_transposed_product(&acc, &lhs, &rhs)?;
            let once = product.to_dtype(acc_dtype)?;
            let got = f64(&acc.to_device(&Device::Cpu)?)?;
            let diff = (&got - f64(&once)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff <= 1e-5, "{dtype:?} written into {acc_dtype:?} NaNs: max |diff| {diff:e}");
            add_transposed_product(&acc, &lhs, &rhs)?;
            let want = (f64(&once)? + &product)?.to_dtype(acc_dtype)?;
            let got = f64(&acc.to_device(&Device::Cpu)?)?;
            let diff = (got - f64(&want)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff <= 1e-5, "{dtype:?} written then added into {acc_dtype:?}: max |diff| {diff:e}");
            let outside = nans.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            for row in [0, m + 1, m + 2] {
                let values = outside.get(row)?.to_vec1::<f32>()?;
                assert!(values.iter().all(|v| v.is_nan()), "{dtype:?}: row {row} around acc written");
            }
            // An empty product (k = 0) overwrites with zeros.
            write_transposed_product(&acc, &lhs.narrow(0, 0, 0)?, &rhs.narrow(0, 0, 0)?)?;
            let zeros = acc.to_dtype(DType::F64)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert_eq!(zeros, 0.0, "{dtype:?}: the empty product's zeros");
        }
        Ok(())
    }
}
