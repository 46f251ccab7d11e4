//! Compiling CUDA kernel sources for the CPU with HIP-CPU (`$HIP_CPU_DIR`,
//! else `../shared/hip-cpu`), g++ and TBB, through the include shim in this
//! folder, into a shared library that a test loads: shared by
//! `tests/kernels_on_cpu.rs` (the crate's kernels) and
//! `tests/example_kernels_on_cpu.rs` (the example's).
//!
//! The entries can be split across several translation units compiled in
//! parallel, each with the whole kernel source but compiling only the entries
//! its part launches: the sources must then give their entries internal
//! linkage (`cuda/cross_entropy.cu`'s `CE_ENTRY`, defined `static __global__`
//! by the prologue). HIP-CPU's `__global__` inlines everything a kernel calls
//! (`flatten`), and one unit holding every entry compiles superlinearly
//! slowly: the crate's 37 entries took 586 s of g++ and 5.0 GiB as one unit,
//! 240 s of g++ (8 x 25-32 s, 4 s of each the headers) and 0.75 GiB per unit
//! as 8, 115-122 s on 2 cores (2026-12-05).
//!
//! A missing tool is a skip, a compile error a failure ([`NotBuilt`]). The
//! library is cached in the target dir by a hash of every input: contents,
//! not paths, so that a clone elsewhere reuses it; HIP-CPU by its canonical
//! path.

use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// The `extern "C"` launcher [`build`] generates: entry, blocks, threads,
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

/// What to compile: `prologue` (C++ that `#include`s the kernels, found on
/// `include_dirs`; the shim's `prelude.h` is force-included before it) and
/// the `entries` that the launcher `{name}_launch` dispatches on, split
/// round-robin into `parts` translation units. `hashed` are the files the
/// prologue includes, whose contents go into the cache key with the shim's.
pub struct Kernels<'a> {
    pub name: &'a str,
    pub prologue: &'a str,
    pub entries: &'a [&'a str],
    pub parts: usize,
    pub include_dirs: &'a [PathBuf],
    pub hashed: &'a [PathBuf],
}

/// Why there are no kernels to launch.
#[derive(Debug)]
pub enum NotBuilt {
    /// HIP-CPU, the compiler or TBB is missing: the tests skip, saying so.
    ToolMissing(String),
    /// The kernels or the shim did not compile or link: every test fails,
    /// with the compiler's message (kept, not compiled again per test).
    Failed(String),
}

/// Returned by a part's launcher for an entry it does not hold.
const NOT_IN_THIS_PART: i32 = -1;

/// Compiles `kernels` into `lib{name}_{hash}.so`, at most as many units at
/// once as the machine has cores, and loads it with its launcher.
pub fn build(kernels: &Kernels<'_>) -> Result<(libloading::Library, LaunchFn), NotBuilt> {
    let manifest = crate::checkout::checkout();
    let hip_cpu =
        std::env::var_os("HIP_CPU_DIR").map(PathBuf::from).unwrap_or_else(|| manifest.join("../shared/hip-cpu"));
    if !hip_cpu.join("include/hip/hip_runtime.h").exists() {
        return Err(NotBuilt::ToolMissing(format!("HIP-CPU not found at {} (set HIP_CPU_DIR)", hip_cpu.display())));
    }
    let hip_cpu =
        hip_cpu.canonicalize().map_err(|e| NotBuilt::ToolMissing(format!("HIP-CPU at {}: {e}", hip_cpu.display())))?;
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    if Command::new(&compiler).arg("--version").output().is_err() {
        return Err(NotBuilt::ToolMissing(format!("no C++ compiler `{compiler}` (set CXX)")));
    }
    let shim = manifest.join("tests/hip_cpu");
    let flags = ["-std=c++17", "-O1", "-fPIC", "-fno-strict-aliasing", "-w", "-include", "prelude.h"];
    let sources = part_sources(kernels);
    let mut inputs = sources.clone();
    inputs.extend([compiler.clone(), flags.join(" "), hip_cpu.display().to_string()]);
    for file in ["prelude.h", "launch.h", "cuda_bf16.h", "cuda_fp16.h"] {
        inputs.push(std::fs::read_to_string(shim.join(file)).expect("the shim is in the repository"));
    }
    for file in kernels.hashed {
        inputs.push(std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display())));
    }
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernels_on_cpu");
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| NotBuilt::Failed(format!("cannot create {}: {e}", out_dir.display())))?;
    let name = kernels.name;
    let library = out_dir.join(format!("lib{name}_{:016x}.so", fnv1a(&inputs.concat())));
    if !library.exists() {
        let stem = out_dir.join(format!("{name}_{}", std::process::id()));
        let mut objects = Vec::new();
        let mut compiles = Vec::new();
        for (part, source) in sources.iter().enumerate() {
            let cpp = stem.with_extension(format!("part{part}.cpp"));
            std::fs::write(&cpp, source)
                .map_err(|e| NotBuilt::Failed(format!("cannot write {}: {e}", cpp.display())))?;
            let object = cpp.with_extension("o");
            let mut command = Command::new(&compiler);
            command.args(flags).arg("-I").arg(&shim);
            for dir in kernels.include_dirs {
                command.arg("-I").arg(dir);
            }
            command.arg("-I").arg(hip_cpu.join("include")).arg("-c").arg(&cpp).arg("-o").arg(&object);
            compiles.push(command);
            objects.push((cpp, object));
        }
        run_parallel(name, &compiler, compiles)?;
        let partial = library.with_extension(format!("{}.tmp", std::process::id()));
        let mut link = Command::new(&compiler);
        link.arg("-shared").args(objects.iter().map(|(_, object)| object)).arg("-o").arg(&partial);
        link.args(["-ltbb", "-pthread"]);
        run_parallel(name, &compiler, vec![link])?;
        std::fs::rename(&partial, &library)
            .map_err(|e| NotBuilt::Failed(format!("cannot move the library into place: {e}")))?;
        for (cpp, object) in objects {
            let _ = std::fs::remove_file(cpp);
            let _ = std::fs::remove_file(object);
        }
    }
    // SAFETY: the library is ours, just built from the sources above; loading it
    // runs no initialisers beyond HIP-CPU's and the C++ runtime's.
    let library = unsafe { libloading::Library::new(&library) }
        .map_err(|e| NotBuilt::Failed(format!("cannot load the kernels: {e}")))?;
    let symbol = format!("{name}_launch\0");
    // SAFETY: `{name}_launch` has the signature of `LaunchFn` (`dispatcher` below).
    let launch = *unsafe { library.get::<LaunchFn>(symbol.as_bytes()) }
        .map_err(|e| NotBuilt::Failed(format!("no {name}_launch: {e}")))?;
    Ok((library, launch))
}

