//! SplitMix64: a small seeded generator for reproducible weights, batches and
//! samples (also the tests' input generator, which include this file).

use rayon::prelude::*;

/// A SplitMix64 stream.
pub struct Rng(u64);

/// SplitMix64's increment: the k-th output hashes `seed + k * GOLDEN` alone.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos()
    }

    /// `(normal() * std) as f32`, `n` times: the values `n` calls in turn
    /// give, and the stream left where they leave it, but formed on rayon's
    /// threads (each draw's two outputs depend on their place in the stream
    /// alone): a fresh GPT-2 124M's weights take 124 M draws, some 6 s on
    /// one thread.
    pub fn normals(&mut self, n: usize, std: f64) -> Vec<f32> {
        let start = self.0;
        let draws = (0..n)
            .into_par_iter()
            .map(|i| (Rng(start.wrapping_add((2 * i as u64).wrapping_mul(GOLDEN))).normal() * std) as f32)
            .collect();
        self.0 = start.wrapping_add((2 * n as u64).wrapping_mul(GOLDEN));
        draws
    }
}
