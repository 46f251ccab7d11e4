//! AdamW as candle-nn's `AdamW` computes it, bit for bit, with the moments
//! and the parameters updated in place. candle-nn's allocates a dozen
//! parameter-sized temporaries per parameter, each holding the graph of the
//! ones before it, so that all of them are alive until that parameter is
//! updated: 2 GB at once for GPT-2's `[50257, 768]` token embedding. On the
//! CPU this one streams over each parameter three times and allocates
//! nothing; elsewhere (or for a dtype other than f32) it runs candle-nn's
//! tensor operations, detached, so that each temporary is freed once used.

use candle::backprop::GradStore;
use candle::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};

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
        for slot in &self.slots {
            if let Some(g) = grads.get(slot.theta.as_tensor()) {
                if g.shape() != slot.theta.shape() {
                    candle::bail!(
                        "AdamW: a gradient of shape {:?} for a parameter of {:?}",
                        g.shape(),
                        slot.theta.shape()
                    )
                }
                let in_place = [slot.theta.as_tensor(), slot.m.as_tensor(), slot.v.as_tensor(), g]
                    .iter()
                    .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous());
                if in_place {
                    slot.m.inplace_op2(g, &FirstMoment(k))?;
                    slot.v.inplace_op2(g, &SecondMoment(k))?;
                    slot.theta.inplace_op3(slot.m.as_tensor(), slot.v.as_tensor(), &Update(k))?;
                } else {
                    tensor_step(slot, g, k)?;
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

fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle::bail!("AdamW's in-place update takes contiguous f32 tensors"),
    }
}

fn slice_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => candle::bail!("AdamW's in-place update takes contiguous f32 tensors"),
    }
}

/// `m = m β1 + g (1 - β1)`.
struct FirstMoment(Coefficients);

impl InplaceOp2 for FirstMoment {
    fn name(&self) -> &'static str {
        "adamw-first-moment"
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, m_layout: &Layout, g: &CpuStorage, g_layout: &Layout) -> Result<()> {
        let k = self.0;
        for (m, &g) in slice_mut(m, m_layout)?.iter_mut().zip(slice(g, g_layout)?) {
            *m = affine(*m, k.beta1, 0.0) + affine(g, 1.0 - k.beta1, 0.0);
        }
        Ok(())
    }
}

/// `v = v β2 + g² (1 - β2)`.
struct SecondMoment(Coefficients);

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "adamw-second-moment"
    }

    fn cpu_fwd(&self, v: &mut CpuStorage, v_layout: &Layout, g: &CpuStorage, g_layout: &Layout) -> Result<()> {
        let k = self.0;
        for (v, &g) in slice_mut(v, v_layout)?.iter_mut().zip(slice(g, g_layout)?) {
            *v = affine(*v, k.beta2, 0.0) + affine(g * g, 1.0 - k.beta2, 0.0);
        }
        Ok(())
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
        let (m, v) = (slice(m, m_layout)?, slice(v, v_layout)?);
        for ((theta, &m), &v) in slice_mut(theta, theta_layout)?.iter_mut().zip(m).zip(v) {
            let adjusted = affine(m, k.scale_m, 0.0) / affine(affine(v, k.scale_v, 0.0).sqrt(), 1.0, k.eps);
            *theta = affine(*theta, k.decay, 0.0) - affine(adjusted, k.lr, 0.0);
        }
        Ok(())
    }
}
