//! Gradients formed in the forward pass, for a scalar loss whose value
//! receives 1 (Liger's trade: one kernel reads each row for its statistics,
//! then again, mostly from L2, to write its gradient): the linear loss does it
//! per chunk, the logits loss when asked (`grad_in_forward`). Backward then
//! receives the upstream gradients of the row statistics, checks that they
//! are the factors the gradient was formed with times one scalar (the loss's
//! own upstream gradient: 1 for `loss.backward()`, a loss scale, a `1 / k`
//! for gradient accumulation), and scales.

use crate::config::{compute_dtype, UnitFactors, UPSTREAM};
use candle::{bail, CpuStorage, DType, Layout, Result, Tensor};
use std::sync::Mutex;

/// A power of two that brings a scalar loss's unit factors (`1 / n` for a
/// mean over `n` tokens) to order 1. The gradients formed in the forward pass
/// are formed with the factors times it, and divided by it (exactly) once
/// the upstream gradient is known: per-token gradients of size `p / n` would
/// otherwise underflow f16 before a loss scale of, say, 2^16 reached them.
/// Other dtypes (`dtype` is the logits') have f32's exponent range and no
/// boost: backward then skips the pass that would divide it out again.
pub(crate) fn boost_of(unit: &UnitFactors, dtype: DType) -> f64 {
    let largest = unit.ce.abs().max(unit.lse.abs());
    if dtype == DType::F16 && largest > 0.0 && largest.is_finite() {
        2f64.powi(-largest.log2().round() as i32)
    } else {
        1.0
    }
}

/// The scalar `u` with `received = u * unit` element-wise (to 1e-5 relative),
/// if there is one: then the gradients computed in forward, scaled by `u`, are
/// exact. Both are `[N, 3]` (a few KB); they are compared on the host, with one
/// transfer.
pub(crate) fn upstream_scale(received: &Tensor, unit: &Tensor) -> Result<Option<f64>> {
    let both = Tensor::cat(&[received, unit], 1)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let pairs: Vec<(f64, f64)> = both.chunks_exact(6).flat_map(|r| (0..3).map(move |i| (r[i], r[i + 3]))).collect();
    let norm: f64 = pairs.iter().map(|(_, f)| f * f).sum();
    // With a zero `unit` (nothing valid, `num_label_tokens = 0`, no rows) the
    // precomputed gradients are zeros, right only if nothing was received.
    let scale = if norm == 0.0 { 0.0 } else { pairs.iter().map(|(a, f)| a * f).sum::<f64>() / norm };
    let proportional = pairs.iter().all(|(a, f)| (a - scale * f).abs() <= 1e-5 * a.abs());
    Ok(proportional.then_some(scale))
}

/// The logits loss's gradient formed in its forward pass (`grad_in_forward`):
/// the `[.., V]` gradient of the loss for an upstream gradient of `boost`
/// (over the logits themselves when `in_place`), and the per-row factors `[N,
/// 3]` it was formed with for an upstream gradient of 1.
pub(crate) struct PrecomputedGrad {
    /// Taken by the first backward pass when not in place, so that the graph
    /// stops holding the buffer; in place it is the logits' own storage.
    grad: Mutex<Option<Tensor>>,
    unit_factors: Tensor,
    boost: f64,
    in_place: bool,
}

impl PrecomputedGrad {
    pub(crate) fn new(grad: Tensor, unit_factors: Tensor, boost: f64, in_place: bool) -> Self {
        Self { grad: Mutex::new(Some(grad)), unit_factors, boost, in_place }
    }

    /// The logits' gradient for the statistics' upstream `factors` (`[N, 5]`,
    /// see `op/mod.rs`): the precomputed one scaled, when `factors` are its unit
    /// factors times one scalar. Otherwise `None`, for the backward kernels
    /// to form it from the logits, or, when the logits hold the gradient
    /// already, an error naming the cause.
    pub(crate) fn logits_grad(&self, factors: &Tensor) -> Result<Option<Tensor>> {
        let grad = {
            let mut kept = self.grad.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if self.in_place {
                kept.clone()
            } else {
                kept.take()
            }
        };
        if let Some(grad) = grad {
            if let Some(scale) = upstream_scale(&factors.narrow(1, 0, UPSTREAM)?, &self.unit_factors)? {
                let factor = scale / self.boost;
                if self.in_place {
                    // The logits' storage, kept for any later backward pass: a scaled copy.
                    return scaled(grad, factor).map(Some);
                }
                // Taken by this backward pass alone: scaled where it is (for a bf16
                // gradient and a factor such as 1/3, no f32 copy and product beside it).
                if factor != 1.0 {
                    grad.inplace_op1(&ScaleInPlace(factor))?;
                }
                return Ok(Some(grad));
            }
        }
        if self.in_place {
            bail!(
                "chunked cross-entropy: grad_in_forward with inplace_grad wrote the reduced loss's gradient over \
                 the logits in forward, but this backward pass reached the loss's statistics in another way (a \
                 per-token output such as token_losses, weighted per token?), whose gradient needs the logits: \
                 differentiate the reduced loss only (times any scalar), or turn grad_in_forward off"
            )
        }
        Ok(None)
    }
}

