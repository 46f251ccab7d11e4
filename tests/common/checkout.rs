//! The checkout whose files a test binary reads at run time (fixtures, kernel
//! sources, the layout's sources): where cargo built it. Where several
//! checkouts share one target dir (a CI clone beside this one), cargo may take
//! a test binary that another checkout built as fresh here (the same hashes;
//! the sources compared by their relative paths and mtimes), and that binary
//! would read the other checkout's files: the kernels as they were there, not
//! as edited here. Run by cargo, which names at run time the package it runs
//! for, such a binary fails here and says what to do; run directly (the GPU
//! machine, where `scripts/gpu-env.sh` links the built path to its checkout),
//! the built path is all there is.

use std::path::Path;

/// The package root the binary was built in (`env!("CARGO_MANIFEST_DIR")`).
///
/// # Panics
/// When cargo runs the binary for another package root.
pub fn checkout() -> &'static Path {
    let built = env!("CARGO_MANIFEST_DIR");
    if let Ok(running) = std::env::var("CARGO_MANIFEST_DIR") {
        assert_eq!(
            running, built,
            "this test binary was built in {built} and runs for {running} (a shared target dir): \
             touch {running}/src/lib.rs and run again"
        );
    }
    Path::new(built)
}
