//! The loss as one node of candle's graph, and its hand-written backward.
//!
//! # The maths (the one place it is written)
//!
//! For a row of logits `x` (length `V`) with target `y`, in f32 (f64 for f64
//! logits), after the optional soft-cap `x'_j = cap * tanh(x_j / cap)`
//! (`x' = x` without it), the kernels compute four statistics:
//!
//! ```text
//! ce        = lse - x'_y                 lse = max(x') + ln Σ_j exp(x'_j - max(x'))
//! logit_sum = Σ_j c_j x'_j               (only with label smoothing)
//! correct   = 1 if y is the first index of max(x'), else 0  (token accuracy)
//! ```
//!
//! all 0 on ignored rows, with `c` the class weights (`c_j = 1` without
//! them). The per-token loss is then composed from them by ordinary candle
//! ops on `[N]` values (`loss.rs`):
//!
//! ```text
//! loss = t [c_y (1 - ε) ce + ε (C lse - logit_sum) / V + z lse²]      C = Σ_j c_j
//! ```
//!
//! (label smoothing `ε` and class weights `c` as in PyTorch, whose smoothing
//! term is `ε / V Σ_j c_j (lse - x'_j)`; `z` the z-loss coefficient; `t` the
//! token's loss weight, 1 without them), so that candle's autograd delivers
//! the upstream gradients `g_ce`, `g_lse`, `g_sum` of the three differentiable
//! statistics (the mean's `1 / n`, the weights, the `(1 - ε)`, the `2 z lse`
//! are folded into them). The gradient of the row is then
//!
//! ```text
//! p_j    = exp(x'_j - lse)
//! grad_j = ((g_ce + g_lse) p_j + g_sum c_j) * cap'_j          for j != y
//! grad_y = (g_ce (p_y - 1) + g_lse p_y + g_sum c_y) * cap'_y
//! cap'_j = 1 - tanh²(x_j / cap) = 4e / (1 + e)²,  e = exp(-2 |x_j / cap|)
//!                                                         (1 without soft-cap)
//! ```
//!
//! and 0 on ignored rows. The slope is formed from the raw logit as `4e / (1 +
//! e)²`, not as `1 - (x'_j / cap)²`, which cancels where the cap saturates.
//!
//! `ce` and `p_y - 1` are evaluated so that they do not cancel when the target
//! holds most of the probability (`p_y -> 1`, common late in training): with
//! `rest = Σ_{j≠y} exp(x'_j - max)`, `ce = ln(1 + rest / exp(x'_y - max))` when
//! `rest <= exp(x'_y - max)`, and `p_y - 1` is `expm1(-ce)` (the fused kernels)
//! or `-Σ_{j≠y} p_j` (the primitive engine), formed in f32 before the gradient
//! is rounded to the logits' dtype. PyTorch forms `exp(log_softmax) - 1` and
//! keeps only about 3 significant digits of a 3e-5 gradient in f32. The CPU
//! kernels (`src/cpu/`), the CUDA kernels (`cuda/cross_entropy.cu`) and the
//! primitive engine (`src/primitive.rs`) all compute exactly this.
//!
//! # The graph
//!
//! A forward engine computes the per-row statistics `[N, 4] = (ce, lse,
//! logit_sum, correct)` without recording anything; a [`StatsNode`] then
//! attaches them to the graph as a single node over the loss's differentiable
//! inputs (`logits`, or `hidden`, `weight` and an optional bias for the linear
//! loss). Chunking happens inside the engines, never as `narrow` nodes in the
//! graph (candle's `narrow` backward pads every chunk to full size, which would
//! make the loss quadratic). The node's backward keeps `lse` and `ce` from the
//! forward, so backward is one pass that never re-reduces a row.
//!
//! On a device where no custom op of this crate runs ([`kernels_cover`]),
//! there is no node: `Engine::Autograd` records the primitive engine's
//! statistics op by op (`primitive::row_stats_recorded`), and candle's
//! autograd differentiates them.