/// `grad * factor` in `grad`'s dtype; `grad` itself for a factor of 1. A
/// power of two that the dtype holds as a normal number (f16's boost divided
/// out, a power-of-two loss scale; f16 stops at 2^15, and candle's f16
/// `affine` would make 2^16 infinite) is exact in it (but where the product
/// is subnormal, rounded once) and scales in it; any other factor is formed
/// in the compute dtype (f32 for bf16 and f16, whose rounding of `factor`
/// itself would bias every element), at the cost of an f32 copy of the
/// gradient.
pub(crate) fn scaled(grad: Tensor, factor: f64) -> Result<Tensor> {
    if factor == 1.0 {
        return Ok(grad);
    }
    let compute = compute_dtype(grad.dtype());
    let held = grad.dtype() != DType::F16 || (2f64.powi(-14)..=2f64.powi(15)).contains(&factor);
    if grad.dtype() == compute || (is_power_of_two(factor) && held) {
        return grad.affine(factor, 0.0);
    }
    grad.to_dtype(compute)?.affine(factor, 0.0)?.to_dtype(grad.dtype())
}

/// Whether `x` is `2^k` for an integer `k`: a positive normal f64 with no
/// fraction bits.
fn is_power_of_two(x: f64) -> bool {
    x.is_normal() && x > 0.0 && x.to_bits() & ((1u64 << 52) - 1) == 0
}

/// `x *= scale` in place, for gradients only their caller holds (the linear
/// loss's sums, a logits gradient taken by its backward): in f32 (f64 for
/// f64), 16-bit ones rounded once, with no second gradient-sized buffer.
pub(crate) struct ScaleInPlace(pub(crate) f64);

impl candle::InplaceOp1 for ScaleInPlace {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-scale-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        use candle::backend::BackendStorage;
        use half::{bf16, f16};
        use rayon::prelude::*;
        // Contiguous, or its transpose (the CPU's weight gradient): either way
        // the elements fill one range of the storage.
        let (start, end) = match layout.contiguous_offsets() {
            Some(range) => range,
            None if layout.is_fortran_contiguous() => {
                (layout.start_offset(), layout.start_offset() + layout.shape().elem_count())
            }
            None => bail!("cross-entropy: the gradient scaled in place must be dense"),
        };
        match storage {
            CpuStorage::F32(v) => v[start..end].par_iter_mut().for_each(|x| *x *= self.0 as f32),
            CpuStorage::F64(v) => v[start..end].par_iter_mut().for_each(|x| *x *= self.0),
            // In f32 and rounded once, as cuBLAS's scal with an f32 execution type.
            CpuStorage::BF16(v) => {
                v[start..end].par_iter_mut().for_each(|x| *x = bf16::from_f32(x.to_f32() * self.0 as f32))
            }
            CpuStorage::F16(v) => {
                v[start..end].par_iter_mut().for_each(|x| *x = f16::from_f32(x.to_f32() * self.0 as f32))
            }
            other => bail!("cross-entropy: only float gradients are scaled in place, got {:?}", other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle::CudaStorage, layout: &Layout) -> Result<()> {
        crate::cuda_gemm::scale_in_place(storage, layout, self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::is_power_of_two;

    #[test]
    fn powers_of_two() {
        for k in [-60, -12, -1, 0, 1, 16, 100] {
            assert!(is_power_of_two(2f64.powi(k)), "2^{k}");
        }
        for x in [3.0, 1.0 / 3.0, 0.75, -2.0, 0.0, f64::INFINITY, f64::NAN, 1.0 + f64::EPSILON] {
            assert!(!is_power_of_two(x), "{x}");
        }
    }
}
