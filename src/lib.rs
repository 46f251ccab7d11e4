//! Chunked, fused cross-entropy for [candle](https://github.com/huggingface/candle),
//! with a hand-written backward: the loss that language-model training needs,
//! exact to PyTorch's `F.cross_entropy`, without the `[N, V]` f32 temporaries of
//! `candle_nn::loss::cross_entropy`.
//!
//! ```
//! use candle::{Device, Tensor, Var};
//! use candle_chunked_ce::{ChunkedCrossEntropy, Reduction};
//!
//! # fn main() -> candle::Result<()> {
//! let device = Device::Cpu;
//! // Four tokens over a vocabulary of 5; the third token is padding.
//! let logits = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 5), &device)?)?;
//! let labels = Tensor::new(&[1i64, 4, -100, 0], &device)?;
//!
//! let loss = ChunkedCrossEntropy::default().forward(&logits, &labels, None)?;
//! let grads = loss.backward()?;
//! let grad = grads.get(&logits).expect("the logits get a gradient");
//! assert_eq!(grad.dims(), &[4, 5]);
//! // The padding row contributes no gradient.
//! assert_eq!(grad.get(2)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
//!
//! // Per-token losses, with a mask instead of ignore_index.
//! let mask = Tensor::new(&[1u8, 1, 0, 1], &device)?;
//! let labels = Tensor::new(&[1u32, 4, 2, 0], &device)?;
//! let per_token = ChunkedCrossEntropy::default()
//!     .reduction(Reduction::None)
//!     .forward(&logits, &labels, Some(&mask))?;
//! assert_eq!(per_token.dims(), &[4]);
//!
//! // Label smoothing, z-loss and a soft-cap, with every output of the pass.
//! let out = ChunkedCrossEntropy::default()
//!     .label_smoothing(0.1)
//!     .z_loss(1e-4)
//!     .logit_softcap(Some(30.0))
//!     .forward_with_outputs(&logits, &labels, Some(&mask), None, None)?;
//! let accuracy = out.token_accuracy.to_scalar::<f32>()?;
//! assert!((0.0..=1.0).contains(&accuracy));
//! assert_eq!(out.lse.dims(), &[4]);
//! # Ok(())
//! # }
//! ```
//!
//! - [`ChunkedCrossEntropy`]: the configurable loss (chunk length, fused or
//!   primitive kernels, `ignore_index`, [`Reduction`], in-place gradient,
//!   gradient formed in the forward pass, label smoothing, z-loss, logit
//!   soft-cap), with `num_label_tokens` for
//!   gradient accumulation, and [`CrossEntropyOutput`] for the per-token losses,
//!   log-sum-exp and token accuracy.
//! - [`LinearCrossEntropy`]: the loss of `hidden @ weight^T (+ bias)` without
//!   ever materialising the `[N, V]` logits; for training loops that drive
//!   their own backward, its gradients directly
//!   ([`LinearCrossEntropy::loss_and_grads`], [`LinearGrads`]; across
//!   micro-batches [`LinearCrossEntropy::accumulate_grads`] into a
//!   [`LinearGradAccumulator`]).
//! - [`retain_freed_memory`]: on CUDA, keeps what candle frees in the device's
//!   memory pool, so that each step's buffers are not mapped afresh;
//!   [`available_memory`] counts that kept memory as available.
//! - [`compute_cross_entropy`]: the sum of per-row losses (NeMo's function).
//! - [`reference::cross_entropy_slow`]: the same loss from candle primitives and
//!   autograd, the reference the tests hold the fast path against.
//!
//! Features: `gemm-avx512` (default) gives the `gemm` crate, and so candle's CPU
//! matmul and [`LinearCrossEntropy`]'s products, its AVX-512 kernels, chosen at
//! run time; `cuda` builds candle with CUDA and our CUDA kernels; `testing`
//! exposes the tests' and benchmarks' hooks (not an API: the tests enable it).

#![warn(missing_docs)]

mod call;
mod candle_limits;
mod config;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_gemm;
mod empty;
mod gemm;
#[cfg(feature = "testing")]
pub mod kernel_abi;
#[cfg(not(feature = "testing"))]
#[allow(dead_code, unused_imports)] // what only the tests read (the entry list, the label dtypes, the block limits)
mod kernel_abi;
mod labels;
mod linear;
mod loss;
mod memory;
mod op;
mod precomputed;
mod primitive;
pub mod reference;

pub use call::{CrossEntropyOutput, Reduction};
pub use cpu::instruction_set;
#[cfg(feature = "testing")]
pub use linear::{linear_products, recomputed_backwards, LinearProducts};
pub use linear::{LinearCrossEntropy, LinearGradAccumulator, LinearGrads, MicroBatchGrads};
pub use loss::{compute_cross_entropy, ChunkedCrossEntropy};
pub use memory::{available_memory, retain_freed_memory};
#[cfg(feature = "testing")]
pub use op::{cpu_logits_grad, cpu_row_stats};
