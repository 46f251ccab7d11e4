//! The harness of `tests/example_kernels_on_cpu.rs`: the example's kernels
//! compiled once with HIP-CPU, one launch with the arguments the example's
//! launchers pass, and the tests' deterministic inputs.

use crate::hip_library::{self, LaunchFn, NotBuilt};
use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

const ENTRIES: [&str; 14] = [
    "adamw_first_moment",
    "adamw_second_moment",
    "adamw_update",
    "causal_softmax_fwd",
    "causal_softmax_bwd",
    "layer_norm_fwd",
    "layer_norm_bwd",
    "gelu_fwd",
    "gelu_bwd",
    "add_bias",
    "sum_squares",
    "embedding_bwd",
    "column_sums_partial",
    "column_sums_finish",
];

/// The kernels, compiled once, or why the test skips.
fn kernels() -> &'static Result<(libloading::Library, LaunchFn), NotBuilt> {
    static KERNELS: OnceLock<Result<(libloading::Library, LaunchFn), NotBuilt>> = OnceLock::new();
    KERNELS.get_or_init(|| {
        let dir = crate::checkout::checkout().join("examples/finetune_gpt2");
        let sources = [
            "adamw.cu",
            "softmax.cu",
            "layer_norm.cu",
            "gelu.cu",
            "bias.cu",
            "sum_squares.cu",
            "embedding.cu",
            "column_sums.cu",
        ];
        let prologue: String =
            std::iter::once("launch.h").chain(sources).map(|f| format!("#include \"{f}\"\n")).collect();
        // One unit: the example's entries are few, small and `extern "C"`.
        let (library, launch) = hip_library::build(&hip_library::Kernels {
            name: "example",
            prologue: &prologue,
            entries: &ENTRIES,
            parts: 1,
            include_dirs: std::slice::from_ref(&dir),
            hashed: &sources.map(|file| dir.join(file)),
        })?;
        Ok((library, launch))
    })
}

/// One kernel argument, as the example's launcher passes it.
pub enum Arg<'a> {
    Floats(&'a mut [f32]),
    Doubles(&'a mut [f64]),
    U32s(&'a mut [u32]),
    I64(i64),
    I32(i32),
    F32(f32),
}

/// Launches `entry` on `blocks` x `threads` with `args`, checked against the
/// entry's parameter list by `launch_checked`.
pub fn launch(launch: LaunchFn, entry: &str, blocks: u32, threads: u32, args: &mut [Arg]) {
    // Each argument's value, in a slot whose address the argument array holds.
    let mut slots: Vec<[u8; 8]> = Vec::new();
    let (mut kinds, mut sizes) = (Vec::new(), Vec::new());
    for arg in args.iter_mut() {
        let (kind, bytes, size) = match arg {
            Arg::Floats(v) => (b'p', (v.as_mut_ptr() as usize as u64).to_ne_bytes(), 8),
            Arg::Doubles(v) => (b'p', (v.as_mut_ptr() as usize as u64).to_ne_bytes(), 8),
            Arg::U32s(v) => (b'p', (v.as_mut_ptr() as usize as u64).to_ne_bytes(), 8),
            Arg::I64(v) => (b'i', v.to_ne_bytes(), 8),
            Arg::I32(v) => {
                let mut bytes = [0u8; 8];
                bytes[..4].copy_from_slice(&v.to_ne_bytes());
                (b'i', bytes, 4)
            }
            Arg::F32(v) => {
                let mut bytes = [0u8; 8];
                bytes[..4].copy_from_slice(&v.to_ne_bytes());
                (b'f', bytes, 4)
            }
        };
        slots.push(bytes);
        kinds.push(kind as c_char);
        sizes.push(size);
    }
    let mut pointers: Vec<*mut c_void> = slots.iter_mut().map(|s| s.as_mut_ptr().cast()).collect();
    let entry_c = std::ffi::CString::new(entry).unwrap();
    let mut error = vec![0 as c_char; 512];
    // SAFETY: every pointer in `pointers` addresses an 8-byte slot holding the
    // argument's value (a pointer, an i64, or an i32 or f32 in its first 4 bytes), alive
    // for the call; the float buffers behind the pointers are borrowed mutably for
    // it; `launch_checked` refuses a list that does not match the entry's.
    let rc = unsafe {
        launch(
            entry_c.as_ptr(),
            blocks,
            threads,
            pointers.as_mut_ptr(),
            kinds.as_ptr(),
            sizes.as_ptr(),
            args.len() as i32,
            error.as_mut_ptr(),
            error.len(),
        )
    };
    // SAFETY: the launcher writes a NUL-terminated message into `error` (zeroed).
    let message = unsafe { CStr::from_ptr(error.as_ptr()) }.to_string_lossy().into_owned();
    assert_eq!(rc, 0, "{entry}: {message}");
}

/// Deterministic values in [-1, 1) (xorshift), exactly f32.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The launcher, or `None` after saying why `test` skips.
pub fn launcher(test: &str) -> Option<LaunchFn> {
    match kernels() {
        Ok((_, launch)) => Some(*launch),
        Err(NotBuilt::ToolMissing(reason)) => {
            assert!(std::env::var_os("CHUNKED_CE_REQUIRE_HIP_CPU").is_none(), "HIP-CPU required: {reason}");
            eprintln!("SKIP {test}: {reason}");
            None
        }
        Err(NotBuilt::Failed(message)) => panic!("{message}"),
    }
}