#[cfg(feature = "testing")]
use crate::config::RowTerms;
use crate::config::{backward_factors, bad_label, Engine, OpConfig, RowLabel, Stat, UnitFactors, STATS};
use crate::cpu::{self, RowLayout};
use crate::precomputed::PrecomputedGrad;
use crate::primitive;
use candle::backend::BackendStorage;
use candle::op::BackpropOp;
use candle::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, DeviceLocation, InplaceOp2, InplaceOp3, Layout, Result,
    Shape, Storage, Tensor,
};
#[cfg(feature = "testing")]
pub use oracle::{cpu_logits_grad, cpu_row_stats};
use std::sync::Mutex;

/// Whether this build's custom ops run on tensors at `location`: the fused
/// kernels, and also the [`StatsNode`] that makes either engine one graph node
/// (a custom op with no implementation for a device fails there, whatever it
/// computes). The CPU always; CUDA only when this crate has its `cuda` feature,
/// since candle can have CUDA through another crate's feature while our
/// `cuda_fwd`s were not compiled; Metal never.
pub(crate) fn kernels_cover(location: DeviceLocation) -> bool {
    match location {
        DeviceLocation::Cpu => true,
        DeviceLocation::Cuda { .. } => cfg!(feature = "cuda"),
        DeviceLocation::Metal { .. } => false,
    }
}

/// Computes the per-row statistics `[N, 4] = (ce, lse, logit_sum, correct)`
/// of `logits` (`[.., V]`, last dim unit-stride) against `labels` (`[N]`,
/// i64, contiguous), with nothing recorded for backward. `Autograd` runs the
/// primitive engine, which needs no custom op (the losses record their
/// statistics with `primitive::row_stats_recorded` instead; only the
/// benchmarks' [`crate::ChunkedCrossEntropy::bench_ops`] come here with it).
pub(crate) fn row_stats(logits: &Tensor, labels: &Tensor, cfg: &OpConfig) -> Result<Tensor> {
    match cfg.engine {
        Engine::Fused => logits.apply_op2_no_bwd(labels, &FusedForward(cfg.clone())),
        Engine::Primitive | Engine::Autograd => primitive::row_stats_chunked(&logits.detach(), labels, cfg),
    }
}

/// What a loss node computes in backward from its inputs and `factors`,
/// `[N, 5] = (g_ce, g_lse, g_sum, lse, ce)` per row (see the maths above).
pub(crate) trait NodeBackward: Send + Sync + 'static {
    /// The node's name in candle's graph.
    const NAME: &'static str;
    /// The gradients of the node's inputs, in order.
    fn backward(&self, inputs: &[&Tensor], factors: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

/// The single graph node of a loss call over its differentiable inputs (one to
/// three): its forward returns the row statistics computed beforehand, its
/// backward is `B`'s.
pub(crate) struct StatsNode<B> {
    pub stats: Tensor,
    pub backward: B,
}

impl<B: NodeBackward> StatsNode<B> {
    /// A copy of the statistics (a fresh, contiguous `[N, 4]` tensor).
    fn stats_storage(&self) -> Result<(Storage, Shape)> {
        let (storage, layout) = self.stats.storage_and_layout();
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }

    fn cpu_stats(&self) -> Result<(CpuStorage, Shape)> {
        match self.stats_storage()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => bail!("chunked cross-entropy: row statistics are not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_stats(&self) -> Result<(candle::CudaStorage, Shape)> {
        match self.stats_storage()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => bail!("chunked cross-entropy: row statistics are not on the CUDA device"),
        }
    }

    /// The node's backward: `grad` is `[N, 4]`, the upstream gradient of each
    /// statistic (that of `correct` is ignored).
    fn gradients(&self, inputs: &[&Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        self.backward.backward(inputs, &backward_factors(grad, &self.stats)?)
    }
}

// The node's forward ignores its inputs (the statistics were computed from
// them already); each arity only forwards to the shared methods above.

impl<B: NodeBackward> CustomOp1 for StatsNode<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_stats()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle::CudaStorage, _: &Layout) -> Result<(candle::CudaStorage, Shape)> {
        self.cuda_stats()
    }
    fn bwd(&self, a: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.gradients(&[a], grad)?.swap_remove(0))
    }
}

