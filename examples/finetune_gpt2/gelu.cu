// GPT-2's GELU (the tanh approximation) for the finetune_gpt2 example,
// forward and backward, on CUDA: candle's backward of `gelu` is some
// seventeen operations over the [B * T, 4C] activations (and a zeros + add);
// here one elementwise pass each way. examples/finetune_gpt2/gelu.rs holds the
// same maths on the CPU and says what it computes:
//
//   u = sqrt(2/pi) (x + 0.044715 x^3), y = x (1 + tanh u) / 2,
//   dy/dx = (1 + tanh u) / 2 + x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 0.044715 x^2) / 2.
//
// Grid-stride loops over n elements; n is 64-bit.

#include <stdint.h>

#define SQRT_2_OVER_PI 0.7978845608028654f
#define CUBIC 0.044715f

extern "C" __global__ void gelu_fwd(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.0f + tanhf(SQRT_2_OVER_PI * (v + CUBIC * v * v * v)));
    }
}

extern "C" __global__ void gelu_bwd(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dx,
                                    int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float v = x[i];
        const float t = tanhf(SQRT_2_OVER_PI * (v + CUBIC * v * v * v));
        const float slope = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * CUBIC * v * v);
        dx[i] = dy[i] * slope;
    }
}
