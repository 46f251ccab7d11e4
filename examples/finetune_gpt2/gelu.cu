// GPT-2's GELU (the tanh approximation) for the finetune_gpt2 example,
// forward and backward, on CUDA: candle's backward of `gelu` is some
// seventeen operations over the [B * T, 4C] activations (and a zeros + add);
// here one elementwise pass each way. examples/finetune_gpt2/gelu.rs holds the
// same maths on the CPU and says what it computes and why this form:
//
//   u = sqrt(2/pi) (x + 0.044715 x^3), e = e^(-2u) (exponent capped at 88),
//   d = 1 / (1 + e) (0 from the cap on), y = x d, dy/dx = d + 2 x e d^2 sqrt(2/pi) (1 + 3 0.044715 x^2).
//
// Grid-stride loops over n elements; n is 64-bit.

#include <stdint.h>

#define SQRT_2_OVER_PI 0.7978845608028654f
#define CUBIC 0.044715f

// e and d of the header, for x.
__device__ __forceinline__ void exp_and_logistic(float x, float& e, float& d) {
    const float z = -2.0f * SQRT_2_OVER_PI * (x + CUBIC * x * x * x);
    e = expf(fminf(z, 88.0f));
    d = z >= 88.0f ? 0.0f : 1.0f / (1.0f + e);
}

extern "C" __global__ void gelu_fwd(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        float e, d;
        exp_and_logistic(x[i], e, d);
        y[i] = x[i] * d;
    }
}

extern "C" __global__ void gelu_bwd(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dx,
                                    int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float v = x[i];
        float e, d;
        exp_and_logistic(v, e, d);
        // e d (at most 1) before its product with d: e alone can be 1.7e38.
        const float slope = d + 2.0f * v * d * (e * d) * SQRT_2_OVER_PI * (1.0f + 3.0f * CUBIC * v * v);
        dx[i] = dy[i] * slope;
    }
}
