//! The CUDA kernels of `cuda/cross_entropy.cu`, compiled unchanged for the CPU
//! with HIP-CPU (`$HIP_CPU_DIR`, else `../shared/hip-cpu`), g++ and TBB
//! through the include shim in `tests/hip_cpu/`, launched with the argument
//! lists that `src/kernel_abi/` builds for the cudarc launcher, and held
//! against the crate's fused CPU engine.
//!
//! This finds logic bugs in the kernels (shuffle offsets, barriers, atomics,
//! indexing, the head/pack/tail split, argument order) without a GPU. It
//! cannot find races between blocks, PTX or register problems, or speed.
//! Without HIP-CPU, a C++ compiler or TBB each test prints one line saying why
//! it skips (`SKIP ...`, shown by `cargo test` beside the test's `ok`); with
//! `CHUNKED_CE_REQUIRE_HIP_CPU=1` (set by `.ci/run`) it fails instead.
//!
//! The kernels compile as 8 translation units in parallel (each compiles only
//! the entries it launches; see `tests/hip_cpu/library.rs`), once per change
//! of the kernels or the shim (the library is cached by a hash of them). As
//! one unit the compile had grown to 586 s (37 entries, 2026-12-05); as 8
//! it takes 120 s on 2 cores with the test (issue 22).
#![cfg(target_os = "linux")]

mod common;
#[path = "hip_cpu/library.rs"]
mod hip_library;

use candle::{DType, Device, Result, Tensor};
use candle_chunked_ce::kernel_abi::{
    self, KernelArg, KernelLaunch, KernelOptions, LabelGeometry, LaunchShape, MaskElements, Operand, RowGeometry,
    UnitFactors, ENTRIES,
};
use common::Rng;
use hip_library::{LaunchFn, NotBuilt};
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

// ---------------------------------------------------------------------------
// Building and loading the kernels.
// ---------------------------------------------------------------------------

struct CpuKernels {
    launch: LaunchFn,
    _library: libloading::Library,
}

/// The kernels, compiled once per test binary, or `None` after printing why
/// `test` is skipped.
/// A compile error in the kernels or the shim fails every test.
fn kernels(test: &str) -> Option<&'static CpuKernels> {
    static KERNELS: OnceLock<std::result::Result<CpuKernels, NotBuilt>> = OnceLock::new();
    match KERNELS.get_or_init(build) {
        Ok(kernels) => Some(kernels),
        Err(NotBuilt::ToolMissing(reason)) => {
            common::skip(test, reason, "CHUNKED_CE_REQUIRE_HIP_CPU");
            None
        }
        Err(NotBuilt::Failed(message)) => panic!("{message}"),
    }
}

/// Compiles the kernels (see `tests/hip_cpu/library.rs`) and loads them.
fn build() -> std::result::Result<CpuKernels, NotBuilt> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (library, launch) = hip_library::build(&hip_library::Kernels {
        name: "ce",
        // `static` entries: each unit compiles only those its launcher names.
        prologue: "#include \"launch.h\"\n#define CE_ENTRY static __global__\n#include \"cross_entropy.cu\"\n",
        // Every entry `kernel_abi` knows (a name missing from the `.cu` fails to compile).
        entries: &ENTRIES,
        parts: TRANSLATION_UNITS,
        include_dirs: &[manifest.join("cuda")],
        hashed: &[manifest.join("cuda/cross_entropy.cu")],
    })?;
    Ok(CpuKernels { launch, _library: library })
}

/// 8 units of 4 or 5 entries: 25-32 s of g++ each, about 2 minutes on 2 cores.
const TRANSLATION_UNITS: usize = 8;

// ---------------------------------------------------------------------------
// Host memory standing in for device memory, and one launch.
// ---------------------------------------------------------------------------

/// A 16-byte aligned byte buffer, as a device allocation is (at least).
struct Buffer(Vec<u128>);

impl Buffer {
    fn from_bytes(bytes: &[u8]) -> Self {
        let mut words = vec![0u128; bytes.len().div_ceil(16)];
        // SAFETY: `words` holds at least `bytes.len()` bytes; u128 has no invalid bit patterns.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast::<u8>(), bytes.len()) };
        Self(words)
    }

    fn filled(len: usize, pattern: &[u8]) -> Self {
        Self::from_bytes(&pattern.iter().copied().cycle().take(len * pattern.len()).collect::<Vec<_>>())
    }

    fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: the buffer holds `16 * self.0.len() >= len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), len) }
    }

    fn pointer(&mut self) -> *mut c_void {
        self.0.as_mut_ptr().cast()
    }
}

/// The buffers a launch binds to its operands (`None`: not bound).
#[derive(Default)]
struct Operands<'a> {
    logits: Option<&'a mut Buffer>,
    labels: Option<&'a mut Buffer>,
    caller_labels: Option<&'a mut Buffer>,
    mask: Option<&'a mut Buffer>,
    sum_weights: Option<&'a mut Buffer>,
    stats: Option<&'a mut Buffer>,
    first_bad_row: Option<&'a mut Buffer>,
    factors: Option<&'a mut Buffer>,
    grad: Option<&'a mut Buffer>,
}

/// Launches `launch` as cuLaunchKernel would: one pointer to each argument's value.
fn run(kernels: &CpuKernels, launch: &KernelLaunch, mut operands: Operands<'_>) {
    // HIP-CPU's runtime is not meant for launches from several host threads at once.
    static LAUNCHES: Mutex<()> = Mutex::new(());
    let mut values: Vec<[u8; 8]> = Vec::with_capacity(launch.args.len());
    let (mut kinds, mut sizes) = (Vec::new(), Vec::new());
    for arg in &launch.args {
        let (kind, bytes): (u8, Vec<u8>) = match *arg {
            KernelArg::Operand(op) => {
                let buffer = match op {
                    Operand::Logits => operands.logits.as_deref_mut(),
                    Operand::Labels => operands.labels.as_deref_mut(),
                    Operand::CallerLabels => operands.caller_labels.as_deref_mut(),
                    Operand::Mask => operands.mask.as_deref_mut(),
                    Operand::SumWeights => operands.sum_weights.as_deref_mut(),
                    Operand::Stats => operands.stats.as_deref_mut(),
                    Operand::FirstBadRow => operands.first_bad_row.as_deref_mut(),
                    Operand::Factors => operands.factors.as_deref_mut(),
                    Operand::Grad => operands.grad.as_deref_mut(),
                };
                let pointer = buffer.unwrap_or_else(|| panic!("{}: {op:?} is not bound", launch.entry)).pointer();
                (b'p', (pointer as usize).to_ne_bytes().to_vec())
            }
            KernelArg::Null => (b'p', 0usize.to_ne_bytes().to_vec()),
            KernelArg::I64(v) => (b'i', v.to_ne_bytes().to_vec()),
            KernelArg::I32(v) => (b'i', v.to_ne_bytes().to_vec()),
            KernelArg::F32(v) => (b'f', v.to_ne_bytes().to_vec()),
            KernelArg::F64(v) => (b'f', v.to_ne_bytes().to_vec()),
        };
        let mut slot = [0u8; 8];
        slot[..bytes.len()].copy_from_slice(&bytes);
        values.push(slot);
        kinds.push(kind as c_char);
        sizes.push(bytes.len());
    }
    let mut pointers: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
    let entry = CString::new(launch.entry).unwrap();
    let mut error = [0 as c_char; 512];
    let _guard = LAUNCHES.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: every pointer argument points into a live buffer sized for the launch
    // (the callers size them from the same geometry); `ce_launch` checks the count,
    // sizes and kinds of the arguments against the entry before it runs it.
    let status = unsafe {
        (kernels.launch)(
            entry.as_ptr(),
            launch.blocks,
            launch.threads,
            pointers.as_mut_ptr(),
            kinds.as_ptr(),
            sizes.as_ptr(),
            pointers.len() as i32,
            error.as_mut_ptr(),
            error.len(),
        )
    };
    // SAFETY: `ce_launch` writes a NUL-terminated message into `error` (zeroed before).
    let message = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy();
    assert_eq!(status, 0, "{}: {message}", launch.entry);
}

/// The bytes of a CPU tensor's whole storage (its layout says where its rows are).
fn storage_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let (storage, _) = tensor.storage_and_layout();
    let candle::Storage::Cpu(cpu) = &*storage else { candle::bail!("not on the CPU") };
    fn bytes_of<T>(values: &[T]) -> Vec<u8> {
        // SAFETY: plain numbers (f32, f64, bf16, f16, i64) viewed as their bytes.
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }.to_vec()
    }
    Ok(match tensor.dtype() {
        DType::F32 => bytes_of(cpu.as_slice::<f32>()?),
        DType::F64 => bytes_of(cpu.as_slice::<f64>()?),
        DType::BF16 => bytes_of(cpu.as_slice::<half::bf16>()?),
        DType::F16 => bytes_of(cpu.as_slice::<half::f16>()?),
        DType::I64 => bytes_of(cpu.as_slice::<i64>()?),
        DType::I32 => bytes_of(cpu.as_slice::<i32>()?),
        DType::I16 => bytes_of(cpu.as_slice::<i16>()?),
        DType::U32 => bytes_of(cpu.as_slice::<u32>()?),
        DType::U8 => bytes_of(cpu.as_slice::<u8>()?),
        other => candle::bail!("no storage bytes for {other:?}"),
    })
}

/// A buffer holding the class weights of `options` (a fresh `[V]` tensor: its
/// storage is its elements), if it has them.
fn sum_weights_buffer(options: &KernelOptions) -> Result<Option<Buffer>> {
    options.sum_weights.as_ref().map(|w| Ok(Buffer::from_bytes(&storage_bytes(w)?))).transpose()
}

/// The accumulator type of the kernels for `dtype`.
fn acc(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

// ---------------------------------------------------------------------------
// One case: forward and both backwards, against the CPU engine.
// ---------------------------------------------------------------------------

/// Logits as a view of a contiguous `base` (what the kernels see: the whole
/// storage, a start offset and strides), with labels and options.
struct Case {
    name: String,
    base: Tensor,
    view: fn(&Tensor) -> Result<Tensor>,
    labels: Vec<i64>,
    options: KernelOptions,
    /// `None`: the launcher's shape for the vocabulary.
    shape: Option<LaunchShape>,
}

fn same_view(t: &Tensor) -> Result<Tensor> {
    Ok(t.clone())
}

impl Case {
    fn new(name: impl Into<String>, base: Tensor, labels: Vec<i64>) -> Self {
        let options = KernelOptions { ignore_index: -100, softcap: None, logit_sum: false, sum_weights: None };
        Self { name: name.into(), base, view: same_view, labels, options, shape: None }
    }

    /// Random logits shaped `dims` (uniform in [-8, 8)) and `rows` labels in
    /// `[0, label_vocab)`, every fifth row ignored.
    fn random(
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

    fn check(&self, kernels: &CpuKernels) -> Result<()> {
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
    fn storage_bounds(&self, view_bounds: &[f64]) -> Result<Vec<f64>> {
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
struct Forward {
    stats: Tensor,
    bad_row: Option<usize>,
    logits: Buffer,
    grad: Option<Buffer>,
}

impl Forward {
    /// Runs a forward entry over a copy of `base`'s storage, with a
    /// sentinel-filled `[rows, vocab]` gradient buffer when the launch takes one.
    #[allow(clippy::too_many_arguments)]
    fn run(
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
    fn grad(&self, dims: &[usize], dtype: DType) -> Result<Option<Tensor>> {
        let Some(grad) = &self.grad else { return Ok(None) };
        let len = dims.iter().product::<usize>() * dtype.size_in_bytes();
        Ok(Some(Tensor::from_raw_buffer(grad.bytes(len), dtype, dims, &Device::Cpu)?))
    }

    /// The logits' storage after the launch, shaped like `base`.
    fn logits(&self, base: &Tensor) -> Result<Tensor> {
        storage_tensor(&self.logits, base)
    }
}

/// A buffer holding a copy of `base`'s storage, read back as a tensor like `base`.
fn storage_tensor(buffer: &Buffer, base: &Tensor) -> Result<Tensor> {
    let len = base.elem_count() * base.dtype().size_in_bytes();
    Tensor::from_raw_buffer(buffer.bytes(len), base.dtype(), base.dims(), &Device::Cpu)
}

// ---------------------------------------------------------------------------
// How far the kernels may be from the CPU engine.
// ---------------------------------------------------------------------------
//
// Both engines form every output in the accumulator type A (f32; f64 for f64
// logits) from the same inputs, by different code (SIMD lanes, a polynomial
// exp and 16 running sums on the CPU; exp2 of an FMA, and a tree over threads
// here), and round it once to its type T. Two such results differ by
// - the rounding to T: at most one step of T at the value w, eps_T |w| (eps_T
//   the spacing of T at 1: 2^-7 for bf16, 2^-10 for f16, 2^-23 for f32, 2^-52
//   for f64), plus T's smallest subnormal (2^-24 for f16; nothing, for the rest);
// - what A's roundings leave of the terms that form the value: a few eps_A of
//   the terms, which may cancel to a value much smaller than themselves.
// So each bound is eps_T |w| + tiny_T + K eps_A (terms), with the terms of
// each output written in `Tolerance`; nothing else is allowed. (Before, a
// 16-bit gradient had `8e-3 max(1, |w|)`: at V >= 4099 every softmax term is
// below 8e-3, and kernels that dropped them passed every random case.)
// Ignored rows and the storage outside the view are compared bit for bit.

/// The few `eps_A` of `K eps_A (terms)`. Measured over every case of this
/// file (2026-12-04): at most 3.4 (f64, the rows of equal logits in
/// `deciding_logits_in_the_upper_half_of_a_warp`), 1.1 for f32, and nothing
/// beyond the rounding for bf16 and f16.
const K: f64 = 8.0;

/// `(eps, tiny)` of `dtype`: the spacing of its numbers at 1, and its
/// smallest positive number (the spacing of its subnormals).
fn precision(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::BF16 => (2f64.powi(-7), 2f64.powi(-133)),
        DType::F16 => (2f64.powi(-10), 2f64.powi(-24)),
        DType::F32 => (2f64.powi(-23), 2f64.powi(-149)),
        DType::F64 => (2f64.powi(-52), f64::from_bits(1)),
        other => panic!("no precision for {other:?}"),
    }
}

/// The sizes of the terms behind each row's outputs, from the CPU engine's
/// `lse` and the row's soft-capped logits `x'` (finite ones; a non-finite
/// output is compared bit for bit):
/// - `lse` and `ce = lse - x'_y`: exponents `x'_j - lse` rounded in A, and a
///   sum of V exponentials (in `(0, 1]`, the largest 1) in another order, whose
///   roundings walk like `sqrt(V)` relative, an absolute error on its log
///   (rows of equal terms add theirs up, and stay within K of it at the V
///   they have here): `E = |lse| + max |x'| + sqrt(V)`;
/// - the logit sum `Σ c_j x'_j` (c the class weights, else 1): V terms of
///   either sign in another order, trees and lanes, `log2 V Σ |c_j x'_j|`;
/// - the accuracy: 0 or 1 from the same comparisons, exact;
/// - a gradient off the target, `(s p_j + g_sum c_j) cap'_j` with `s = g_ce + g_lse`
///   and `p_j = exp(x'_j - lse)`: `p_j` carries its exponent's error, relative
///   (`E`: the forward with gradient uses its own `lse`), so `E |s| p_max +
///   |g_sum| max c`, `p_max` the row's largest `p_j`;
/// - the target's, `(g_ce expm1(-ce) + g_lse exp(-ce) + g_sum c_y) cap'_y`
///   (no cancellation as `p_y -> 1`; see op/mod.rs), from a `ce` that carries `E`:
///   `(|g_ce| + |g_lse|) E + |g_sum| c_y`.
struct Tolerance {
    /// The logits' dtype (the gradients') and the accumulator's `eps`.
    dtype: DType,
    eps_acc: f64,
    vocab: usize,
    rows: Vec<RowTerms>,
}

struct RowTerms {
    /// The target, `None` for an ignored row (its gradient must be exactly 0).
    target: Option<usize>,
    /// `E = |lse| + max |x'| + sqrt(V)`.
    exponent: f64,
    /// `log2 V Σ |c_j x'_j|`.
    logit_sum: f64,
    /// `max_j exp(x'_j - lse)`.
    p_max: f64,
    /// `max c` and `c_y` (1 without class weights).
    c_max: f64,
    c_target: f64,
}

impl Tolerance {
    fn new(logits: &Tensor, labels: &[i64], options: &KernelOptions, cpu_stats: &Tensor) -> Result<Self> {
        let (dtype, vocab) = (logits.dtype(), logits.dim(candle::D::Minus1)?);
        let rows: Vec<Vec<f64>> = logits.to_dtype(DType::F64)?.reshape(((), vocab))?.to_vec2()?;
        let lse: Vec<f64> = cpu_stats.narrow(1, 1, 1)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let weights: Option<Vec<f64>> =
            options.sum_weights.as_ref().map(|w| w.to_dtype(DType::F64)?.to_vec1()).transpose()?;
        let weight = |j: usize| weights.as_ref().map_or(1.0, |w| w[j]);
        let log_vocab = (vocab.max(2) as f64).log2();
        let rows = rows
            .iter()
            .zip(&lse)
            .zip(labels)
            .map(|((row, &lse), &label)| {
                let capped = row.iter().map(|&x| options.softcap.map_or(x, |cap| cap * (x / cap).tanh()));
                let finite: Vec<(usize, f64)> = capped.enumerate().filter(|(_, x)| x.is_finite()).collect();
                let largest = finite.iter().fold(0f64, |m, (_, x)| m.max(x.abs()));
                let lse_size = if lse.is_finite() { lse.abs() } else { 0.0 };
                let target = (label != options.ignore_index).then_some(label as usize);
                RowTerms {
                    target,
                    exponent: lse_size + largest + (vocab as f64).sqrt(),
                    logit_sum: log_vocab * finite.iter().map(|&(j, x)| (weight(j) * x).abs()).sum::<f64>(),
                    // f64::max skips the NaN of a NaN lse.
                    p_max: finite.iter().fold(0f64, |m, (_, x)| m.max((x - lse).exp())),
                    c_max: weights.as_ref().map_or(1.0, |w| w.iter().fold(0f64, |m, c| m.max(c.abs()))),
                    c_target: target.map_or(1.0, |y| weight(y).abs()),
                }
            })
            .collect();
        Ok(Self { dtype, eps_acc: precision(acc(dtype)).0, vocab, rows })
    }

