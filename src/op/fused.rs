//! The fused engine as candle custom ops: each dispatches on the logits'
//! dtype once into the CPU kernels (`src/cpu/`) or the CUDA launchers
//! (`src/cuda.rs`).

use super::row_labels;
use crate::config::{OpConfig, UnitFactors, STATS};
use crate::cpu::{self, RowLayout};
use candle::backend::BackendStorage;
use candle::op::BackpropOp;
use candle::{bail, CpuStorage, CustomOp2, CustomOp3, InplaceOp2, InplaceOp3, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

/// Fused forward: one pass per row (max, then sum of exponentials while the
/// row is in cache), rayon over chunks of `chunk_len` rows.
pub(super) struct FusedForward(pub(super) OpConfig);

impl CustomOp2 for FusedForward {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-fwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let layout = row_layout(l1)?;
        let labels = row_labels(i64_slice(s2, l2)?, layout.vocab, self.0.ignore_index)?;
        let (terms, chunk) = (self.0.terms, self.0.chunk_len);
        let w = SumWeights::read(&self.0)?;
        let stats = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(cpu::forward(v, &layout, &labels, terms, w.f32()?, chunk)),
            CpuStorage::BF16(v) => CpuStorage::F32(cpu::forward(v, &layout, &labels, terms, w.f32()?, chunk)),
            CpuStorage::F16(v) => CpuStorage::F32(cpu::forward(v, &layout, &labels, terms, w.f32()?, chunk)),
            CpuStorage::F64(v) => CpuStorage::F64(cpu::forward_f64(v, &layout, &labels, terms, w.f64()?)),
            other => bail!("{}: logits must be a float dtype, got {:?}", self.name(), other.dtype()),
        };
        Ok((stats, Shape::from((labels.len(), STATS))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        crate::cuda::forward(s1, l1, s2, l2, &self.0)
    }
}

/// The fused forward that also writes the gradient of a scalar loss (see
/// [`super::row_stats_and_unit_grad`]), leaving the statistics `[N, 4]` in `stats`.
/// As an in-place op it rewrites the logits: on CUDA one kernel
/// (`ce_fwd_grad_*`), on the CPU (f32, bf16, f16)
/// `cpu::forward_with_grad_in_place`, row by row. As an op with an output, the
/// gradient, it only reads them: CUDA only (`ce_fwd_grad_out_*`; the CPU runs
/// the forward, then the backward, which read the logits as often).
pub(super) struct FusedForwardWithGrad {
    cfg: OpConfig,
    unit: UnitFactors,
    stats: Mutex<Option<Storage>>,
}

impl FusedForwardWithGrad {
    pub(super) fn new(cfg: OpConfig, unit: UnitFactors) -> Self {
        Self { cfg, unit, stats: Mutex::new(None) }
    }

    fn keep(&self, stats: Storage) {
        *self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(stats);
    }

    /// The statistics the op left, as an `[N, 4]` tensor (`labels` is `[N]`).
    pub(super) fn stats(self, labels: &Tensor) -> Result<Tensor> {
        let stats = self.stats.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(stats) = stats else { bail!("chunked cross-entropy: the forward with gradient left no statistics") };
        Ok(Tensor::from_storage(stats, (labels.elem_count(), STATS), BackpropOp::none(), false))
    }
}

impl CustomOp2 for FusedForwardWithGrad {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-fwd-grad-out"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = CustomOp2::name(self);
        bail!("{name}: CUDA only (row_stats_and_unit_grad runs the forward, then the backward, on the CPU)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        let (stats, grad) = crate::cuda::forward_with_grad_out(s1, l1, s2, l2, &self.cfg, &self.unit)?;
        self.keep(Storage::Cuda(stats));
        Ok((grad, l1.shape().clone()))
    }
}

impl InplaceOp2 for FusedForwardWithGrad {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-fwd-grad"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let layout = row_layout(l1)?;
        let labels = row_labels(i64_slice(s2, l2)?, layout.vocab, self.cfg.ignore_index)?;
        let (terms, chunk) = (self.cfg.terms, self.cfg.chunk_len);
        let w = SumWeights::read(&self.cfg)?;
        let u = self.unit;
        let unit = cpu::UnitRowFactors {
            ce: u.ce as f32,
            lse: u.lse as f32,
            lse_squared: u.lse_squared as f32,
            logit_sum: u.logit_sum as f32,
        };
        let stats = match s1 {
            CpuStorage::F32(v) => cpu::forward_with_grad_in_place(v, &layout, &labels, terms, w.f32()?, unit, chunk),
            CpuStorage::BF16(v) => cpu::forward_with_grad_in_place(v, &layout, &labels, terms, w.f32()?, unit, chunk),
            CpuStorage::F16(v) => cpu::forward_with_grad_in_place(v, &layout, &labels, terms, w.f32()?, unit, chunk),
            other => bail!("{}: logits must be f32, bf16 or f16, got {:?}", InplaceOp2::name(self), other.dtype()),
        };
        self.keep(Storage::Cpu(CpuStorage::F32(stats)));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut candle::CudaStorage, l1: &Layout, s2: &candle::CudaStorage, l2: &Layout) -> Result<()> {
        let (stats, _) = crate::cuda::forward_with_grad(s1, l1, s2, l2, &self.cfg, &self.unit)?;
        self.keep(Storage::Cuda(stats));
        Ok(())
    }
}

/// Fused backward into a fresh contiguous buffer shaped like the logits. Its
/// third input is `factors`, `[N, 5]` per row (see [`super::logits_grad`]).
pub(super) struct FusedBackward(pub(super) OpConfig);

