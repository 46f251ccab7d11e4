//! Compiling CUDA kernel sources for the CPU with HIP-CPU (`$HIP_CPU_DIR`,
//! else `../shared/hip-cpu`), g++ and TBB, through the include shim in this
//! folder, into a shared library that a test loads: shared by
//! `tests/kernels_on_cpu.rs` (the crate's kernels) and
//! `tests/adamw_on_cpu.rs` (the example's AdamW).
//!
//! A missing tool is a skip (`Err` says which), a compile error a failure (it
//! panics). The library is cached in the target dir by a hash of every input:
//! contents, not paths, so that a clone elsewhere reuses it; HIP-CPU by its
//! canonical path.

use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `extern "C"` launcher [`launcher`] generates: entry, blocks, threads,
/// the argument list (pointers to each value) with each argument's kind and
/// size and their count, and a buffer for the error message; 0 on success.
pub type LaunchFn = unsafe extern "C" fn(
    entry: *const c_char,
    blocks: u32,
    threads: u32,
    args: *mut *mut c_void,
    kinds: *const c_char,
    sizes: *const usize,
    count: i32,
    error: *mut c_char,
    error_len: usize,
) -> i32;

/// Compiles `source` (one generated C++ file that `#include`s the kernels,
/// found on `include_dirs`; the shim's `prelude.h` is force-included) into
/// `lib{name}_{hash}.so` and loads it. `hashed` are the files the source
/// includes, whose contents go into the cache key with the shim's.
pub fn build(
    name: &str,
    source: &str,
    include_dirs: &[PathBuf],
    hashed: &[PathBuf],
) -> Result<libloading::Library, String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let hip_cpu =
        std::env::var_os("HIP_CPU_DIR").map(PathBuf::from).unwrap_or_else(|| manifest.join("../shared/hip-cpu"));
    if !hip_cpu.join("include/hip/hip_runtime.h").exists() {
        return Err(format!("HIP-CPU not found at {} (set HIP_CPU_DIR)", hip_cpu.display()));
    }
    let hip_cpu = hip_cpu.canonicalize().map_err(|e| format!("HIP-CPU at {}: {e}", hip_cpu.display()))?;
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    if Command::new(&compiler).arg("--version").output().is_err() {
        return Err(format!("no C++ compiler `{compiler}` (set CXX)"));
    }
    let shim = manifest.join("tests/hip_cpu");
    let flags = ["-std=c++17", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing", "-w", "-include", "prelude.h"];
    let mut inputs = vec![source.to_string(), compiler.clone(), flags.join(" "), hip_cpu.display().to_string()];
    for file in ["prelude.h", "launch.h", "cuda_bf16.h", "cuda_fp16.h"] {
        inputs.push(std::fs::read_to_string(shim.join(file)).expect("the shim is in the repository"));
    }
    for file in hashed {
        inputs.push(std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display())));
    }
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernels_on_cpu");
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let library = out_dir.join(format!("lib{name}_{:016x}.so", fnv1a(&inputs.concat())));
    if !library.exists() {
        let cpp = out_dir.join(format!("{name}_{}.cpp", std::process::id()));
        std::fs::write(&cpp, source).map_err(|e| format!("cannot write {}: {e}", cpp.display()))?;
        let partial = library.with_extension(format!("{}.tmp", std::process::id()));
        let mut command = Command::new(&compiler);
        command.args(flags).arg("-I").arg(&shim);
        for dir in include_dirs {
            command.arg("-I").arg(dir);
        }
        let output = command
            .arg("-I")
            .arg(hip_cpu.join("include"))
            .arg(&cpp)
            .arg("-o")
            .arg(&partial)
            .args(["-ltbb", "-pthread"])
            .output()
            .map_err(|e| format!("cannot run `{compiler}`: {e}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if stderr.contains("ltbb") || stderr.contains("tbb/") || stderr.contains("execution:") {
                let line = stderr.lines().find(|l| l.contains("tbb")).unwrap_or_default();
                return Err(format!("TBB is missing (apt-get install libtbb-dev): {line}"));
            }
            panic!("compiling {name}'s kernels for the CPU failed:\n{stderr}");
        }
        std::fs::rename(&partial, &library).map_err(|e| format!("cannot move the library into place: {e}"))?;
        let _ = std::fs::remove_file(&cpp);
    }
    // SAFETY: the library is ours, just built from the sources above; loading it
    // runs no initialisers beyond HIP-CPU's and the C++ runtime's.
    unsafe { libloading::Library::new(&library) }.map_err(|e| format!("cannot load the kernels: {e}"))
}

/// The `extern "C"` launcher every generated source ends with: `{name}(entry,
/// blocks, threads, args, kinds, sizes, count, error, error_len)` calls
/// `launch_checked` (see `launch.h`) on the entry of that name, one of `entries`.
pub fn launcher(name: &str, entries: &[&str]) -> String {
    let mut source = format!(
        "extern \"C\" int {name}(const char* entry, unsigned blocks, unsigned threads, void** args,\n\
         \x20                 const char* kinds, const std::size_t* sizes, int count, char* error,\n\
         \x20                 std::size_t error_len) {{\n"
    );
    for entry in entries {
        source.push_str(&format!(
            "    if (std::strcmp(entry, \"{entry}\") == 0)\n        return launch_checked({entry}, entry, blocks, \
             threads, args, kinds, sizes, count, error, error_len);\n"
        ));
    }
    source.push_str("    std::snprintf(error, error_len, \"no kernel entry %s\", entry);\n    return 1;\n}\n");
    source
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}