    /// Per row, the bounds of statistic `stat` (as `Stat` names it) around the CPU's `want` `[rows, 1]`.
    fn stat_bounds(&self, stat: &str, want: &Tensor) -> Result<Vec<f64>> {
        let (eps, tiny) = precision(want.dtype());
        let want: Vec<f64> = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        Ok(self
            .rows
            .iter()
            .zip(want)
            .map(|(row, w)| {
                let terms = match stat {
                    "ce" | "lse" => row.exponent,
                    "logit_sum" => row.logit_sum,
                    "correct" => return 0.0,
                    other => panic!("no statistic {other}"),
                };
                eps * w.abs() + tiny + K * self.eps_acc * terms
            })
            .collect())
    }

    /// Per element, the bounds of the gradient around the CPU's `want`
    /// `[rows.., V]`, from the factors `[rows, 5] = (g_ce, g_lse, g_sum, lse, ce)`.
    fn grad_bounds(&self, factors: &Tensor, want: &Tensor) -> Result<Vec<f64>> {
        let (eps, tiny) = precision(self.dtype);
        let factors: Vec<Vec<f64>> = factors.to_dtype(DType::F64)?.to_vec2()?;
        let want: Vec<f64> = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let mut bounds = vec![0.0; want.len()];
        for (r, (row, f)) in self.rows.iter().zip(&factors).enumerate() {
            let Some(target) = row.target else { continue };
            let (g_ce, g_lse, g_sum) = (f[0].abs(), f[1].abs(), f[2].abs());
            let off_target = row.exponent * (f[0] + f[1]).abs() * row.p_max + g_sum * row.c_max;
            let at_target = (g_ce + g_lse) * row.exponent + g_sum * row.c_target;
            for j in 0..self.vocab {
                let terms = if j == target { at_target } else { off_target };
                let i = r * self.vocab + j;
                bounds[i] = eps * want[i].abs() + tiny + K * self.eps_acc * terms;
            }
        }
        Ok(bounds)
    }
}

/// `|got - want| <= bound` element by element, in f64; where `want` is NaN,
/// `got` is NaN, and where it is infinite, the same infinity.
fn assert_within(what: &str, got: &Tensor, want: &Tensor, bounds: &[f64]) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let want = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(bounds.len(), want.len(), "{what}: one bound per element");
    for (i, ((g, w), bound)) in got.iter().zip(&want).zip(bounds).enumerate() {
        let ok = if w.is_nan() || w.is_infinite() {
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
        } else {
            (g - w).abs() <= *bound
        };
        assert!(ok, "{what}: element {i} is {g}, the CPU engine gives {w} (bound {bound:e})");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Inputs.
// ---------------------------------------------------------------------------

const DTYPES: [DType; 4] = [DType::F32, DType::BF16, DType::F16, DType::F64];

fn random_logits(seed: u64, dims: &[usize], dtype: DType) -> Result<Tensor> {
    common::logits(&mut Rng::new(seed), dims, 8.0, dtype, &Device::Cpu)
}

/// Block shapes to run besides the launcher's: a 1024-thread block per row (512
/// for f64, its largest) and 1024 threads with a warp per row.
fn shapes(dtype: DType) -> Vec<Option<LaunchShape>> {
    let threads = kernel_abi::max_threads(dtype);
    vec![
        None,
        Some(LaunchShape { threads, rows_per_block: 1, max_blocks: kernel_abi::MAX_BLOCKS }),
        Some(LaunchShape { threads, rows_per_block: threads / 32, max_blocks: kernel_abi::MAX_BLOCKS }),
    ]
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[test]
fn every_dtype_and_block_shape_matches_the_cpu_engine() -> Result<()> {
    let Some(kernels) = kernels("every_dtype_and_block_shape_matches_the_cpu_engine") else { return Ok(()) };
    // 300: a warp per row in the launcher's shape; 4099 and 50257: a block per row,
    // odd lengths, so that rows start off 16-byte boundaries.
    for (vocab, rows) in [(300, 13), (4099, 9), (50257, 3)] {
        for dtype in DTYPES {
            for shape in shapes(dtype) {
                let mut case = Case::random(
                    format!("{dtype:?} V={vocab} {shape:?}"),
                    vocab as u64,
                    &[rows, vocab],
                    dtype,
                    rows,
                    vocab,
                )?;
                case.shape = shape;
                case.check(kernels)?;
            }
        }
    }
    Ok(())
}

/// The row's deciding logits sit where only a correct warp reduction finds
/// them: the largest logit, and the target, in lanes 16-31 of a warp that is
/// not the first (a shuffle offset of 8 instead of 16 would leave them out of
/// lane 0's result), and a tie with the target before it (accuracy 0).
#[test]
fn deciding_logits_in_the_upper_half_of_a_warp() -> Result<()> {
    let Some(kernels) = kernels("deciding_logits_in_the_upper_half_of_a_warp") else { return Ok(()) };
    for dtype in DTYPES {
        let pack = 16 / dtype.size_in_bytes();
        for shape in shapes(dtype) {
            let threads = shape.map_or(256, |s| if s.rows_per_block == 1 { s.threads as usize } else { 32 });
            // Whole packs per row, so that every row starts 16-byte aligned and pack k
            // belongs to lane k % threads.
            let vocab = pack * threads * 3;
            let rows = 4;
            let mut values = vec![0f64; rows * vocab];
            let index_of_lane = |lane: usize| (threads * 2 + lane) * pack + 1;
            let labels: Vec<i64> = vec![
                index_of_lane(20) as i64, // the largest logit is the target (accuracy 1)
                3,                        // the largest logit is elsewhere (accuracy 0)
                index_of_lane(29) as i64, // the target ties an earlier logit in lane 18 (accuracy 0)
                index_of_lane(17) as i64, // the target ties a later logit (accuracy 1)
            ];
            let row = |r: usize, j: usize| r * vocab + j;
            values[row(0, index_of_lane(20))] = 9.0;
            values[row(1, index_of_lane(23))] = 9.0;
            values[row(2, index_of_lane(18))] = 7.0;
            values[row(2, index_of_lane(29))] = 7.0;
            values[row(3, index_of_lane(17))] = 6.0;
            values[row(3, index_of_lane(26))] = 6.0;
            let base = Tensor::from_vec(values, (rows, vocab), &Device::Cpu)?.to_dtype(dtype)?;
            let mut case = Case::new(format!("{dtype:?} {shape:?}"), base, labels);
            case.shape = shape;
            case.check(kernels)?;
        }
    }
    Ok(())
}

#[test]
fn more_rows_than_blocks() -> Result<()> {
    let Some(kernels) = kernels("more_rows_than_blocks") else { return Ok(()) };
    for dtype in DTYPES {
        for (vocab, rows_per_block) in [(200, 8), (3001, 1)] {
            let rows = 57;
            let mut case = Case::random(format!("{dtype:?} V={vocab}"), 7, &[rows, vocab], dtype, rows, vocab)?;
            case.shape = Some(LaunchShape { threads: 256, rows_per_block, max_blocks: 3 });
            case.check(kernels)?;
        }
    }
    Ok(())
}

#[test]
fn strided_views_in_place() -> Result<()> {
    let Some(kernels) = kernels("strided_views_in_place") else { return Ok(()) };
    fn shifted(t: &Tensor) -> Result<Tensor> {
        // [B, S-1, V] of [B, S, V]: the logits that predict the next token.
        t.narrow(1, 0, t.dim(1)? - 1)
    }
    fn columns(t: &Tensor) -> Result<Tensor> {
        // Rows that start one element in and skip the last: every row off a 16-byte boundary.
        t.narrow(1, 1, t.dim(1)? - 3)
    }
    for dtype in DTYPES {
        for vocab in [301, 4104] {
            let (b, s) = (3, 5);
            let mut case =
                Case::random(format!("{dtype:?} [B, S-1, V={vocab}]"), 11, &[b, s, vocab], dtype, b * (s - 1), vocab)?;
            case.view = shifted;
            case.check(kernels)?;
            let rows = 7;
            let mut case =
                Case::random(format!("{dtype:?} columns of V={vocab}"), 12, &[rows, vocab], dtype, rows, vocab - 3)?;
            case.view = columns;
            case.check(kernels)?;
        }
    }
    Ok(())
}

#[test]
fn ignored_and_out_of_range_labels() -> Result<()> {
    let Some(kernels) = kernels("ignored_and_out_of_range_labels") else { return Ok(()) };
    for dtype in DTYPES {
        for vocab in [100, 5000] {
            let base = random_logits(3, &[6, vocab], dtype)?;
            // Ignored rows (the default -100, and a custom ignore_index of 2).
            let case = Case::new(format!("{dtype:?} ignored"), base.clone(), vec![-100, 1, -100, 0, -100, 7]);
            case.check(kernels)?;
            let mut case = Case::new(format!("{dtype:?} ignore_index 2"), base.clone(), vec![2, 1, 2, 0, -100, 2]);
            case.options.ignore_index = 2;
            case.labels[4] = 3;
            case.check(kernels)?;
            // Out of range: the first bad row is reported, whatever follows.
            for labels in [vec![0, 1, vocab as i64, -5, 2, 3], vec![0, -100, -1, 1, 99999, 0]] {
                Case::new(format!("{dtype:?} bad {labels:?}"), base.clone(), labels).check(kernels)?;
            }
        }
    }
    Ok(())
}

#[test]
fn nan_and_infinite_logits() -> Result<()> {
    let Some(kernels) = kernels("nan_and_infinite_logits") else { return Ok(()) };
    for dtype in DTYPES {
        for vocab in [90, 3000] {
            let rows = 7;
            let mut values = random_logits(5, &[rows, vocab], DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            // The last row: all -inf with label 0, the first largest logit as argmax picks it.
            let labels = vec![4, 4, 4, 4, 4, 4, 0];
            values[vocab + 50] = f64::NAN; // a NaN off the target
            values[2 * vocab + 4] = f64::NAN; // a NaN target
            values[3 * vocab + 60] = f64::INFINITY;
            values[4 * vocab + 70] = f64::NEG_INFINITY;
            values[4 * vocab + 4] = f64::NEG_INFINITY; // a -inf target
            for v in &mut values[5 * vocab..] {
                *v = f64::NEG_INFINITY; // rows of -inf
            }
            let base = Tensor::from_vec(values, (rows, vocab), &Device::Cpu)?.to_dtype(dtype)?;
            Case::new(format!("{dtype:?} V={vocab}"), base, labels).check(kernels)?;
        }
    }
    Ok(())
}

#[test]
fn every_option() -> Result<()> {
    let Some(kernels) = kernels("every_option") else { return Ok(()) };
    // z-loss only changes the upstream gradients, which the cases draw at random.
    for dtype in DTYPES {
        for vocab in [257, 5003] {
            for (softcap, logit_sum) in [(None, true), (Some(5.0), false), (Some(30.0), true)] {
                let rows = 8;
                let mut case = Case::random(
                    format!("{dtype:?} V={vocab} softcap {softcap:?} logit_sum {logit_sum}"),
                    21,
                    &[rows, vocab],
                    dtype,
                    rows,
                    vocab,
                )?;
                case.options.softcap = softcap;
                case.options.logit_sum = logit_sum;
                for shape in shapes(dtype) {
                    case.shape = shape;
                    case.check(kernels)?;
                }
            }
        }
    }
    Ok(())
}

/// Nothing to compute, nothing launched: no launch is described for zero rows
/// or zero classes, in any dtype, entry or block shape; rows that are all
/// ignored are launched and get zero statistics and zero gradients.
#[test]
fn empty_problems() -> Result<()> {
    let Some(kernels) = kernels("empty_problems") else { return Ok(()) };
    let unit = UnitFactors { ce: 1.0, lse: 0.0, lse_squared: 0.0, logit_sum: 0.0 };
    for dtype in DTYPES {
        for dims in [[0, 300], [0, 5000], [4, 0], [0, 0]] {
            let base = Tensor::zeros(&dims[..], dtype, &Device::Cpu)?;
            let geometry = RowGeometry::new(base.layout())?;
            let options = KernelOptions { ignore_index: -100, softcap: None, logit_sum: false, sum_weights: None };
            for shape in shapes(dtype) {
                let shape = shape.unwrap_or_else(|| LaunchShape::for_vocab(dtype, dims[1]));
                assert!(kernel_abi::forward(&geometry, dtype, &options, shape)?.is_none(), "{dims:?}: forward");
                for in_place in [false, true] {
                    let with_grad = kernel_abi::forward_with_grad(&geometry, dtype, &options, &unit, in_place, shape)?;
                    assert!(with_grad.is_none(), "{dims:?}: forward with gradient");
                }
                for in_place in [false, true] {
                    assert!(kernel_abi::backward(&geometry, dtype, &options, in_place, shape)?.is_none(), "{dims:?}");
                }
            }
        }
        for vocab in [300, 5000] {
            let base = random_logits(9, &[6, vocab], dtype)?;
            Case::new(format!("{dtype:?} V={vocab} every row ignored"), base, vec![-100; 6]).check(kernels)?;
        }
    }
    Ok(())
}

/// The labels' conversion (`ce_labels_*`) against the loss's own on the CPU
/// (the same values widened to i64): every label dtype, contiguous and
/// strided, without and with a mask of each kind (1 to 8 bytes, integer or
/// float, strided too: its -0.0 is 0, its NaN is not), more labels than
/// threads, and none.
#[test]
fn labels_of_every_dtype_and_mask() -> Result<()> {
    let Some(kernels) = kernels("labels_of_every_dtype_and_mask") else { return Ok(()) };
    let (b, s) = (3, 700);
    let mut rng = Rng::new(77);
    let values: Vec<i64> = (0..b * (s + 1)).map(|_| rng.below(250) as i64).collect();
    let keep: Vec<f64> = (0..b * (s + 2)).map(|i| [0.0, 1.0, -0.0, 2.5, f64::NAN, 7.0][i % 6]).collect();
    let masks = [
        Tensor::from_vec(keep.iter().map(|&k| u8::from(k != 0.0)).collect::<Vec<_>>(), (b, s + 2), &Device::Cpu)?,
        Tensor::from_vec(
            keep.iter().map(|&k| if k != 0.0 { 1i64 << 40 } else { 0 }).collect::<Vec<_>>(),
            (b, s + 2),
            &Device::Cpu,
        )?,
        Tensor::from_vec(keep.iter().map(|&k| half::bf16::from_f64(k)).collect::<Vec<_>>(), (b, s + 2), &Device::Cpu)?,
        Tensor::from_vec(keep.iter().map(|&k| k as f32).collect::<Vec<_>>(), (b, s + 2), &Device::Cpu)?,
        Tensor::from_vec(keep.clone(), (b, s + 2), &Device::Cpu)?,
    ];
    for dtype in common::LABEL_DTYPES {
        let wide = common::labels_as(&values, &[b, s + 1], dtype, &Device::Cpu)?;
        for (labels, layout) in [(wide.narrow(1, 1, s)?, "strided"), (wide.narrow(1, 1, s)?.copy()?, "contiguous")] {
            let flat: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
            let mask_views = masks.iter().map(|m| m.narrow(1, 2, s)).collect::<Result<Vec<_>>>()?;
            for mask in std::iter::once(None).chain(mask_views.iter().map(Some)) {
                let what = format!("{dtype:?} {layout} labels, mask {:?}", mask.map(|m| m.dtype()));
                let want: Vec<i64> = match mask {
                    None => flat.clone(),
                    Some(m) => {
                        let keep: Vec<f64> = m.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
                        flat.iter().zip(&keep).map(|(&l, &k)| if k != 0.0 { l } else { -7 }).collect()
                    }
                };
                let elements = mask.map(|m| MaskElements::of(m.dtype())).transpose()?;
                let geometry = LabelGeometry::new(labels.layout(), mask.map(|m| m.layout()).zip(elements))?;
                let launch = kernel_abi::labels(&geometry, dtype, -7)?.expect("labels to convert");
                let mut caller = Buffer::from_bytes(&storage_bytes(&labels)?);
                let mut mask_buffer =
                    mask.map(|m| Ok::<_, candle::Error>(Buffer::from_bytes(&storage_bytes(m)?))).transpose()?;
                let mut out = Buffer::filled(want.len(), &0x5a5a5a5a5a5a5a5au64.to_ne_bytes());
                let operands = Operands {
                    caller_labels: Some(&mut caller),
                    mask: mask_buffer.as_mut(),
                    labels: Some(&mut out),
                    ..Default::default()
                };
                run(kernels, &launch, operands);
                let got: Vec<i64> = out
                    .bytes(8 * want.len())
                    .chunks_exact(8)
                    .map(|c| i64::from_ne_bytes(c.try_into().unwrap()))
                    .collect();
                assert_eq!(got, want, "{what}");
            }
        }
        let none = LabelGeometry::new(Tensor::zeros(0, dtype, &Device::Cpu)?.layout(), None)?;
        assert!(kernel_abi::labels(&none, dtype, -100)?.is_none(), "{dtype:?}: no labels, no launch");
    }
    Ok(())
}

/// `[V]` class weights in `dtype`: uniform in `[0, 3)`, about a quarter of
/// them 0, and 0 at each class of `zero_at` (targets, so that the target's
/// `g_sum c_y` term is checked at 0 as well).
fn class_weights(seed: u64, vocab: usize, zero_at: &[i64], dtype: DType) -> Result<Tensor> {
    let mut rng = Rng::new(seed ^ 0xc1a55);
    let mut values: Vec<f64> = (0..vocab).map(|_| if rng.below(4) == 0 { 0.0 } else { 3.0 * rng.unit() }).collect();
    for &class in zero_at {
        values[class as usize] = 0.0;
    }
    Tensor::from_vec(values, vocab, &Device::Cpu)?.to_dtype(dtype)
}

/// Label smoothing with class weights: the class-weighted logit sum, and
/// `g_sum c_j` in every gradient (the forward with gradient, the backward out
/// of place and in place), in every dtype and block shape, with and without
/// the soft-cap. Without the logit sum the forward leaves the weights unread
/// (the plain entry) and the gradients still apply them, as on the CPU.
#[test]
fn class_weighted_logit_sum() -> Result<()> {
    let Some(kernels) = kernels("class_weighted_logit_sum") else { return Ok(()) };
    for dtype in DTYPES {
        for vocab in [257, 5003] {
            for (softcap, logit_sum) in [(None, true), (Some(5.0), true), (None, false)] {
                let rows = 8;
                let mut case = Case::random(
                    format!("{dtype:?} V={vocab} class weights, softcap {softcap:?} logit_sum {logit_sum}"),
                    31,
                    &[rows, vocab],
                    dtype,
                    rows,
                    vocab,
                )?;
                let weights = class_weights(vocab as u64, vocab, &case.labels[..2], acc(dtype))?;
                case.options = KernelOptions { softcap, logit_sum, sum_weights: Some(weights), ..case.options };
                for shape in shapes(dtype) {
                    case.shape = shape;
                    case.check(kernels)?;
                }
            }
        }
    }
    Ok(())
}

/// A marshalling mistake is caught before the kernel runs.
#[test]
fn mismatched_arguments_are_refused() -> Result<()> {
    let Some(kernels) = kernels("mismatched_arguments_are_refused") else { return Ok(()) };
    let logits = random_logits(1, &[2, 8], DType::F32)?;
    let options = KernelOptions { ignore_index: -100, softcap: None, logit_sum: false, sum_weights: None };
    let geometry = RowGeometry::new(logits.layout())?;
    let mut launch = kernel_abi::forward(&geometry, DType::F32, &options, LaunchShape::for_vocab(DType::F32, 8))?
        .expect("2 x 8 has a launch");
    launch.args.swap(5, 6); // rows (i64) and vocab (int)
    let mut buffers: [Buffer; 4] = std::array::from_fn(|_| Buffer::filled(64, &[0]));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let [logits, labels, stats, first_bad_row] = buffers.each_mut();
        let operands = Operands {
            logits: Some(logits),
            labels: Some(labels),
            stats: Some(stats),
            first_bad_row: Some(first_bad_row),
            ..Default::default()
        };
        run(kernels, &launch, operands)
    }));
    let message = caught.expect_err("a swapped argument must be refused");
    let message = message.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("argument 5"), "{message}");
    Ok(())
}