impl<B: NodeBackward> CustomOp2 for StatsNode<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_stats()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.cuda_stats()
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut grads = self.gradients(&[a, b], grad)?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten()))
    }
}

impl<B: NodeBackward> CustomOp3 for StatsNode<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_stats()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.cuda_stats()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut grads = self.gradients(&[a, b, c], grad)?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten(), grads.next().flatten()))
    }
}

/// The backward of the loss over logits: the gradient of the logits (the
/// labels travel inside it: they are not an input of the node), from the
/// backward kernels or, with `grad_in_forward`, formed in the forward pass.
pub(crate) struct LogitsBackward {
    pub cfg: OpConfig,
    pub labels: Tensor,
    pub precomputed: Option<PrecomputedGrad>,
}

impl NodeBackward for LogitsBackward {
    const NAME: &'static str = "chunked-cross-entropy";

    fn backward(&self, inputs: &[&Tensor], factors: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let precomputed = match &self.precomputed {
            Some(precomputed) => precomputed.logits_grad(factors)?,
            None => None,
        };
        let grad = match precomputed {
            Some(grad) => grad,
            None => logits_grad(inputs[0], &self.labels, factors, &self.cfg)?,
        };
        Ok(vec![Some(grad)])
    }
}

/// The gradient of the loss with respect to `logits` (shaped like them, in
/// their dtype), from `factors = [N, 5] = (g_ce, g_lse, g_sum, lse, ce)`, with
/// nothing recorded for backward. With `inplace_grad` it is written over
/// `logits`. `Autograd` runs the primitive engine, as in [`row_stats`].
pub(crate) fn logits_grad(logits: &Tensor, labels: &Tensor, factors: &Tensor, cfg: &OpConfig) -> Result<Tensor> {
    // `cat` along dim 1 of non-contiguous columns can return a strided tensor.
    let factors = &factors.contiguous()?;
    match (cfg.engine, cfg.inplace_grad) {
        (Engine::Fused, false) => logits.apply_op3_no_bwd(labels, factors, &FusedBackward(cfg.clone())),
        (Engine::Fused, true) => {
            logits.inplace_op3(labels, factors, &FusedBackwardInPlace(cfg.clone()))?;
            Ok(logits.detach())
        }
        (Engine::Primitive | Engine::Autograd, _) => primitive::grad_chunked(&logits.detach(), labels, factors, cfg),
    }
}

/// Fused forward: one pass per row (max, then sum of exponentials while the
/// row is in cache), rayon over chunks of `chunk_len` rows.
struct FusedForward(OpConfig);

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

/// The per-row multipliers of a weighted loss's [`UnitFactors`] (see the
/// maths above), `[n, 1]` each in the compute dtype: `ce` (`t c_y`) scales
/// `g_ce`, `rest` (`t`) scales `g_lse` and `g_sum`.
#[derive(Debug, Clone)]
pub(crate) struct RowWeights {
    pub ce: Tensor,
    pub rest: Tensor,
}

impl RowWeights {
    /// The multipliers of rows `start..start + len`.
    pub(crate) fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        self.map(|column| column.narrow(0, start, len))
    }

    /// The multipliers of the rows `f` picks from each column.
    pub(crate) fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self { ce: f(&self.ce)?, rest: f(&self.rest)? })
    }
}