/// One C++ source per part: the prologue, then `{name}_launch_part{k}` over
/// the part's entries; the first part also holds `{name}_launch`, which asks
/// each part in turn.
fn part_sources(kernels: &Kernels<'_>) -> Vec<String> {
    let parts = kernels.parts.clamp(1, kernels.entries.len().max(1));
    let name = kernels.name;
    let mut sources: Vec<String> = (0..parts)
        .map(|part| {
            let entries: Vec<&str> = kernels.entries.iter().skip(part).step_by(parts).copied().collect();
            format!(
                "{}\n#include <cstring>\n\n{}",
                kernels.prologue,
                part_launcher(&format!("{name}_launch_part{part}"), &entries)
            )
        })
        .collect();
    sources[0].push_str(&dispatcher(name, parts));
    sources
}

/// The parameter list every launcher takes, as [`LaunchFn`] declares it.
const PARAMETERS: &str = "const char* entry, unsigned blocks, unsigned threads, void** args, const char* kinds, \
                          const std::size_t* sizes, int count, char* error, std::size_t error_len";

/// `{name}(..)` calls `launch_checked` (see `launch.h`) on the entry of that
/// name, one of `entries`, or returns [`NOT_IN_THIS_PART`].
fn part_launcher(name: &str, entries: &[&str]) -> String {
    let mut source = format!("extern \"C\" int {name}({PARAMETERS}) {{\n");
    for entry in entries {
        source.push_str(&format!(
            "    if (std::strcmp(entry, \"{entry}\") == 0)\n        return launch_checked({entry}, entry, blocks, \
             threads, args, kinds, sizes, count, error, error_len);\n"
        ));
    }
    source.push_str(&format!("    return {NOT_IN_THIS_PART};\n}}\n"));
    source
}

/// `{name}_launch(..)`: the part that holds the entry launches it.
fn dispatcher(name: &str, parts: usize) -> String {
    let launchers: Vec<String> = (0..parts).map(|part| format!("{name}_launch_part{part}")).collect();
    let mut source = String::new();
    for launcher in &launchers[1..] {
        source.push_str(&format!("extern \"C\" int {launcher}({PARAMETERS});\n"));
    }
    source.push_str(&format!(
        "\nextern \"C\" int {name}_launch({PARAMETERS}) {{\n    for (auto part : {{{}}}) {{\n        const int status \
         = part(entry, blocks, threads, args, kinds, sizes, count, error, error_len);\n        if (status != \
         {NOT_IN_THIS_PART})\n            return status;\n    }}\n    std::snprintf(error, error_len, \"no kernel \
         entry %s\", entry);\n    return 1;\n}}\n",
        launchers.join(", ")
    ));
    source
}

/// Runs `commands` (compiles of `name`'s kernels, or their link), as many at
/// once as the machine has cores.
fn run_parallel(name: &str, compiler: &str, commands: Vec<Command>) -> Result<(), NotBuilt> {
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut running: Vec<Child> = Vec::new();
    let mut failure = None;
    let mut finish = |child: Child| {
        let output =
            child.wait_with_output().map_err(|e| NotBuilt::Failed(format!("`{compiler}` did not finish: {e}")))?;
        if !output.status.success() && failure.is_none() {
            failure = Some(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok::<(), NotBuilt>(())
    };
    for mut command in commands {
        if running.len() == jobs {
            finish(running.remove(0))?;
        }
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| NotBuilt::Failed(format!("cannot run `{compiler}`: {e}")))?;
        running.push(child);
    }
    for child in running {
        finish(child)?;
    }
    match failure {
        None => Ok(()),
        Some(stderr) if stderr.contains("ltbb") || stderr.contains("tbb/") || stderr.contains("execution:") => {
            let line = stderr.lines().find(|l| l.contains("tbb")).unwrap_or_default();
            Err(NotBuilt::ToolMissing(format!("TBB is missing (apt-get install libtbb-dev): {line}")))
        }
        Some(stderr) => Err(NotBuilt::Failed(format!("compiling {name}'s kernels for the CPU failed:\n{stderr}"))),
    }
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}
