// AdamW's in-place update on CUDA for the finetune_gpt2 example: the three
// passes of examples/finetune_gpt2/adamw.rs (`Moment::first`, `Moment::second`,
// `Update`), one launch each per parameter, instead of candle-nn's dozen
// tensor operations, each with a fresh parameter-sized output (on an H200 the
// clipping and AdamW of GPT-2 124M took 44 ms a step, 2026-12-04).
//
// The arithmetic is candle's, operation by operation: each `affine(x, mul,
// add)` is `x * mul + add` with f32 coefficients, each operation rounded on
// its own, so that the result is candle-nn's AdamW bit for bit. build.rs
// compiles this file with -fmad=false (no multiply-add contraction); division
// and square root are IEEE-rounded by default.
//
// The moments read the gradient times `scale[0]` (the clipping's factor, 1
// for none: one f32 product, as candle's broadcast_mul by that factor forms
// it), read from the device so that the host never waits for the norm.
//
// Grid-stride loops over n elements; n is 64-bit (a [50257, 768] parameter
// is 38.6 M elements, but the loop must not care).

#include <stdint.h>

extern "C" __global__ void adamw_first_moment(float* __restrict__ m, const float* __restrict__ g,
                                              const float* __restrict__ scale, int64_t n, float beta1,
                                              float one_minus_beta1) {
    const float s = scale[0];
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        // m = affine(m, beta1, 0) + affine(g, 1 - beta1, 0)
        m[i] = (m[i] * beta1 + 0.0f) + ((g[i] * s) * one_minus_beta1 + 0.0f);
    }
}

extern "C" __global__ void adamw_second_moment(float* __restrict__ v, const float* __restrict__ g,
                                               const float* __restrict__ scale, int64_t n, float beta2,
                                               float one_minus_beta2) {
    const float s = scale[0];
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        // v = affine(v, beta2, 0) + affine(g * g, 1 - beta2, 0)
        const float scaled = g[i] * s;
        const float g2 = scaled * scaled;
        v[i] = (v[i] * beta2 + 0.0f) + (g2 * one_minus_beta2 + 0.0f);
    }
}

extern "C" __global__ void adamw_update(float* __restrict__ theta, const float* __restrict__ m,
                                        const float* __restrict__ v, int64_t n, float scale_m, float scale_v,
                                        float eps, float decay, float lr) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        // adjusted = affine(m, scale_m, 0) / affine(sqrt(affine(v, scale_v, 0)), 1, eps)
        const float denominator = sqrtf(v[i] * scale_v + 0.0f) * 1.0f + eps;
        const float adjusted = (m[i] * scale_m + 0.0f) / denominator;
        // theta = affine(theta, decay, 0) - affine(adjusted, lr, 0)
        theta[i] = (theta[i] * decay + 0.0f) - (adjusted * lr + 0.0f);
    }
}
