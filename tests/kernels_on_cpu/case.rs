//! One case: forward and both backwards, against the CPU engine.

use crate::common::{self, Rng};
use crate::launch::{acc, run, storage_bytes, sum_weights_buffer, Buffer, CpuKernels, Operands};
use crate::tolerance::{assert_within, Tolerance};
use candle::{DType, Device, Result, Tensor};
use candle_chunked_ce::kernel_abi::{
    self, KernelArg, KernelLaunch, KernelOptions, LaunchShape, Operand, RowGeometry, UnitFactors,
};

/// Logits as a view of a contiguous `base` (what the kernels see: the whole
/// storage, a start offset and strides), with labels and options.
pub(crate) struct Case {
    pub(crate) name: String,
    pub(crate) base: Tensor,
    pub(crate) view: fn(&Tensor) -> Result<Tensor>,
    pub(crate) labels: Vec<i64>,
    pub(crate) options: KernelOptions,
    /// `None`: the launcher's shape for the vocabulary.
    pub(crate) shape: Option<LaunchShape>,
}

pub(crate) fn same_view(t: &Tensor) -> Result<Tensor> {
    Ok(t.clone())
}

impl Case {
    pub(crate) fn new(name: impl Into<String>, base: Tensor, labels: Vec<i64>) -> Self {
        let options = KernelOptions { ignore_index: -100, softcap: None, logit_sum: false, sum_weights: None };
        Self { name: name.into(), base, view: same_view, labels, options, shape: None }
    }

    /// Random logits shaped `dims` (uniform in [-8, 8)) and `rows` labels in
    /// `[0, label_vocab)`, every fifth row ignored.
    pub(crate) fn random(
        name: impl Into<String>,
        seed: u64,
        dims: &[usize],
        dtype: DType,
        rows: usize,
        label_vocab: usize,
    ) -> Result<Self> {
        let mut rng = Rng::new(seed ^ 0x5eed);
        let labels = (0..rows).map(|r| if r % 5 == 3 { -100 } else { rng.below(label_vocab) as i64 }).collect();
        Ok(Self::new(name, random_logits(seed, dims, dtype)?, labels))
    }

