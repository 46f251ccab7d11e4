//! The products as candle ops on CPU storages, for the linear loss's chunks:
//! f32 and f64, contiguous operands. Other devices and dtypes are not theirs
//! (see [`takes`]).

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
            _ => bail!("{}: the operands must all be f32 or all f64, or a bf16/f16 acc with f32 operands", self.name()),
        }
        Ok(())
    }
}
