//! Where the training steps' time goes, phase by phase: the model's forward,
//! the loss, the backward, clipping and the optimizer.
//!
//! On CUDA each phase boundary records an event on candle's stream, and the
//! times between events are read once they have passed: timing adds no
//! synchronisation, so the host keeps queueing work ahead of the GPU as it
//! does untimed, and the phases are the GPU's own timeline (idle gaps where it
//! waited for the host included). Elsewhere each boundary synchronises the
//! device (a no-op on the CPU, which runs each op to completion) and reads the
//! host's clock.

use crate::gpt2::Phase;
use candle::{bail, Device, Result};
use std::time::{Duration, Instant};

/// A phase boundary on the device's timeline.
enum Mark {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Cuda(candle::cuda_backend::cudarc::driver::CudaEvent),
}

impl Mark {
    fn now(device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            use candle::cuda_backend::cudarc::driver::sys::CUevent_flags;
            use candle::cuda_backend::WrapErr;
            return Ok(Self::Cuda(cuda.cuda_stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).w()?));
        }
        device.synchronize()?;
        Ok(Self::Host(Instant::now()))
    }

    /// Whether the device has passed this mark (the time up to it can be read).
    fn passed(&self) -> Result<bool> {
        match self {
            Self::Host(_) => Ok(true),
            #[cfg(feature = "cuda")]
            Self::Cuda(event) => {
                use candle::cuda_backend::WrapErr;
                event.try_is_complete().w()
            }
        }
    }

    /// The time from `self` to `later`.
    fn until(&self, later: &Self) -> Result<Duration> {
        match (self, later) {
            (Self::Host(a), Self::Host(b)) => Ok(b.saturating_duration_since(*a)),
            #[cfg(feature = "cuda")]
            (Self::Cuda(a), Self::Cuda(b)) => {
                use candle::cuda_backend::WrapErr;
                Ok(Duration::from_secs_f64(f64::from(a.elapsed_ms(b).w()?.max(0.0)) / 1e3))
            }
            #[cfg(feature = "cuda")]
            _ => bail!("step split: a host mark and a CUDA event cannot be compared"),
        }
    }
}

/// What ended at a mark.
#[derive(Clone, Copy)]
enum Ended {
    /// Nothing: the step starts (its batches are made).
    Start,
    Phase(Phase),
    /// Clipping and the optimizer's step.
    Optimizer,
}

/// The phases' times summed over the steps, and each step's own time.
#[derive(Default)]
pub struct Split {
    forward: Duration,
    loss: Duration,
    backward: Duration,
    optimizer: Duration,
    /// Each step's four phases together, in order.
    steps: Vec<Duration>,
    /// The marks of the steps not yet read (the device may not have passed them).
    pending: Vec<Vec<(Ended, Mark)>>,
}

impl Split {
    /// A step starts (its batches are made); the steps before it whose marks the
    /// device has passed are read.
    pub fn start(&mut self, device: &Device) -> Result<()> {
        self.read_passed()?;
        self.pending.push(vec![(Ended::Start, Mark::now(device)?)]);
        Ok(())
    }

    /// A phase of the model and the loss ends.
    pub fn lap(&mut self, device: &Device, phase: Phase) -> Result<()> {
        self.mark(device, Ended::Phase(phase))
    }

    /// The clipping and the optimizer's step end.
    pub fn optimizer(&mut self, device: &Device) -> Result<()> {
        self.mark(device, Ended::Optimizer)
    }

    fn mark(&mut self, device: &Device, ended: Ended) -> Result<()> {
        let Some(step) = self.pending.last_mut() else { bail!("step split: a phase ended before any step started") };
        step.push((ended, Mark::now(device)?));
        Ok(())
    }

    /// Reads the pending steps, in order, while the device has passed their last mark.
    fn read_passed(&mut self) -> Result<()> {
        while let Some(step) = self.pending.first() {
            match step.last() {
                Some((_, last)) if last.passed()? => {}
                _ => break,
            }
            let step = self.pending.remove(0);
            for pair in step.windows(2) {
                let ((_, from), (ended, to)) = (&pair[0], &pair[1]);
                let time = from.until(to)?;
                *match ended {
                    Ended::Phase(Phase::Forward) => &mut self.forward,
                    Ended::Phase(Phase::Loss) => &mut self.loss,
                    Ended::Phase(Phase::Backward) => &mut self.backward,
                    Ended::Optimizer => &mut self.optimizer,
                    Ended::Start => bail!("step split: a step started inside another"),
                } += time;
            }
            if let (Some((_, first)), Some((_, last))) = (step.first(), step.last()) {
                self.steps.push(first.until(last)?);
            }
        }
        Ok(())
    }

    /// One line: the mean milliseconds of each phase per step, and the
    /// training steps' own tokens/s after the first step (which warms up;
    /// validation and batch making left out), `tokens` a step. Waits for the
    /// device to pass every mark.
    pub fn summary(&mut self, device: &Device, keep_activations: bool, tokens: usize) -> Result<String> {
        let ([forward, loss, backward_time, optimizer], steps) = self.totals(device)?;
        let per_step = |d: Duration| d.as_secs_f64() * 1e3 / steps.max(1) as f64;
        let backward = if keep_activations { "backward" } else { "backward (recomputing each block)" };
        let later: Duration = self.steps.iter().skip(1).sum();
        let steady = match steps {
            0 | 1 => "-".to_string(),
            n => format!("{:.0}", (tokens * (n - 1)) as f64 / later.as_secs_f64()),
        };
        Ok(format!(
            "step split (mean ms per step): forward {:.1}, loss {:.1}, {backward} {:.1}, optimizer {:.1}; training steps after the first: {steady} tokens/s",
            per_step(forward),
            per_step(loss),
            per_step(backward_time),
            per_step(optimizer)
        ))
    }

    /// The phases' times summed over the steps (forward, loss, backward,
    /// optimizer) and the number of steps, once the device has passed every
    /// mark (it is waited for).
    pub fn totals(&mut self, device: &Device) -> Result<([Duration; 4], usize)> {
        device.synchronize()?;
        self.read_passed()?;
        if !self.pending.is_empty() {
            bail!("step split: {} steps' marks not passed after a synchronisation", self.pending.len())
        }
        Ok(([self.forward, self.loss, self.backward, self.optimizer], self.steps.len()))
    }
}
