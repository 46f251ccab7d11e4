//! The labels every engine takes: `[N]` contiguous i64, with the tokens a
//! mask leaves out set to `ignore_index`, made from the caller's labels (any
//! label dtype, `[N]` or `[B, S]`, any strides) and mask (any integer or
//! float dtype) by one op: a loop on the CPU, one `ce_labels_*` kernel on
//! CUDA. Not candle's casts and comparisons: candle's CUDA kernels have no
//! cast from i16 or i32, and none that compares them.

use crate::kernel_abi::MaskElements;
use crate::op::kernels_cover;
use candle::backend::BackendStorage;
use candle::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `labels` as `[N]` contiguous i64, with the tokens whose `mask` element
/// (the labels' shape, on their device) is 0 set to `ignore_index`. The
/// caller's tensors are not modified. The labels' dtype, shape and device are
/// the caller's to check; a mask's dtype (the rule is
/// [`MaskElements::of`]'s, on every device) and device are checked here.
pub(crate) fn row_labels(labels: &Tensor, mask: Option<&Tensor>, ignore_index: i64) -> Result<Tensor> {
    if let Some(mask) = mask {
        MaskElements::of(mask.dtype())?;
        if !mask.device().same_device(labels.device()) {
            bail!("chunked cross-entropy: the mask is on {:?} but the labels on {:?}", mask.device(), labels.device())
        }
    }
    if labels.elem_count() == 0 {
        return Tensor::zeros(0, DType::I64, labels.device());
    }
    let op = ToRowLabels { ignore_index };
    match mask {
        None if labels.dtype() == DType::I64 && labels.is_contiguous() => labels.flatten_all(),
        _ if !kernels_cover(labels.device().location()) => candle_ops(labels, mask, ignore_index),
        None => labels.apply_op1_no_bwd(&op),
        Some(mask) => labels.apply_op2_no_bwd(mask, &op),
    }
}

/// The same with candle's ops, on a device no custom op of this crate runs on.
fn candle_ops(labels: &Tensor, mask: Option<&Tensor>, ignore_index: i64) -> Result<Tensor> {
    let labels = labels.to_dtype(DType::I64)?.flatten_all()?;
    let labels = match mask {
        None => labels,
        Some(mask) => {
            let keep = mask.flatten_all()?.ne(0f64)?;
            keep.where_cond(&labels, &Tensor::full(ignore_index, labels.shape(), labels.device())?)?
        }
    };
    labels.contiguous()
}

/// The op behind [`row_labels`]: the caller's labels, and a mask as its
/// second input.
struct ToRowLabels {
    ignore_index: i64,
}

impl ToRowLabels {
    fn cpu(
        &self,
        labels: &CpuStorage,
        labels_layout: &Layout,
        mask: Option<(&CpuStorage, &Layout)>,
    ) -> Result<Vec<i64>> {
        let mut out = widened(labels, labels_layout)?;
        if let Some((mask, layout)) = mask {
            if layout.dims() != labels_layout.dims() {
                bail!(
                    "chunked cross-entropy: mask {:?} must have the labels' shape {:?}",
                    layout.shape(),
                    labels_layout.shape()
                )
            }
            for (label, keep) in out.iter_mut().zip(kept(mask, layout)?) {
                if !keep {
                    *label = self.ignore_index;
                }
            }
        }
        Ok(out)
    }
}

/// The storage offset of each element of `layout`, in row-major order.
fn offsets(layout: &Layout) -> Vec<usize> {
    let mut offsets = vec![layout.start_offset()];
    for (&dim, &stride) in layout.dims().iter().zip(layout.stride()) {
        offsets = offsets.iter().flat_map(|&o| (0..dim).map(move |i| o + i * stride)).collect();
    }
    offsets
}

/// The labels' values, in their layout's order, as i64.
fn widened(labels: &CpuStorage, layout: &Layout) -> Result<Vec<i64>> {
    fn read<T: Copy + Into<i64>>(values: &[T], layout: &Layout) -> Vec<i64> {
        offsets(layout).into_iter().map(|i| values[i].into()).collect()
    }
    Ok(match labels {
        CpuStorage::U8(v) => read(v, layout),
        CpuStorage::U32(v) => read(v, layout),
        CpuStorage::I16(v) => read(v, layout),
        CpuStorage::I32(v) => read(v, layout),
        CpuStorage::I64(v) => read(v, layout),
        other => bail!(
            "chunked cross-entropy: labels must be an integer dtype (u8, u32, i16, i32, i64), got {:?}",
            other.dtype()
        ),
    })
}

/// Whether each mask element, in its layout's order, is not 0 (as `mask !=
/// 0`: -0.0 is 0, NaN is not), for the dtypes [`MaskElements::of`] takes.
fn kept(mask: &CpuStorage, layout: &Layout) -> Result<Vec<bool>> {
    fn read<T: Copy>(values: &[T], layout: &Layout, nonzero: impl Fn(T) -> bool) -> Vec<bool> {
        offsets(layout).into_iter().map(|i| nonzero(values[i])).collect()
    }
    Ok(match mask {
        CpuStorage::U8(v) => read(v, layout, |x| x != 0),
        CpuStorage::U32(v) => read(v, layout, |x| x != 0),
        CpuStorage::I16(v) => read(v, layout, |x| x != 0),
        CpuStorage::I32(v) => read(v, layout, |x| x != 0),
        CpuStorage::I64(v) => read(v, layout, |x| x != 0),
        CpuStorage::BF16(v) => read(v, layout, |x| f32::from(x) != 0.0),
        CpuStorage::F16(v) => read(v, layout, |x| f32::from(x) != 0.0),
        CpuStorage::F32(v) => read(v, layout, |x| x != 0.0),
        CpuStorage::F64(v) => read(v, layout, |x| x != 0.0),
        CpuStorage::F8E4M3(v) => read(v, layout, |x| x.to_f32() != 0.0),
        other => bail!("chunked cross-entropy: no CPU reading of a {:?} mask", other.dtype()),
    })
}

impl CustomOp1 for ToRowLabels {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-labels"
    }

    fn cpu_fwd(&self, labels: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.cpu(labels, layout, None)?;
        let n = out.len();
        Ok((CpuStorage::I64(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, labels: &candle::CudaStorage, layout: &Layout) -> Result<(candle::CudaStorage, Shape)> {
        crate::cuda::labels(labels, layout, None, self.ignore_index)
    }
}

impl CustomOp2 for ToRowLabels {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-labels-masked"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.cpu(s1, l1, Some((s2, l2)))?;
        let n = out.len();
        Ok((CpuStorage::I64(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        crate::cuda::labels(s1, l1, Some((s2, l2)), self.ignore_index)
    }
}