impl CustomOp3 for FusedBackward {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let layout = row_layout(l1)?;
        let labels = row_labels(i64_slice(s2, l2)?, layout.vocab, self.0.ignore_index)?;
        let (terms, chunk) = (self.0.terms, self.0.chunk_len);
        let w = SumWeights::read(&self.0)?;
        let grad = match s1 {
            CpuStorage::F32(v) => {
                CpuStorage::F32(cpu::backward(v, &layout, &labels, f32_slice(s3, l3)?, terms, w.f32()?, chunk))
            }
            CpuStorage::BF16(v) => {
                CpuStorage::BF16(cpu::backward(v, &layout, &labels, f32_slice(s3, l3)?, terms, w.f32()?, chunk))
            }
            CpuStorage::F16(v) => {
                CpuStorage::F16(cpu::backward(v, &layout, &labels, f32_slice(s3, l3)?, terms, w.f32()?, chunk))
            }
            CpuStorage::F64(v) => {
                CpuStorage::F64(cpu::backward_f64(v, &layout, &labels, f64_slice(s3, l3)?, terms, w.f64()?))
            }
            other => bail!("{}: logits must be a float dtype, got {:?}", self.name(), other.dtype()),
        };
        Ok((grad, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        crate::cuda::backward(s1, l1, s2, l2, s3, l3, &self.0)
    }
}

/// Fused backward written over the logits' own storage (`inplace_grad`).
pub(super) struct FusedBackwardInPlace(pub(super) OpConfig);

impl InplaceOp3 for FusedBackwardInPlace {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-bwd-inplace"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let layout = row_layout(l1)?;
        let labels = row_labels(i64_slice(s2, l2)?, layout.vocab, self.0.ignore_index)?;
        let (terms, chunk) = (self.0.terms, self.0.chunk_len);
        let w = SumWeights::read(&self.0)?;
        let f = f32_slice(s3, l3);
        match s1 {
            CpuStorage::F32(v) => cpu::backward_in_place(v, &layout, &labels, f?, terms, w.f32()?, chunk),
            CpuStorage::BF16(v) => cpu::backward_in_place(v, &layout, &labels, f?, terms, w.f32()?, chunk),
            CpuStorage::F16(v) => cpu::backward_in_place(v, &layout, &labels, f?, terms, w.f32()?, chunk),
            CpuStorage::F64(v) => cpu::backward_in_place_f64(v, &layout, &labels, f64_slice(s3, l3)?, terms, w.f64()?),
            other => bail!("{}: logits must be a float dtype, got {:?}", self.name(), other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle::CudaStorage,
        l1: &Layout,
        s2: &candle::CudaStorage,
        l2: &Layout,
        s3: &candle::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda::backward_in_place(s1, l1, s2, l2, s3, l3, &self.0)
    }
}

/// Row offsets of a `[.., V]` layout whose last dim is unit-stride; any
/// strides are allowed on the leading dims.
fn row_layout(layout: &Layout) -> Result<RowLayout> {
    let Some((&vocab, leading)) = layout.dims().split_last() else {
        bail!("chunked cross-entropy: logits must have at least one dim")
    };
    let strides = layout.stride();
    if vocab > 1 && strides[strides.len() - 1] != 1 {
        bail!("chunked cross-entropy: the vocabulary dim of the logits must be unit-stride, strides {strides:?}")
    }
    let mut row_offsets = vec![layout.start_offset()];
    for (&dim, &stride) in leading.iter().zip(strides) {
        row_offsets = row_offsets.iter().flat_map(|&o| (0..dim).map(move |i| o + i * stride)).collect();
    }
    Ok(RowLayout { row_offsets, vocab })
}

/// The logit sum's class weights ([`OpConfig::sum_weights`]) read into host
/// memory for the CPU kernels (`V` values: a copy costs nothing next to the
/// `[N, V]` pass that uses it).
enum SumWeights {
    None,
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl SumWeights {
    fn read(cfg: &OpConfig) -> Result<Self> {
        let Some(w) = &cfg.sum_weights else { return Ok(Self::None) };
        match w.dtype() {
            candle::DType::F32 => Ok(Self::F32(w.to_vec1()?)),
            candle::DType::F64 => Ok(Self::F64(w.to_vec1()?)),
            dtype => bail!("chunked cross-entropy: internal class weights must be f32 or f64, got {dtype:?}"),
        }
    }

    fn f32(&self) -> Result<Option<&[f32]>> {
        match self {
            Self::None => Ok(None),
            Self::F32(w) => Ok(Some(w)),
            Self::F64(_) => bail!("chunked cross-entropy: f64 class weights for f32-accumulated logits"),
        }
    }

    fn f64(&self) -> Result<Option<&[f64]>> {
        match self {
            Self::None => Ok(None),
            Self::F64(w) => Ok(Some(w)),
            Self::F32(_) => bail!("chunked cross-entropy: f32 class weights for f64 logits"),
        }
    }
}

fn i64_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [i64]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::I64(v), Some((start, end))) => Ok(&v[start..end]),
        _ => bail!("chunked cross-entropy: internal labels must be contiguous i64"),
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => bail!("chunked cross-entropy: backward factors must be contiguous f32"),
    }
}

fn f64_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f64]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F64(v), Some((start, end))) => Ok(&v[start..end]),
        _ => bail!("chunked cross-entropy: backward factors must be contiguous f64"),
    }
}
