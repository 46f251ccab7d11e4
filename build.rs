//! Compiles `cuda/*.cu` to PTX with nvcc when the `cuda` feature is on; does
//! nothing otherwise. The PTX is embedded by `src/cuda.rs`.
//!
//! The PTX target follows candle-kernels' convention, so that our module loads
//! wherever candle's own kernels do: `CUDA_COMPUTE_CAP` (`80` gives
//! `.target sm_80`), else the compute capability `nvidia-smi` reports for the
//! first GPU, else the oldest architecture this nvcc can emit (PTX JIT-compiles
//! forward to every newer GPU; with CUDA 13 that is `sm_75`, the oldest GPU
//! CUDA 13 drivers support, and so the oldest candle can run on with it).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let arch = target_arch(&nvcc);
    compile(&nvcc, &arch, "cuda/cross_entropy.cu", &out_dir.join("cross_entropy.ptx"), &[]);
    // The finetune_gpt2 example's kernels (an example has no build script of
    // its own). AdamW is candle's arithmetic operation by operation, so no
    // multiply-add contraction.
    println!("cargo::rerun-if-changed=examples/finetune_gpt2/adamw.cu");
    let adamw = "examples/finetune_gpt2/adamw.cu";
    compile(&nvcc, &arch, adamw, &out_dir.join("finetune_adamw.ptx"), &["-fmad=false"]);
    for kernels in ["softmax", "layer_norm", "gelu", "bias", "sum_squares", "embedding", "column_sums"] {
        let source = format!("examples/finetune_gpt2/{kernels}.cu");
        println!("cargo::rerun-if-changed={source}");
        compile(&nvcc, &arch, &source, &out_dir.join(format!("finetune_{kernels}.ptx")), &[]);
    }
}

/// `nvcc -ptx` of `source` into `ptx` for `arch`, with `extra` flags.
fn compile(nvcc: &str, arch: &str, source: &str, ptx: &std::path::Path, extra: &[&str]) {
    let status = Command::new(nvcc)
        .args(["-ptx", "-O3", "-std=c++17", &format!("-arch={arch}")])
        .args(extra)
        .args([source, "-o"])
        .arg(ptx)
        .status()
        .unwrap_or_else(|e| panic!("could not run `{nvcc}` (put nvcc on PATH or set NVCC): {e}"));
    assert!(status.success(), "`{nvcc}` failed to compile {source}");
}

/// `sm_XY` for the PTX: see the module docs for the order of the sources.
fn target_arch(nvcc: &str) -> String {
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        return sm_of(&cap).unwrap_or_else(|| panic!("CUDA_COMPUTE_CAP={cap:?} is not a compute capability like 80"));
    }
    if let Some(cap) = command_stdout("nvidia-smi", &["--query-gpu=compute_cap", "--format=csv,noheader"])
        .and_then(|out| out.lines().next().and_then(sm_of))
    {
        return cap;
    }
    let listed = command_stdout(nvcc, &["--list-gpu-arch"]).unwrap_or_default();
    listed
        .lines()
        .filter_map(|arch| arch.trim().strip_prefix("compute_")?.parse::<u32>().ok())
        .min()
        .map(|cap| format!("sm_{cap}"))
        .unwrap_or_else(|| panic!("`{nvcc} --list-gpu-arch` listed no architecture; set CUDA_COMPUTE_CAP (e.g. 80)"))
}

/// `80`, `8.0`, `90a` -> `sm_80`, `sm_80`, `sm_90a`.
fn sm_of(cap: &str) -> Option<String> {
    let cap = cap.trim().replace('.', "");
    let digits = cap.trim_end_matches('a');
    (!digits.is_empty() && digits.len() >= 2 && digits.chars().all(|c| c.is_ascii_digit())).then(|| format!("sm_{cap}"))
}

fn command_stdout(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