    pub(crate) fn check(&self, kernels: &CpuKernels) -> Result<()> {
        let name = &self.name;
        let logits = (self.view)(&self.base)?;
        let (dtype, vocab) = (logits.dtype(), logits.dim(candle::D::Minus1)?);
        let geometry = RowGeometry::new(logits.layout())?;
        let shape = self.shape.unwrap_or_else(|| LaunchShape::for_vocab(dtype, vocab));
        let rows = self.labels.len();
        assert_eq!(geometry.rows, rows, "{name}: one label per row");
        let labels = Tensor::new(self.labels.as_slice(), &Device::Cpu)?;
        let acc = acc(dtype);
        let run_forward = |launch: &KernelLaunch| -> Result<Forward> {
            Forward::run(kernels, launch, &self.base, &labels, vocab, &self.options, acc)
        };
        // A scalar loss's factors for the forward that writes the gradient: every term,
        // z-loss included.
        let unit = UnitFactors { ce: 0.75, lse: 0.125, lse_squared: 0.01, logit_sum: -0.25 / vocab as f64 };

        // Forward, and (without class weights, which it does not take) the forward with gradient.
        let launched = |launch: Option<KernelLaunch>| launch.unwrap_or_else(|| panic!("{name}: no launch"));
        let forward = run_forward(&launched(kernel_abi::forward(&geometry, dtype, &self.options, shape)?))?;
        let with_grad = |in_place: bool| -> Result<Option<Forward>> {
            match self.options.sum_weights {
                None => Ok(Some(run_forward(&launched(kernel_abi::forward_with_grad(
                    &geometry,
                    dtype,
                    &self.options,
                    &unit,
                    in_place,
                    shape,
                )?))?)),
                Some(_) => Ok(None),
            }
        };
        let (with_grad, with_grad_out) = (with_grad(true)?, with_grad(false)?);
        let expected_bad_row =
            self.labels.iter().position(|&l| l != self.options.ignore_index && (l < 0 || l >= vocab as i64));
        let cpu = candle_chunked_ce::cpu_row_stats(&logits, &labels, &self.options);
        if let Some(row) = expected_bad_row {
            assert_eq!(forward.bad_row, Some(row), "{name}: first bad row");
            for with_grad in [&with_grad, &with_grad_out].into_iter().flatten() {
                assert_eq!(with_grad.bad_row, Some(row), "{name}: first bad row (forward with gradient)");
            }
            let message = cpu.expect_err("the CPU engine refuses a bad label").to_string();
            assert!(message.contains(&format!("at row {row}")), "{name}: {message}");
            return Ok(());
        }
        let cpu_stats = cpu?;
        let tolerance = Tolerance::new(&logits, &self.labels, &self.options, &cpu_stats)?;
        let runs = [Some(&forward), with_grad.as_ref(), with_grad_out.as_ref()];
        let names = ["forward", "forward with gradient", "forward with gradient out"];
        for (run, what) in runs.into_iter().zip(names).filter_map(|(r, w)| Some((r?, w))) {
            assert_eq!(run.bad_row, None, "{name}: no bad row ({what})");
            for (column, stat) in ["ce", "lse", "logit_sum", "correct"].iter().enumerate() {
                let (got, want) = (run.stats.narrow(1, column, 1)?, cpu_stats.narrow(1, column, 1)?);
                let bounds = tolerance.stat_bounds(stat, &want)?;
                assert_within(&format!("{name}: {stat} ({what})"), &got, &want, &bounds)?;
            }
        }
        let (lse, ce) = (cpu_stats.narrow(1, 1, 1)?, cpu_stats.narrow(1, 0, 1)?);

        let constant = |v: f64| Tensor::full(v, (rows, 1), &Device::Cpu)?.to_dtype(acc);
        let g_lse = lse.affine(unit.lse_squared, unit.lse)?;
        let unit_factors =
            Tensor::cat(&[constant(unit.ce)?, g_lse, constant(unit.logit_sum)?, lse.clone(), ce.clone()], 1)?;
        // The forward with gradient out wrote every element of its buffer, and left the logits' storage as it was.
        if let Some(with_grad_out) = &with_grad_out {
            let want = candle_chunked_ce::cpu_logits_grad(&logits, &labels, &unit_factors, &self.options, false)?;
            let bounds = tolerance.grad_bounds(&unit_factors, &want)?;
            let got = with_grad_out.grad(logits.dims(), dtype)?.expect("the forward with gradient out has a gradient");
            assert_within(&format!("{name}: gradient of the forward with gradient out"), &got, &want, &bounds)?;
            let untouched = vec![0.0; self.base.elem_count()];
            let what = format!("{name}: logits after the forward with gradient out");
            assert_within(&what, &with_grad_out.logits(&self.base)?, &self.base, &untouched)?;
        }

        // The forward with gradient rewrote the logits' storage, rows of the view only.
        if let Some(with_grad) = &with_grad {
            let cpu_rewritten = self.base.copy()?;
            let view = (self.view)(&cpu_rewritten)?;
            candle_chunked_ce::cpu_logits_grad(&view, &labels, &unit_factors, &self.options, true)?;
            let bounds = tolerance.grad_bounds(&unit_factors, &view)?;
            let bounds = self.storage_bounds(&bounds)?;
            let what = format!("{name}: storage after the forward with gradient");
            assert_within(&what, &with_grad.logits(&self.base)?, &cpu_rewritten, &bounds)?;
        }

        // Backward, from random upstream gradients and the CPU's lse and ce.
        let mut rng = Rng::new(rows as u64 * 31 + vocab as u64);
        let upstream = common::logits(&mut rng, &[rows, 3], 1.0, acc, &Device::Cpu)?;
        let factors = Tensor::cat(&[&upstream, &lse, &ce], 1)?.to_dtype(acc)?.contiguous()?;
        let want = candle_chunked_ce::cpu_logits_grad(&logits, &labels, &factors, &self.options, false)?;
        let bounds = tolerance.grad_bounds(&factors, &want)?;
        let mut logits_buffer = Buffer::from_bytes(&storage_bytes(&self.base)?);
        let mut labels_buffer = Buffer::from_bytes(&storage_bytes(&labels)?);
        let mut factors_buffer = Buffer::from_bytes(&storage_bytes(&factors)?);
        let mut weights_buffer = sum_weights_buffer(&self.options)?;
        // Out of place, into a sentinel-filled buffer.
        let launch = launched(kernel_abi::backward(&geometry, dtype, &self.options, false, shape)?);
        let sentinel = Tensor::full(777f32, 1, &Device::Cpu)?.to_dtype(dtype)?;
        let mut grad = Buffer::filled(rows * vocab, &storage_bytes(&sentinel)?);
        run(
            kernels,
            &launch,
            Operands {
                logits: Some(&mut logits_buffer),
                labels: Some(&mut labels_buffer),
                sum_weights: weights_buffer.as_mut(),
                factors: Some(&mut factors_buffer),
                grad: Some(&mut grad),
                ..Default::default()
            },
        );
        let len = rows * vocab * dtype.size_in_bytes();
        let got = Tensor::from_raw_buffer(grad.bytes(len), dtype, logits.dims(), &Device::Cpu)?;
        assert_within(&format!("{name}: grad"), &got, &want, &bounds)?;

        // In place, over the logits' own storage: the rows of the view change, nothing else does.
        let launch = launched(kernel_abi::backward(&geometry, dtype, &self.options, true, shape)?);
        run(
            kernels,
            &launch,
            Operands {
                logits: Some(&mut logits_buffer),
                labels: Some(&mut labels_buffer),
                sum_weights: weights_buffer.as_mut(),
                factors: Some(&mut factors_buffer),
                ..Default::default()
            },
        );
        let rewritten = storage_tensor(&logits_buffer, &self.base)?;
        assert_within(&format!("{name}: in-place grad"), &(self.view)(&rewritten)?, &want, &bounds)?;
        let cpu_in_place = self.base.copy()?;
        candle_chunked_ce::cpu_logits_grad(&(self.view)(&cpu_in_place)?, &labels, &factors, &self.options, true)?;
        let bounds = self.storage_bounds(&tolerance.grad_bounds(&factors, &(self.view)(&cpu_in_place)?)?)?;
        assert_within(&format!("{name}: in-place storage"), &rewritten, &cpu_in_place, &bounds)?;
        Ok(())
    }