/// The statistics `[N, 4]` of `logits` and the gradient of a scalar loss whose
/// value receives 1, from `unit` (see [`UnitFactors`]) and, for a weighted
/// loss, the rows' `weights`; with `cfg.inplace_grad` written over the
/// logits' storage, which must then be a temporary nobody else reads (the
/// linear loss's chunk logits) or a caller's that gave them up. Returns the
/// statistics and the gradient (the per-row factors it was formed with are
/// [`unit_factors`] of the statistics). In place, unweighted, with the fused
/// kernels (f64 on CUDA only), one in-place op computes both: on CUDA one
/// kernel makes two passes over the logits (the forward's read, then a read
/// mostly from L2 and the write), on the CPU each row is rewritten right after
/// its statistics. Otherwise the forward engine runs, then the backward.
pub(crate) fn row_stats_and_unit_grad(
    logits: &Tensor,
    labels: &Tensor,
    cfg: &OpConfig,
    unit: UnitFactors,
    weights: Option<&RowWeights>,
) -> Result<(Tensor, Tensor)> {
    let cpu = logits.device().is_cpu() && logits.dtype() != DType::F64 && cfg.inplace_grad;
    if cfg.engine == Engine::Fused && weights.is_none() && (logits.device().is_cuda() || cpu) {
        let op = FusedForwardWithGrad { cfg: cfg.clone(), unit, stats: Mutex::new(None) };
        let grad = if cfg.inplace_grad {
            logits.inplace_op2(labels, &op)?;
            logits.detach()
        } else {
            logits.apply_op2_no_bwd(labels, &op)?
        };
        return Ok((op.stats(labels)?, grad));
    }
    let stats = row_stats(logits, labels, cfg)?;
    let factors = backward_factors(&unit_factors(&stats, unit, weights)?, &stats)?;
    Ok((stats, logits_grad(logits, labels, &factors, cfg)?))
}

/// The per-row factors `[N, 3] = (g_ce, g_lse, g_sum)` that rows with the
/// statistics `stats` (`[N, 4]`) receive when a scalar loss receives 1, from
/// `unit` and, for a weighted loss, the rows' `weights` (see the maths above).
pub(crate) fn unit_factors(stats: &Tensor, unit: UnitFactors, weights: Option<&RowWeights>) -> Result<Tensor> {
    let lse = Stat::Lse.of(stats)?;
    let constant = |v: f64| Tensor::full(v, (stats.dim(0)?, 1), lse.device())?.to_dtype(lse.dtype());
    let (mut g_ce, mut g_lse, mut g_sum) =
        (constant(unit.ce)?, lse.affine(unit.lse_squared, unit.lse)?, constant(unit.logit_sum)?);
    if let Some(w) = weights {
        (g_ce, g_lse, g_sum) = ((g_ce * &w.ce)?, (g_lse * &w.rest)?, (g_sum * &w.rest)?);
    }
    Tensor::cat(&[g_ce, g_lse, g_sum], 1)
}

/// The fused forward that also writes the gradient of a scalar loss (see
/// [`row_stats_and_unit_grad`]), leaving the statistics `[N, 4]` in `stats`.
/// As an in-place op it rewrites the logits: on CUDA one kernel
/// (`ce_fwd_grad_*`), on the CPU (f32, bf16, f16)
/// `cpu::forward_with_grad_in_place`, row by row. As an op with an output, the
/// gradient, it only reads them: CUDA only (`ce_fwd_grad_out_*`; the CPU runs
/// the forward, then the backward, which read the logits as often).
struct FusedForwardWithGrad {
    cfg: OpConfig,
    unit: UnitFactors,
    stats: Mutex<Option<Storage>>,
}

impl FusedForwardWithGrad {
    fn keep(&self, stats: Storage) {
        *self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(stats);
    }

