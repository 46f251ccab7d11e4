//! Building the kernels for the CPU, host memory standing in for device
//! memory, and one launch.

use crate::common;
use crate::hip_library::{self, LaunchFn, NotBuilt};
use candle::{DType, Result, Tensor};
use candle_chunked_ce::kernel_abi::{KernelArg, KernelLaunch, KernelOptions, Operand, ENTRIES};
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The kernels' library, loaded, and its launcher.
pub(crate) struct CpuKernels {
    pub(crate) launch: LaunchFn,
    _library: libloading::Library,
}

/// The kernels, compiled once per test binary, or `None` after printing why
/// `test` is skipped. A compile error in the kernels or the shim fails every
/// test.
pub(crate) fn kernels(test: &str) -> Option<&'static CpuKernels> {
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
pub(crate) fn build() -> std::result::Result<CpuKernels, NotBuilt> {
    let manifest = crate::checkout::checkout();
    let (library, launch) = hip_library::build(&hip_library::Kernels {
        name: "ce",
        // `static` entries: each unit compiles only those its launcher names.
        prologue: "#include \"launch.h\"\n#define CE_ENTRY static __global__\n#include \"cross_entropy.cu\"\n",
        // Every entry `kernel_abi` knows (a name missing from the `.cu` fails to compile).
        entries: &ENTRIES,
        parts: TRANSLATION_UNITS,
        include_dirs: &[manifest.join("cuda")],
        hashed: &kernel_sources(manifest),
    })?;
    Ok(CpuKernels { launch, _library: library })
}

/// `cuda/cross_entropy.cu` and every header of `cuda/cross_entropy/` it
/// includes, in a fixed order: read from the folder, so that a new header
/// cannot be left out of the cache key.
fn kernel_sources(manifest: &Path) -> Vec<PathBuf> {
    let headers = manifest.join("cuda/cross_entropy");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&headers)
        .unwrap_or_else(|e| panic!("{}: {e}", headers.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    sources.sort();
    sources.insert(0, manifest.join("cuda/cross_entropy.cu"));
    sources
}

/// 8 units of 4 or 5 entries: 25-32 s of g++ each, about 2 minutes on 2 cores.
pub(crate) const TRANSLATION_UNITS: usize = 8;

// ---------------------------------------------------------------------------
// Host memory standing in for device memory, and one launch.
// ---------------------------------------------------------------------------

/// A 16-byte aligned byte buffer, as a device allocation is (at least).
pub(crate) struct Buffer(Vec<u128>);

impl Buffer {
    pub(crate) fn from_bytes(bytes: &[u8]) -> Self {
        let mut words = vec![0u128; bytes.len().div_ceil(16)];
        // SAFETY: `words` holds at least `bytes.len()` bytes; u128 has no invalid bit patterns.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast::<u8>(), bytes.len()) };
        Self(words)
    }

    pub(crate) fn filled(len: usize, pattern: &[u8]) -> Self {
        Self::from_bytes(&pattern.iter().copied().cycle().take(len * pattern.len()).collect::<Vec<_>>())
    }

    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: the buffer holds `16 * self.0.len() >= len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), len) }
    }

    pub(crate) fn pointer(&mut self) -> *mut c_void {
        self.0.as_mut_ptr().cast()
    }
}

/// The buffers a launch binds to its operands (`None`: not bound).
#[derive(Default)]
pub(crate) struct Operands<'a> {
    pub(crate) logits: Option<&'a mut Buffer>,
    pub(crate) labels: Option<&'a mut Buffer>,
    pub(crate) caller_labels: Option<&'a mut Buffer>,
    pub(crate) mask: Option<&'a mut Buffer>,
    pub(crate) sum_weights: Option<&'a mut Buffer>,
    pub(crate) stats: Option<&'a mut Buffer>,
    pub(crate) first_bad_row: Option<&'a mut Buffer>,
    pub(crate) factors: Option<&'a mut Buffer>,
    pub(crate) grad: Option<&'a mut Buffer>,
}

/// Launches `launch` as cuLaunchKernel would: one pointer to each argument's value.
pub(crate) fn run(kernels: &CpuKernels, launch: &KernelLaunch, mut operands: Operands<'_>) {
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
pub(crate) fn storage_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let (storage, _) = tensor.storage_and_layout();
    let candle::Storage::Cpu(cpu) = &*storage else { candle::bail!("not on the CPU") };
    pub(crate) fn bytes_of<T>(values: &[T]) -> Vec<u8> {
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
pub(crate) fn sum_weights_buffer(options: &KernelOptions) -> Result<Option<Buffer>> {
    options.sum_weights.as_ref().map(|w| Ok(Buffer::from_bytes(&storage_bytes(w)?))).transpose()
}

/// The accumulator type of the kernels for `dtype`.
pub(crate) fn acc(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
