//! Losses and gradients against independently computed values and against the
//! slow autograd reference, over dtypes, shapes, strides, chunk lengths, both
//! engines and the path of devices our kernels do not cover.
//!
//! Here the shared engines; in `tests/parity/`, `values.rs` the values (against
//! NumPy, the slow reference, f32; odd sizes, chunking, the two engines) and
//! `inputs.rs` the inputs (strides, shapes, masks, labels, nothing to learn,
//! `inplace_grad`).

#[macro_use]
mod common;
#[path = "parity/inputs.rs"]
mod inputs;
#[path = "parity/values.rs"]
mod values;

use candle_chunked_ce::ChunkedCrossEntropy;

/// Both engines at a given chunk length, and candle's autograd as on a device
/// our kernels do not cover.
fn engines(chunk_len: usize) -> [ChunkedCrossEntropy; 3] {
    let fused = ChunkedCrossEntropy::new(chunk_len, true, -100);
    [fused.clone(), ChunkedCrossEntropy::new(chunk_len, false, -100), fused.force_autograd(true)]
}
