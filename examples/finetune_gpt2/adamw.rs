//! AdamW as candle-nn's `AdamW` computes it, bit for bit, with the moments
//! and the parameters updated in place. candle-nn's allocates a dozen
//! parameter-sized temporaries per parameter, each holding the graph of the
//! ones before it, so that all of them are alive until that parameter is
//! updated: 2 GB at once for GPT-2's `[50257, 768]` token embedding. For
//! contiguous f32 parameters this one streams over each parameter three
//! times and allocates nothing: on the CPU in Rust, on rayon's threads (a
//! step over GPT-2 124M's parameters took 199-206 ms on one thread, 127-132
//! on two, BENCHMARKS.md), on CUDA (feature `cuda`) by the three kernels of
//! `adamw.cu`, one launch each instead of a dozen
//! candle operations. Elsewhere (or for a dtype other than f32) it runs
//! candle-nn's tensor operations, detached, so that each temporary is freed
//! once used.

use crate::storage::{cpu_slice, cpu_slice_mut};
use candle::backprop::GradStore;
#[cfg(feature = "cuda")]
use candle::CudaStorage;
use candle::{CpuStorage, DType, InplaceOp3, Layout, Result, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use rayon::prelude::*;

/// A parameter and its first and second moments.
struct Slot {
    theta: Var,
    m: Var,
    v: Var,
}

/// AdamW (decoupled weight decay, bias-corrected moments), as `candle_nn::AdamW`.
pub struct AdamW {
    slots: Vec<Slot>,
    params: ParamsAdamW,
    step_t: usize,
}

/// One step's coefficients, in f64 as candle-nn computes them; each is
/// rounded to f32 where it is applied, as candle's `affine` rounds them.
#[derive(Clone, Copy)]
struct Coefficients {
    beta1: f64,
    beta2: f64,
    scale_m: f64,
    scale_v: f64,
    decay: f64,
    lr: f64,
    eps: f64,
}

impl Optimizer for AdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let slots = vars
            .into_iter()
            .filter(|var| var.dtype().is_float())
            .map(|theta| {
                let m = Var::zeros(theta.shape(), theta.dtype(), theta.device())?;
                let v = Var::zeros(theta.shape(), theta.dtype(), theta.device())?;
                Ok(Slot { theta, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { slots, params, step_t: 0 })
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scaled(grads, None)
    }
}

impl AdamW {
    /// [`Optimizer::step`] on every gradient times `scale` (the clipping's
    /// factor): a float scalar on the parameters' device, read there, so that
    /// the host never waits for it. The same update, bit for bit, as a step on
    /// each gradient's `broadcast_mul` by `scale` rounded to the gradient's
    /// dtype, without a scaled copy of the gradients.
    ///
    /// # Errors
    /// A gradient whose shape is not its parameter's; a `scale` that is not
    /// one float value on the parameters' device (refused before anything
    /// moves).
    pub fn step_scaled(&mut self, grads: &GradStore, scale: Option<&Tensor>) -> Result<()> {
        let scale = match scale {
            None => None,
            Some(scale) => {
                if !scale.dtype().is_float() || scale.elem_count() != 1 {
                    candle::bail!(
                        "AdamW: the gradients' scale must be one float value, got {:?} {:?}",
                        scale.shape(),
                        scale.dtype()
                    )
                }
                if let Some(slot) = self.slots.first() {
                    if !scale.device().same_device(slot.theta.device()) {
                        candle::bail!(
                            "AdamW: the gradients' scale is on {:?}, the parameters on {:?}",
                            scale.device().location(),
                            slot.theta.device().location()
                        )
                    }
                }
                // A scalar, so that it broadcasts over any gradient.
                Some(scale.flatten_all()?.squeeze(0)?)
            }
        };
        self.step_t += 1;
        let p = &self.params;
        let k = Coefficients {
            beta1: p.beta1,
            beta2: p.beta2,
            scale_m: 1f64 / (1f64 - p.beta1.powi(self.step_t as i32)),
            scale_v: 1f64 / (1f64 - p.beta2.powi(self.step_t as i32)),
            decay: 1f64 - p.lr * p.weight_decay,
            lr: p.lr,
            eps: p.eps,
        };
        let Some(device) = self.slots.first().map(|slot| slot.theta.device().clone()) else { return Ok(()) };
        // The in-place passes read the scale as one f32 value, 1 (exact) where none is given.
        let scale_f32 = match &scale {
            Some(scale) => scale.to_dtype(DType::F32)?.flatten_all()?,
            None => Tensor::ones(1, DType::F32, &device)?,
        };
        for slot in &self.slots {
            if let Some(g) = grads.get(slot.theta.as_tensor()) {
                if g.shape() != slot.theta.shape() {
                    candle::bail!(
                        "AdamW: a gradient of shape {:?} for a parameter of {:?}",
                        g.shape(),
                        slot.theta.shape()
                    )
                }
                let in_place = [slot.theta.as_tensor(), slot.m.as_tensor(), slot.v.as_tensor(), g].iter().all(|t| {
                    (t.device().is_cpu() || cfg!(feature = "cuda") && t.device().is_cuda())
                        && t.dtype() == DType::F32
                        && t.is_contiguous()
                });
                if in_place {
                    slot.m.inplace_op3(g, &scale_f32, &Moment::first(k))?;
                    slot.v.inplace_op3(g, &scale_f32, &Moment::second(k))?;
                    slot.theta.inplace_op3(slot.m.as_tensor(), slot.v.as_tensor(), &Update(k))?;
                } else {
                    match &scale {
                        Some(scale) => tensor_step(slot, &g.broadcast_mul(&scale.to_dtype(g.dtype())?)?, k)?,
                        None => tensor_step(slot, g, k)?,
                    }
                }
            }
        }
        Ok(())
    }
}

/// candle-nn's operations, in its order, on detached tensors.
fn tensor_step(slot: &Slot, g: &Tensor, k: Coefficients) -> Result<()> {
    let (theta, m, v, g) =
        (slot.theta.as_tensor().detach(), slot.m.as_tensor().detach(), slot.v.as_tensor().detach(), g.detach());
    let next_m = ((&m * k.beta1)? + (&g * (1.0 - k.beta1))?)?;
    let next_v = ((&v * k.beta2)? + (g.sqr()? * (1.0 - k.beta2))?)?;
    slot.m.set(&next_m)?;
    slot.v.set(&next_v)?;
    drop((next_m, next_v, g));
    let adjusted = ((&m * k.scale_m)? / ((&v * k.scale_v)?.sqrt()? + k.eps)?)?;
    let next_theta = ((&theta * k.decay)? - (adjusted * k.lr)?)?;
    slot.theta.set(&next_theta)
}

/// candle's `affine(x, mul, add)` on the CPU: `x * mul + add`, with `mul`
/// and `add` rounded to f32.
fn affine(x: f32, mul: f64, add: f64) -> f32 {
    x * mul as f32 + add as f32
}

/// The errors' name for the in-place update's slices.
const OP: &str = "AdamW's in-place update";

/// Elements per rayon task of the CPU passes (64 KiB of f32 a slice): GPT-2's
/// token embedding splits into some 2400 tasks, a bias is one.
const TASK: usize = 1 << 14;

/// `f(&mut x[i], a[i], b[i])` for every `i`, on rayon's threads (`b` empty
/// for a pass that reads one input). The slices are of one length: the step
/// checks the gradient's shape against the parameter's, whose moments share it.
fn par_each(x: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(&mut f32, f32, f32) + Sync) {
    x.par_chunks_mut(TASK).enumerate().for_each(|(task, x)| {
        let range = task * TASK..task * TASK + x.len();
        let a = &a[range.clone()];
        match b {
            [] => x.iter_mut().zip(a).for_each(|(x, &a)| f(x, a, 0.0)),
            b => x.iter_mut().zip(a).zip(&b[range]).for_each(|((x, &a), &b)| f(x, a, b)),
        }
    });
}

/// A moment's pass, `x = x β + f(g s) (1 - β)`, `s` the gradients' scale
/// (one f32 value): the first moment `m` (`β1`, `f(g) = g`) or the second `v`
/// (`β2`, `f(g) = g²`).
struct Moment {
    second: bool,
    beta: f64,
}

impl Moment {
    fn first(k: Coefficients) -> Self {
        Self { second: false, beta: k.beta1 }
    }

    fn second(k: Coefficients) -> Self {
        Self { second: true, beta: k.beta2 }
    }
}

impl InplaceOp3 for Moment {
    fn name(&self) -> &'static str {
        if self.second {
            "adamw-second-moment"
        } else {
            "adamw-first-moment"
        }
    }

    fn cpu_fwd(
        &self,
        x: &mut CpuStorage,
        x_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
        scale: &CpuStorage,
        scale_layout: &Layout,
    ) -> Result<()> {
        let (beta, second, s) = (self.beta, self.second, cpu_scale(scale, scale_layout)?);
        par_each(cpu_slice_mut(x, x_layout, OP)?, cpu_slice(g, g_layout, OP)?, &[], |x, g, _| {
            let scaled = g * s;
            let f = if second { scaled * scaled } else { scaled };
            *x = affine(*x, beta, 0.0) + affine(f, 1.0 - beta, 0.0);
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &mut CudaStorage,
        x_layout: &Layout,
        g: &CudaStorage,
        g_layout: &Layout,
        scale: &CudaStorage,
        scale_layout: &Layout,
    ) -> Result<()> {
        let entry = if self.second { "adamw_second_moment" } else { "adamw_first_moment" };
        cuda::moment(entry, (x, x_layout), (g, g_layout), (scale, scale_layout), self.beta, 1.0 - self.beta)
    }
}

/// The one value of the gradients' scale.
fn cpu_scale(scale: &CpuStorage, layout: &Layout) -> Result<f32> {
    match cpu_slice(scale, layout, OP)? {
        [s] => Ok(*s),
        other => candle::bail!("AdamW: the gradients' scale must be one value, got {}", other.len()),
    }
}

/// `θ = θ (1 - lr λ) - lr m̂ / (sqrt(v̂) + ε)`, from the updated moments.
struct Update(Coefficients);

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        theta_layout: &Layout,
        m: &CpuStorage,
        m_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<()> {
        let k = self.0;
        let (m, v) = (cpu_slice(m, m_layout, OP)?, cpu_slice(v, v_layout, OP)?);
        par_each(cpu_slice_mut(theta, theta_layout, OP)?, m, v, |theta, m, v| {
            let adjusted = affine(m, k.scale_m, 0.0) / affine(affine(v, k.scale_v, 0.0).sqrt(), 1.0, k.eps);
            *theta = affine(*theta, k.decay, 0.0) - affine(adjusted, k.lr, 0.0);
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        theta: &mut CudaStorage,
        theta_layout: &Layout,
        m: &CudaStorage,
        m_layout: &Layout,
        v: &CudaStorage,
        v_layout: &Layout,
    ) -> Result<()> {
        cuda::update((theta, theta_layout), (m, m_layout), (v, v_layout), self.0)
    }
}

/// The launchers of `adamw.cu`'s kernels (compiled by the crate's build.rs
/// into `finetune_adamw.ptx`): each takes contiguous f32 ranges of one
/// length, and the coefficients rounded to f32 as candle's `affine` rounds
/// them.
#[cfg(feature = "cuda")]
mod cuda {
    use super::{Coefficients, OP};
    use crate::storage::cuda::{elementwise, view, view_mut};
    use candle::backend::BackendStorage;
    use candle::cuda_backend::cudarc::driver::PushKernelArg;
    use candle::cuda_backend::WrapErr;
    use candle::{CudaStorage, Layout, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/finetune_adamw.ptx"));
    /// candle caches modules by name per device.
    const MODULE: &str = "finetune_gpt2-adamw";

    fn same_length(n: usize, others: &[usize]) -> Result<()> {
        if others.iter().any(|&len| len != n) {
            candle::bail!("AdamW (cuda): the parameter, moments and gradient differ in length")
        }
        Ok(())
    }

    /// `x = affine(x, decay, 0) + affine(f(g s), rate, 0)` by `entry`
    /// (`adamw_first_moment`: f(g) = g; `adamw_second_moment`: g²), `s` the
    /// one value of `scale`.
    pub(super) fn moment(
        entry: &str,
        (x, x_layout): (&mut CudaStorage, &Layout),
        (g, g_layout): (&CudaStorage, &Layout),
        (scale, scale_layout): (&CudaStorage, &Layout),
        decay: f64,
        rate: f64,
    ) -> Result<()> {
        let dev = x.device().clone();
        let (mut x, g, scale) = (view_mut(x, x_layout, OP)?, view(g, g_layout, OP)?, view(scale, scale_layout, OP)?);
        let n = x.len();
        same_length(n, &[g.len()])?;
        if scale.len() != 1 {
            candle::bail!("AdamW (cuda): the gradients' scale must be one value, got {}", scale.len())
        }
        if n == 0 {
            return Ok(());
        }
        let func = dev.get_or_load_custom_func(entry, MODULE, PTX)?;
        let (len, decay, rate) = (n as i64, decay as f32, rate as f32);
        let mut builder = func.builder();
        builder.arg(&mut x).arg(&g).arg(&scale).arg(&len).arg(&decay).arg(&rate);
        // SAFETY: the entry takes (float* x, const float* g, const float* scale,
        // int64_t n, float, float); `x` and `g` are views of exactly n f32 and
        // `scale` of one on this device (checked above), kept alive and ordered
        // on the stream by their guards until after the launch.
        unsafe { builder.launch(elementwise(n)) }.w()?;
        Ok(())
    }

    /// `θ = affine(θ, decay, 0) - affine(adjusted, lr, 0)` from the updated moments.
    pub(super) fn update(
        (theta, theta_layout): (&mut CudaStorage, &Layout),
        (m, m_layout): (&CudaStorage, &Layout),
        (v, v_layout): (&CudaStorage, &Layout),
        k: Coefficients,
    ) -> Result<()> {
        let dev = theta.device().clone();
        let (mut theta, m, v) = (view_mut(theta, theta_layout, OP)?, view(m, m_layout, OP)?, view(v, v_layout, OP)?);
        let n = theta.len();
        same_length(n, &[m.len(), v.len()])?;
        if n == 0 {
            return Ok(());
        }
        let func = dev.get_or_load_custom_func("adamw_update", MODULE, PTX)?;
        let len = n as i64;
        let [scale_m, scale_v, eps, decay, lr] = [k.scale_m, k.scale_v, k.eps, k.decay, k.lr].map(|c| c as f32);
        let mut builder = func.builder();
        builder.arg(&mut theta).arg(&m).arg(&v).arg(&len);
        builder.arg(&scale_m).arg(&scale_v).arg(&eps).arg(&decay).arg(&lr);
        // SAFETY: the entry takes (float* theta, const float* m, const float* v,
        // int64_t n, five floats), in this order; the three views hold exactly n f32
        // on this device (checked above) and their guards outlive the launch.
        unsafe { builder.launch(elementwise(n)) }.w()?;
        Ok(())
    }
}
