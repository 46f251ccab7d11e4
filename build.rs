//! Compiles `cuda/*.cu` to PTX with nvcc when the `cuda` feature is on; does
//! nothing otherwise. The PTX is embedded by `src/cuda.rs`.

use std::path::PathBuf;
use std::process::Command;

/// Our own kernels target plain sm_90 (H100/H200); candle's are built for
/// sm_90a by candle-kernels.
const ARCH: &str = "sm_90";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let source = "cuda/cross_entropy.cu";
    let ptx = out_dir.join("cross_entropy.ptx");
    let status = Command::new(&nvcc)
        .args(["-ptx", "-O3", "-std=c++17", &format!("-arch={ARCH}"), source, "-o"])
        .arg(&ptx)
        .status()
        .unwrap_or_else(|e| panic!("could not run `{nvcc}` (set NVCC, or run shared/cuda/setup.sh): {e}"));
    assert!(status.success(), "`{nvcc}` failed to compile {source}");
}