/// A skip shows in `cargo test`'s output, not as a plain `ok`: one test of this
/// binary, run with its output captured (as by default) and no HIP-CPU, puts
/// its `SKIP` line on the process's stderr, which `cargo test` passes to the
/// terminal; with `CHUNKED_CE_REQUIRE_HIP_CPU` set, the same test fails.
#[test]
fn a_skip_shows_in_the_test_output() {
    let test = "mismatched_arguments_are_refused";
    let run = |require: bool| {
        let mut command = Command::new(std::env::current_exe().expect("the test binary's path"));
        command.args(["--exact", test]).env("HIP_CPU_DIR", "/nonexistent").env_remove("RUST_TEST_NOCAPTURE");
        if require {
            command.env("CHUNKED_CE_REQUIRE_HIP_CPU", "1");
        } else {
            command.env_remove("CHUNKED_CE_REQUIRE_HIP_CPU");
        }
        command.output().expect("the test binary runs")
    };
    let skipped = run(false);
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "a skip passes: {stderr}");
    assert!(stderr.contains(&format!("SKIP {test}: HIP-CPU not found at /nonexistent")), "stderr: {stderr}");
    let required = run(true);
    let stdout = String::from_utf8_lossy(&required.stdout);
    assert!(!required.status.success(), "CHUNKED_CE_REQUIRE_HIP_CPU=1 fails the test: {stdout}");
    assert!(
        stdout.contains("HIP-CPU not found at /nonexistent (set HIP_CPU_DIR) (CHUNKED_CE_REQUIRE_HIP_CPU"),
        "{stdout}"
    );
}
