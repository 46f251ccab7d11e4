//! The single graph node of a loss call, and the backward of the loss over
//! logits.

use super::logits_grad;
use crate::config::backward_factors;
use crate::config::OpConfig;
use crate::precomputed::PrecomputedGrad;
use candle::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};

/// What a loss node computes in backward from its inputs and `factors`,
/// `[N, 5] = (g_ce, g_lse, g_sum, lse, ce)` per row (see the maths in `op/mod.rs`).
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
