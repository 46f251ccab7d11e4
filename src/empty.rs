//! A loss call without tokens (`N = 0`: an empty batch, or `[B, 0]` labels).
//! Every output is zeros, and the loss still depends on the inputs, whose
//! gradients are zeros of their shapes, as a call with tokens would give.
//! Nothing is computed: no candle op runs on the empty inputs, since candle's
//! CUDA kernels are launched with an empty grid there, which the driver
//! refuses (`CUDA_ERROR_INVALID_VALUE`); the zeros are allocated and filled
//! (a memset, no kernel).

use candle::backend::BackendDevice;
use candle::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// The differentiable inputs of a call without tokens, and the dtype of its
/// outputs.
pub(crate) struct EmptyCall {
    inputs: Vec<Tensor>,
    dtype: DType,
}

impl EmptyCall {
    /// A call over one to three differentiable `inputs` whose outputs are of
    /// `dtype`.
    pub(crate) fn new(inputs: &[&Tensor], dtype: DType) -> Self {
        Self { inputs: inputs.iter().map(|t| (*t).clone()).collect(), dtype }
    }

    /// Zeros of `shape`, differentiable: their backward gives each input
    /// zeros of its shape.
    pub(crate) fn node(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let op = ZeroNode { shape: shape.into(), dtype: self.dtype };
        match self.inputs.as_slice() {
            [a] => a.apply_op1(op),
            [a, b] => a.apply_op2(b, op),
            [a, b, c] => a.apply_op3(b, c, op),
            inputs => bail!("chunked cross-entropy: a loss has one to three inputs, got {}", inputs.len()),
        }
    }

    /// Zeros of `shape` that no gradient reaches (the outputs that are
    /// not differentiable).
    pub(crate) fn zeros(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        Tensor::zeros(shape.into(), self.dtype, self.inputs[0].device())
    }
}

/// The graph node of [`EmptyCall::node`]: zeros of `shape` and `dtype`
/// forward, zeros like each input backward.
struct ZeroNode {
    shape: Shape,
    dtype: DType,
}

impl ZeroNode {
    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        Ok((candle::cpu_backend::CpuDevice.zeros_impl(&self.shape, self.dtype)?, self.shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, input: &candle::CudaStorage) -> Result<(candle::CudaStorage, Shape)> {
        use candle::backend::BackendStorage;
        Ok((input.device().zeros_impl(&self.shape, self.dtype)?, self.shape.clone()))
    }
}

/// An input's gradient: zeros of its shape.
fn zeros_like(input: &Tensor) -> Result<Option<Tensor>> {
    Ok(Some(input.zeros_like()?))
}

impl CustomOp1 for ZeroNode {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-no-tokens"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, a: &candle::CudaStorage, _: &Layout) -> Result<(candle::CudaStorage, Shape)> {
        self.cuda(a)
    }
    fn bwd(&self, a: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        zeros_like(a)
    }
}

impl CustomOp2 for ZeroNode {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-no-tokens"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.cuda(a)
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((zeros_like(a)?, zeros_like(b)?))
    }
}

impl CustomOp3 for ZeroNode {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy-no-tokens"
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
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
        _: &candle::CudaStorage,
        _: &Layout,
    ) -> Result<(candle::CudaStorage, Shape)> {
        self.cuda(a)
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((zeros_like(a)?, zeros_like(b)?, zeros_like(c)?))
    }
}