    /// The statistics the op left, as an `[N, 4]` tensor (`labels` is `[N]`).
    fn stats(self, labels: &Tensor) -> Result<Tensor> {
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
/// third input is `factors`, `[N, 5]` per row (see [`logits_grad`]).
struct FusedBackward(OpConfig);

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
struct FusedBackwardInPlace(OpConfig);

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

/// Checks every label against `[0, vocab)` and turns it into a row index, or
/// `None` for `ignore_index`. The error names the first bad row and its value.
pub(crate) fn row_labels(labels: &[i64], vocab: usize, ignore_index: i64) -> Result<Vec<RowLabel>> {
    labels
        .iter()
        .enumerate()
        .map(|(row, &label)| match label {
            l if l == ignore_index => Ok(None),
            l if l >= 0 && (l as u64) < vocab as u64 => Ok(Some(l as usize)),
            l => Err(bad_label(row, l, vocab, ignore_index)),
        })
        .collect()
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

/// The tests' CPU oracle for the kernels (feature `testing`).
#[cfg(feature = "testing")]
mod oracle {
    use super::{logits_grad, row_stats, Engine, OpConfig, RowTerms};
    use crate::kernel_abi::KernelOptions;
    use candle::{Result, Tensor};

    /// The crate's fused CPU engine on the kernels' inputs: `[N, 4] = (ce, lse,
    /// logit_sum, correct)` of `logits` (`[.., V]` on the CPU, last dim
    /// unit-stride) against `labels` (`[N]` i64), with `options.sum_weights` (on
    /// the CPU) as the logit sum's class weights: the oracle of
    /// `tests/kernels_on_cpu.rs`, beside the launch descriptions of
    /// [`crate::kernel_abi`] that it tests.
    ///
    /// # Errors
    /// A label outside `[0, V)` that is not `options.ignore_index`, named with its
    /// row; class weights that are not `[V]` in the accumulator type.
    pub fn cpu_row_stats(logits: &Tensor, labels: &Tensor, options: &KernelOptions) -> Result<Tensor> {
        row_stats(logits, labels, &cpu_config(logits, options, false)?)
    }

    /// The crate's fused CPU engine's gradient from `factors` (`[N, 5] = (g_ce,
    /// g_lse, g_sum, lse, ce)`), shaped like `logits`, with `options.sum_weights`
    /// in its `g_sum` terms; with `in_place` it is written over `logits`' storage.
    ///
    /// # Errors
    /// As [`cpu_row_stats`].
    pub fn cpu_logits_grad(
        logits: &Tensor,
        labels: &Tensor,
        factors: &Tensor,
        options: &KernelOptions,
        in_place: bool,
    ) -> Result<Tensor> {
        logits_grad(logits, labels, factors, &cpu_config(logits, options, in_place)?)
    }

    /// The fused CPU engine's settings for `options`, whose class weights must fit
    /// `logits` as they must for a launch.
    fn cpu_config(logits: &Tensor, options: &KernelOptions, inplace_grad: bool) -> Result<OpConfig> {
        options.weighted(logits.dim(candle::D::Minus1)?, logits.dtype(), true)?;
        Ok(OpConfig {
            engine: Engine::Fused,
            ignore_index: options.ignore_index,
            chunk_len: 32,
            inplace_grad,
            terms: RowTerms { softcap: options.softcap, logit_sum: options.logit_sum },
            sum_weights: options.sum_weights.clone(),
            labels_checked: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_cover_cpu_always_cuda_with_the_feature_metal_never() {
        assert!(kernels_cover(DeviceLocation::Cpu));
        for gpu_id in [0, 3] {
            assert_eq!(kernels_cover(DeviceLocation::Cuda { gpu_id }), cfg!(feature = "cuda"));
            assert!(!kernels_cover(DeviceLocation::Metal { gpu_id }));
        }
    }

    #[test]
    fn uncovered_devices_get_the_autograd_engine_whatever_compile_says() {
        assert_eq!(Engine::select(true, true), Engine::Fused);
        assert_eq!(Engine::select(true, false), Engine::Primitive);
        assert_eq!(Engine::select(false, true), Engine::Autograd);
        assert_eq!(Engine::select(false, false), Engine::Autograd);
    }
}
