//! What candle's own CUDA kernels can count, so that a call they could not
//! finish is refused with an error instead of hanging the GPU.
//!
//! candle 0.11's elementwise CUDA kernels (add, copy, cast, affine,
//! index_select, ...) walk their elements with a 32-bit `unsigned int` that
//! steps by the launch's thread count, the element count rounded up to 1024
//! and cast to 32 bits (`LaunchConfig::for_num_elems(n as u32)`). Our own
//! kernels count in 64 bits and cuBLAS takes 64-bit sizes; candle's are what
//! a loss hands its `[N, V]` gradient to (its backward adds every gradient
//! into zeros), and what copies, casts or gathers the linear loss's inputs
//! and gradients. For `n` elements:
//! - up to 2^31: each element once;
//! - past 2^31: the counter wraps past 2^32 and threads redo elements (the
//!   result is right): about `1 / (2 (1 - n / 2^32))` times the work, twice
//!   at 3/4 of 2^32, 50 times at 99%, over 100 times within 2^24 of 2^32;
//! - within 1024 of 2^32 the step itself wraps to 0, and from 2^32 on the
//!   counter can never reach `n`: the kernel never ends.
//!
//! (Counted by replaying the loop with 16-bit counters and 4-thread blocks;
//! `candle-kernels/src/binary_op_macros.cuh`, `unary.cu`, `indexing.cu`.)

use candle::{bail, Device, Result};

/// The element count from which candle's CUDA kernels take over a hundred
/// times their work or never finish: `2^32 - 2^24`.
pub(crate) const CUDA_ELEMENT_LIMIT: usize = (1 << 32) - (1 << 24);

/// Refuses, on CUDA, `elements` that candle's kernels would walk (see the
/// module docs); `what` names the tensor, why candle walks it and what to do
/// instead. Anything on the CPU passes.
pub(crate) fn check_cuda_elements(device: &Device, elements: usize, what: impl FnOnce() -> String) -> Result<()> {
    if device.is_cuda() && !walkable(elements) {
        bail!(
            "{}: {elements} elements on CUDA, and candle's CUDA kernels count elements in 32 bits: from \
             {CUDA_ELEMENT_LIMIT} (2^32 - 2^24) on they take over 100 times their work or never finish",
            what()
        )
    }
    Ok(())
}

/// Whether candle's CUDA kernels finish over `elements` in reasonable time.
fn walkable(elements: usize) -> bool {
    elements < CUDA_ELEMENT_LIMIT
}

#[cfg(test)]
mod tests {
    use super::*;

    /// candle-kernels' grid-stride loop, replayed with `bits`-bit counters and
    /// blocks of `block` threads (`for (unsigned i = tid; i < n; i += block *
    /// grid)`, `grid = ceil((n mod 2^bits) / block)`): the elements visited
    /// over `n`, or `None` when a thread would never stop.
    fn replay(n: u64, bits: u32, block: u64) -> Option<f64> {
        let modulus = 1u64 << bits;
        let grid = (n % modulus).div_ceil(block);
        let step = block * grid % modulus;
        let mut visits = 0u64;
        for start in 0..block * grid {
            let (mut i, mut k) = (start % modulus, 0u64);
            while i < n {
                k += 1;
                if k > n {
                    return None;
                }
                i = (i + step) % modulus;
            }
            visits += k;
        }
        Some(visits as f64 / n as f64)
    }

    /// The module docs' figures, at 16 bits: once up to 2^(bits-1), twice at
    /// 3/4, about 50 times at 99%, over 100 times within 2^(bits-8) of
    /// 2^bits, and never ending from 2^bits - block on (the scaled limit).
    #[test]
    fn the_loop_the_limit_is_drawn_from() {
        let (bits, block) = (16, 4);
        let m = 1u64 << bits;
        assert_eq!(replay(m / 2, bits, block), Some(1.0));
        assert_eq!(replay(m * 3 / 4, bits, block), Some(2.0));
        let near = replay(m * 99 / 100, bits, block).unwrap();
        assert!((45.0..55.0).contains(&near), "{near}");
        assert!(replay(m - (m >> 8), bits, block).unwrap() > 100.0);
        assert!(replay(m - (m >> 8) - m / 64, bits, block).unwrap() < 100.0);
        assert_eq!(replay(m - 1, bits, block), None);
        assert_eq!(replay(m + 5, bits, block), None);
    }

    #[test]
    fn the_limit_sits_2_to_the_24_below_2_to_the_32() {
        assert!(walkable((1 << 32) - (1 << 24) - 1));
        assert!(!walkable((1 << 32) - (1 << 24)));
        assert!(!walkable(1 << 32));
        assert!(!walkable(usize::MAX));
    }

    #[test]
    fn the_cpu_takes_any_count() {
        assert!(check_cuda_elements(&Device::Cpu, usize::MAX, || "never called".into()).is_ok());
    }
}