    /// `view_bounds` (of the view's elements, in order) placed where those
    /// elements sit in the base's storage; 0 elsewhere: what the kernels
    /// must leave untouched, bit for bit.
    pub(crate) fn storage_bounds(&self, view_bounds: &[f64]) -> Result<Vec<f64>> {
        let len = self.base.elem_count();
        let index = Tensor::arange(0u32, len as u32, &Device::Cpu)?.reshape(self.base.dims())?;
        let mut bounds = vec![0.0; len];
        for (i, &bound) in (self.view)(&index)?.flatten_all()?.to_vec1::<u32>()?.iter().zip(view_bounds) {
            bounds[*i as usize] = bound;
        }
        Ok(bounds)
    }
}

/// What a forward launch leaves: the statistics, the first bad row it
/// flagged, the logits' storage (which the forward with gradient rewrites),
/// and the gradient buffer of a launch that has one.
pub(crate) struct Forward {
    pub(crate) stats: Tensor,
    pub(crate) bad_row: Option<usize>,
    pub(crate) logits: Buffer,
    pub(crate) grad: Option<Buffer>,
}

impl Forward {
    /// Runs a forward entry over a copy of `base`'s storage, with a
    /// sentinel-filled `[rows, vocab]` gradient buffer when the launch takes one.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        kernels: &CpuKernels,
        launch: &KernelLaunch,
        base: &Tensor,
        labels: &Tensor,
        vocab: usize,
        options: &KernelOptions,
        acc: DType,
    ) -> Result<Self> {
        let rows = labels.dim(0)?;
        let mut grad = match launch.args.contains(&KernelArg::Operand(Operand::Grad)) {
            true => Some(Buffer::filled(
                rows * vocab,
                &storage_bytes(&Tensor::full(777f32, 1, &Device::Cpu)?.to_dtype(base.dtype())?)?,
            )),
            false => None,
        };
        let mut logits = Buffer::from_bytes(&storage_bytes(base)?);
        let mut labels = Buffer::from_bytes(&storage_bytes(labels)?);
        let mut sum_weights = sum_weights_buffer(options)?;
        // Stats start as a sentinel, so that a row the kernel never writes shows.
        let sentinel = Tensor::full(12345f32, 1, &Device::Cpu)?.to_dtype(acc)?;
        let mut stats = Buffer::filled(4 * rows, &storage_bytes(&sentinel)?);
        let mut first_bad_row = Buffer::from_bytes(&u64::MAX.to_ne_bytes());
        let operands = Operands {
            logits: Some(&mut logits),
            labels: Some(&mut labels),
            sum_weights: sum_weights.as_mut(),
            stats: Some(&mut stats),
            first_bad_row: Some(&mut first_bad_row),
            grad: grad.as_mut(),
            ..Default::default()
        };
        run(kernels, launch, operands);
        let bad_row = u64::from_ne_bytes(first_bad_row.bytes(8).try_into().unwrap());
        let stats =
            Tensor::from_raw_buffer(stats.bytes(4 * rows * acc.size_in_bytes()), acc, &[rows, 4], &Device::Cpu)?;
        Ok(Self { stats, bad_row: (bad_row != u64::MAX).then_some(bad_row as usize), logits, grad })
    }

    /// The contiguous gradient of `dtype` shaped `dims` that the launch wrote,
    /// if it had a buffer for one.
    pub(crate) fn grad(&self, dims: &[usize], dtype: DType) -> Result<Option<Tensor>> {
        let Some(grad) = &self.grad else { return Ok(None) };
        let len = dims.iter().product::<usize>() * dtype.size_in_bytes();
        Ok(Some(Tensor::from_raw_buffer(grad.bytes(len), dtype, dims, &Device::Cpu)?))
    }

    /// The logits' storage after the launch, shaped like `base`.
    pub(crate) fn logits(&self, base: &Tensor) -> Result<Tensor> {
        storage_tensor(&self.logits, base)
    }
}

/// A buffer holding a copy of `base`'s storage, read back as a tensor like `base`.
pub(crate) fn storage_tensor(buffer: &Buffer, base: &Tensor) -> Result<Tensor> {
    let len = base.elem_count() * base.dtype().size_in_bytes();
    Tensor::from_raw_buffer(buffer.bytes(len), base.dtype(), base.dims(), &Device::Cpu)
}

/// `[dims..]` logits of `dtype`, uniform in `[-8, 8)`, from `seed`.
pub(crate) fn random_logits(seed: u64, dims: &[usize], dtype: DType) -> Result<Tensor> {
    common::logits(&mut Rng::new(seed), dims, 8.0, dtype, &Device::Cpu)
}
